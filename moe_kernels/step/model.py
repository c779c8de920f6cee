"""One EP decode step per rank: routing -> rows received -> SIM stage times + comm model.

Routing: every rank's tokens go through the reference hc_pre and gate on the fixtures'
seeded inputs (`analysis.gate_inputs.route_tokens`, gate weights only), then the synthetic
Zipf skew re-ranks them (`analysis.skew.skew_routing`). With `eplb_slots`, the EPLB
what-if (`analysis.eplb.eplb_whatif`) re-places the experts: a route to an expert with
several copies goes to copy (j + src) mod copies (j = its order among src's routes to that
expert), so copies share the load evenly. The dispatch layout (`ep.layout.compute_layout`,
overflow = drop) gives the rows each local expert (slot) receives and the routes per
(src, dst) pair.

Timeline of rank r (barriers as in the reference protocol, spec §3.4 / §3.6):

    hc_pre, gate, expert_shared, pack_routes            (local)
    count exchange   starts when every rank has packed  (count barrier)
    dispatch         starts when every rank has its counts
    expert_routed    starts when every rank's pushes have landed (data barrier)
    combine          starts when every rank finished expert_routed (combine barrier)
    reduce_routes, hc_post                              (local)

With `overlap`, expert_shared runs beside the count exchange and dispatch (it needs
neither) and expert_routed starts when both are done. wait_us is the time a rank idles at
barriers waiting for its slowest peer. Stage times: SIM cost model (`step.timing`); comm:
the communication MODEL (`analysis.comm.ep_step_comm`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from ..analysis.comm import ep_step_comm
from ..analysis.eplb import EMPTY_SLOT, eplb_whatif
from ..analysis.gate_inputs import route_tokens
from ..analysis.routing import expert_load
from ..analysis.skew import skew_routing
from ..config import RunConfig
from ..ep.layout import compute_layout
from ..stages import EP_STEP_STAGES
from . import timing

#: Stages that run before the count exchange (expert_shared moves beside it with overlap).
_BEFORE_COMM = ("hc_pre", "gate", "expert_shared", "pack_routes")
_AFTER_COMBINE = ("reduce_routes", "hc_post")


@dataclass(frozen=True)
class StepRouting:
    """Where the routes of one step land: per rank, slot and source."""

    counts: torch.Tensor          # [R(src), R(dst), S] routes before drops
    placed: torch.Tensor          # [R(src), R(dst), S] routes placed (<= capacity)
    dropped: torch.Tensor         # [R(dst), S] routes beyond capacity
    capacity: int
    slot_experts: torch.Tensor    # [R, S] global expert of each slot (-1 unused)


def capacity_for(run: RunConfig, capacity_factor: float | None) -> int:
    """Receive capacity per local expert. Default: R·T, every route fits (no drops; a
    latency what-if should serve every route, as DeepEP sizes its buffers; the rows a
    kernel computes follow the rows received, so capacity costs no time). With a factor F:
    ceil(F · T·K / NL) (F times the mean rows per expert) clamped to [1, R·T], routes
    beyond it are dropped and counted."""
    if capacity_factor is None:
        return run.ranks * run.tokens
    if not capacity_factor > 0 or not math.isfinite(capacity_factor):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}")
    mean = run.tokens * run.model.num_experts_per_tok / run.n_local
    return int(min(run.ranks * run.tokens, max(1, math.ceil(capacity_factor * mean))))


def _physical_indices(indices: torch.Tensor, placement: torch.Tensor, n_experts: int
                      ) -> torch.Tensor:
    """Global expert ids [R,T,K] -> physical slot ids dst·S + slot under `placement`; the
    routes of src to an expert with c copies go to copy (j + src) mod c, j = their order."""
    copies: dict[int, list[int]] = {}
    for p, g in enumerate(placement.reshape(-1).tolist()):
        if g != EMPTY_SLOT:
            copies.setdefault(g, []).append(p)
    if len(copies) != n_experts:
        raise ValueError(f"the placement holds {len(copies)} of {n_experts} experts")
    first = torch.tensor([copies[g][0] for g in range(n_experts)], dtype=torch.int64)
    out = first[indices.to(torch.int64)]
    for g, ps in copies.items():
        if len(ps) < 2:
            continue
        for src in range(indices.shape[0]):
            flat = out[src].reshape(-1)
            hit = torch.nonzero(indices[src].reshape(-1) == g).flatten()
            flat[hit] = torch.tensor(ps, dtype=torch.int64)[(torch.arange(hit.numel())
                                                             + src) % len(ps)]
    return out


@lru_cache(maxsize=8)
def _gate_routes(run: RunConfig, seed: int) -> torch.Tensor:
    """The gate's [R,T,K] routes of `run` (cached: sweeps route one run many times; at
    flash the reference hc_pre + gate take seconds; callers never modify it)."""
    return route_tokens(run, seed).indices(run.routing)


def step_routing(run: RunConfig, skew: float, seed: int, capacity: int,
                 eplb_slots: int | None = None) -> StepRouting:
    """Route every rank's tokens (gate + synthetic skew, optional EPLB) and lay them out."""
    e, nl = run.model.n_routed_experts, run.n_local
    base = _gate_routes(run, seed)
    indices = skew_routing(base, e, skew, seed)
    if eplb_slots:
        plan = eplb_whatif(expert_load(indices, e).to(torch.float64), run.ranks, eplb_slots)
        placement = plan.placement
    else:
        placement = torch.arange(e, dtype=torch.int64).reshape(run.ranks, nl)
    phys = _physical_indices(indices, placement, e)
    lay = compute_layout(phys, placement.shape[1], capacity, overflow="drop")
    return StepRouting(counts=lay.counts, placed=lay.placed, dropped=lay.dropped,
                       capacity=capacity, slot_experts=placement)


@dataclass
class RankStep:
    """One rank's step: rows, stage SIM us, comm MODEL us, waits, total, timeline."""

    rank: int
    rows_received: int
    expert_rows: list[int]
    dropped: int
    stages_us: dict[str, float]
    comm_us: dict[str, float]
    wait_us: float = 0.0
    total_us: float = 0.0
    routed_method: str = ""
    timeline: list[tuple[str, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "rows_received": self.rows_received,
                "expert_rows": self.expert_rows, "dropped": self.dropped,
                "stages_us": self.stages_us, "comm_us": self.comm_us,
                "wait_us": self.wait_us, "total_us": self.total_us,
                "expert_routed_method": self.routed_method,
                "timeline": [{"what": w, "start_us": a, "end_us": b}
                             for w, a, b in self.timeline]}


def _barrier(ranks: list[RankStep], t: list[float], what: str, dur: dict[int, float],
             ready: list[float] | None = None) -> None:
    """Phase `what` starts on every rank when the last rank is ready (a barrier); each
    rank idles (wait_us) from its own readiness to the start, then runs dur[r]."""
    ready = t if ready is None else ready
    start = max(ready)
    for rk in ranks:
        rk.wait_us += start - ready[rk.rank]
        t[rk.rank] = start + dur[rk.rank]
        rk.timeline.append((what, start, t[rk.rank]))


def _local(rk: RankStep, t: list[float], stages: tuple[str, ...]) -> None:
    for s in stages:
        rk.timeline.append((s, t[rk.rank], t[rk.rank] + rk.stages_us[s]))
        t[rk.rank] += rk.stages_us[s]


def _schedule(ranks: list[RankStep], overlap: bool) -> None:
    """Fill each rank's timeline, wait_us and total_us (barrier model, module doc)."""
    t = [0.0] * len(ranks)
    pre = tuple(s for s in _BEFORE_COMM if not (overlap and s == "expert_shared"))
    for rk in ranks:
        _local(rk, t, pre)
    shared_end = list(t)
    if overlap:  # expert_shared beside count exchange + dispatch (it needs neither)
        for rk in ranks:
            shared_end[rk.rank] = t[rk.rank] + rk.stages_us["expert_shared"]
            rk.timeline.append(("expert_shared", t[rk.rank], shared_end[rk.rank]))
    for phase in ("count", "dispatch"):
        _barrier(ranks, t, phase, {rk.rank: rk.comm_us[phase] for rk in ranks})
    # data barrier: every peer's pushes have landed; with overlap a rank also needs sh
    start = max(t)
    for rk in ranks:
        own = max(start, shared_end[rk.rank])
        rk.wait_us += max(0.0, start - max(t[rk.rank], shared_end[rk.rank]))
        t[rk.rank] = own + rk.stages_us["expert_routed"]
        rk.timeline.append(("expert_routed", own, t[rk.rank]))
    _barrier(ranks, t, "combine", {rk.rank: rk.comm_us["combine"] for rk in ranks})
    for rk in ranks:
        _local(rk, t, _AFTER_COMBINE)
        rk.total_us = t[rk.rank]


@dataclass
class StepResult:
    """The step of every rank; step_us is the slowest rank's total."""

    config: dict[str, Any]
    ranks: list[RankStep]
    fallbacks: dict[str, str] = field(default_factory=dict)  # stage -> why not SIM

    @property
    def step_us(self) -> float:
        return max(r.total_us for r in self.ranks)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "ranks": [r.to_dict() for r in self.ranks],
                "step_us": self.step_us, "sources": {"stages": "sim", "comm": "model"},
                "stage_fallbacks": self.fallbacks}


def ep_step(run: RunConfig, skew: float = 0.0, seed: int = 0,
            capacity_factor: float | None = None, eplb_slots: int | None = None,
            overlap: bool = False, direct_routed: bool = False) -> StepResult:
    """Model one EP step of `run` on every rank (see module doc). direct_routed: SIM every
    rank's expert_routed kernel directly instead of deriving it from the fit."""
    cfg = run.model
    cap = capacity_for(run, capacity_factor)
    rt_ = step_routing(run, skew, seed, cap, eplb_slots)
    shape_us, fallbacks = timing.shape_stage_us(run, EP_STEP_STAGES, seed)
    n_slots = rt_.slot_experts.shape[1]
    recv = rt_.placed.sum(0)                                    # [R(dst), S]
    fit = None if direct_routed else timing.fit_routed(
        n_slots, cap, cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit,
        max_rows=int(recv.max()))
    comm = ep_step_comm(rt_.placed.sum(-1), cfg.hidden_size, n_slots).per_rank_us()
    ranks = []
    for r in range(run.ranks):
        routed = timing.routed_time(recv[r].tolist(), run, cap, fit, direct=direct_routed)
        stages = {s: (routed.us if s == "expert_routed" else shape_us[s])
                  for s in EP_STEP_STAGES}
        ranks.append(RankStep(
            rank=r, rows_received=int(recv[r].sum()), expert_rows=recv[r].tolist(),
            dropped=int(rt_.dropped[r].sum()), stages_us=stages,
            comm_us={"count": comm["count exchange"][r], "dispatch": comm["dispatch"][r],
                     "combine": comm["combine"][r]}, routed_method=routed.method))
    _schedule(ranks, overlap)
    config = dict(run.to_dict(), skew=skew, seed=seed, capacity=cap,
                  capacity_factor=capacity_factor, eplb_slots=eplb_slots, overlap=overlap,
                  slots_per_rank=n_slots, direct_routed=direct_routed,
                  routes_total=int(rt_.counts.sum()), routes_dropped=int(rt_.dropped.sum()))
    return StepResult(config=config, ranks=ranks, fallbacks=fallbacks)
