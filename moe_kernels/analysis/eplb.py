"""EPLB what-if: replicate hot experts into redundant slots and repack every rank.

The approach of DeepSeek's expert-parallel load balancer (deepseek-ai/EPLB, its global
policy), re-stated here with one extra rule that guarantees it never makes things worse.

* Slots. `redundant` extra slots in total, a multiple of R: every rank has
  S = NL + redundant / R slots. "Before" is the home placement (expert g on rank g // NL,
  spec §3.3) with no replicas.
* Shares. Every copy of expert g serves load_g / copies_g rows; a rank's load is the sum
  of the shares of the copies it holds.
1. Replicate: repeatedly give one more copy to the expert with the highest load per copy
   (ties to the lower id), at most R copies per expert (one per rank). This fixes the
   order in which replicas are added; the first k of them form candidate k.
2. Pack candidate k: its E + k physical experts, heaviest share first (ties: lower
   expert id), each onto the least-loaded rank (ties: lower rank) that has a free slot
   and does not hold that expert yet. A candidate that reaches a dead end (every rank
   with room already holds the expert) is discarded.
3. Never worse (our rule; EPLB itself always fills every slot): among the home placement
   and the packed candidates k = 0..redundant, keep the one with the lowest busiest-rank
   load; ties go to fewer replicas, then to the home placement. A replica that would not
   lower the busiest rank's load is therefore not placed and its slot stays unused
   (`EMPTY_SLOT`). Since the home placement is a candidate, the busiest rank's load
   after is never above before.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import RunConfig
from .gate_inputs import route_tokens
from .routing import busiest_rank, expert_load, imbalance
from .skew import skew_routing

#: Placement entry of a slot left unused (a replica that would not have helped).
EMPTY_SLOT = -1


@dataclass(frozen=True)
class EplbPlan:
    """Result of `eplb_whatif`: copies, placement and rank load before and after."""

    load: torch.Tensor              # [E] FP64 per-expert load the plan balances
    copies: torch.Tensor            # [E] INT64 copies per expert (1 = no replica)
    placement: torch.Tensor         # [R, NL + redundant/R] INT64 expert per slot, -1 unused
    load_before: torch.Tensor       # [R] FP64 per-rank load, home placement, no replicas
    load_after: torch.Tensor        # [R] FP64 per-rank load of the chosen placement
    replicated: tuple[int, ...]     # expert of each replica kept, in replication order
    redundant: int                  # redundant slots offered (placed + unused)

    @property
    def imbalance_before(self) -> float:
        return imbalance(self.load_before)

    @property
    def imbalance_after(self) -> float:
        return imbalance(self.load_after)

    @property
    def busiest_before(self) -> int:
        return busiest_rank(self.load_before)

    @property
    def busiest_after(self) -> int:
        return busiest_rank(self.load_after)

    @property
    def unused_slots(self) -> int:
        """Redundant slots left empty because another replica would not have helped."""
        return self.redundant - len(self.replicated)

    @property
    def per_copy(self) -> torch.Tensor:
        """[R, S] FP64 rows each slot's copy serves (load_g / copies_g), NaN if unused."""
        share = torch.cat([self.load / self.copies, torch.tensor([math.nan],
                                                                 dtype=torch.float64)])
        return share[torch.where(self.placement == EMPTY_SLOT, share.numel() - 1,
                                 self.placement)]

    def summary(self) -> str:
        """One line for a notebook printout."""
        return (f"imbalance (max/mean) {self.imbalance_before:.3f} -> "
                f"{self.imbalance_after:.3f}; busiest rank {self.busiest_before} "
                f"({float(self.load_before.max()):.1f} rows) -> {self.busiest_after} "
                f"({float(self.load_after.max()):.1f} rows); replicated experts "
                f"{list(self.replicated)}, {self.unused_slots} of {self.redundant} "
                f"redundant slots unused")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record: per-rank load before/after, placement without unused slots."""
        return {
            "before": {"rank_load": self.load_before.tolist(),
                       "max_over_mean": self.imbalance_before},
            "after": {"rank_load": self.load_after.tolist(),
                      "max_over_mean": self.imbalance_after},
            "placement": [[g for g in row if g != EMPTY_SLOT]
                          for row in self.placement.tolist()],
            "slots_per_rank": int(self.placement.shape[1]),
            "unused_slots": self.unused_slots,
            "copies": self.copies.tolist(),
            "replicated": list(self.replicated),
            "expert_load": self.load.tolist(),
        }


def _check(load: torch.Tensor, ranks: int, redundant: int) -> None:
    e = load.numel()
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks <= 0 or e % ranks:
        raise ValueError(f"ranks must be a positive divisor of n_experts ({e}), got {ranks!r}")
    max_red = e * (ranks - 1)
    if (not isinstance(redundant, int) or isinstance(redundant, bool) or redundant < 0
            or redundant % ranks or redundant > max_red):
        raise ValueError(f"redundant must be a multiple of ranks ({ranks}) in "
                         f"[0, {max_red}] (at most one copy per rank per expert), "
                         f"got {redundant!r}")
    if load.dim() != 1 or not bool(torch.isfinite(load.to(torch.float64)).all()):
        raise ValueError(f"load must be a finite 1-D tensor, got shape {tuple(load.shape)}")
    if bool((load < 0).any()):
        raise ValueError("load must be non-negative")


def replication_order(load: torch.Tensor, ranks: int, redundant: int) -> list[int]:
    """Step 1: the expert given each of `redundant` replicas, in order: always the one
    with the highest load per copy (ties to the lower id), at most `ranks` copies each."""
    lf = load.to(torch.float64).tolist()
    copies = [1] * len(lf)
    order: list[int] = []
    for _ in range(redundant):
        g = max((i for i in range(len(lf)) if copies[i] < ranks),
                key=lambda i: (lf[i] / copies[i], -i))
        copies[g] += 1
        order.append(g)
    return order


def pack_copies(load: torch.Tensor, copies: torch.Tensor, ranks: int, slots: int
                ) -> list[list[int]] | None:
    """Step 2: place every copy (share load_g / copies_g), heaviest first, on the
    least-loaded rank with a free slot that lacks the expert; None at a dead end.
    Returns each rank's experts in placement order (at most `slots` each)."""
    share = (load.to(torch.float64) / copies).tolist()
    phys = sorted((g for g in range(len(share)) for _ in range(int(copies[g]))),
                  key=lambda g: (-share[g], g))
    if len(phys) > ranks * slots:
        raise ValueError(f"{len(phys)} copies do not fit {ranks} ranks x {slots} slots")
    heap = [(0.0, r) for r in range(ranks)]          # (load, rank) of ranks with room
    rows: list[list[int]] = [[] for _ in range(ranks)]
    for g in phys:
        skipped = []
        while heap and g in rows[heap[0][1]]:
            skipped.append(heapq.heappop(heap))
        if not heap:
            return None
        rank_now, r = heapq.heappop(heap)
        rows[r].append(g)
        if len(rows[r]) < slots:
            heapq.heappush(heap, (rank_now + share[g], r))
        for item in skipped:
            heapq.heappush(heap, item)
    return rows


def _rank_loads(rows: list[list[int]], share: list[float]) -> list[float]:
    # fsum rounds once, so the same multiset of shares gives the same load in any order
    return [math.fsum(share[g] for g in row) for row in rows]


def eplb_whatif(load: torch.Tensor, ranks: int, redundant: int) -> EplbPlan:
    """Balance per-expert `load` [E] over `ranks` ranks with `redundant` extra slots
    (rules in the module docstring); the busiest rank's load never goes up."""
    _check(load, ranks, redundant)
    e = load.numel()
    n_local, slots = e // ranks, e // ranks + redundant // ranks
    lf = load.to(torch.float64)
    order = replication_order(lf, ranks, redundant)
    home = [list(range(r * n_local, (r + 1) * n_local)) for r in range(ranks)]
    before = _rank_loads(home, lf.tolist())
    best = (max(before), 0, 0)                        # (busiest load, replicas, packed)
    best_rows, best_copies, best_loads = home, torch.ones(e, dtype=torch.int64), before
    copies = torch.ones(e, dtype=torch.int64)
    for k in range(redundant + 1):
        if k:
            copies[order[k - 1]] += 1
        rows = pack_copies(lf, copies, ranks, slots)
        if rows is None:
            continue
        loads = _rank_loads(rows, (lf / copies).tolist())
        key = (max(loads), k, 1)
        if key < best:
            best, best_rows, best_copies, best_loads = key, rows, copies.clone(), loads
    placement = torch.full((ranks, slots), EMPTY_SLOT, dtype=torch.int64)
    for r, row in enumerate(best_rows):
        placement[r, :len(row)] = torch.tensor(row, dtype=torch.int64)
    return EplbPlan(load=lf, copies=best_copies, placement=placement,
                    load_before=torch.tensor(before, dtype=torch.float64),
                    load_after=torch.tensor(best_loads, dtype=torch.float64),
                    replicated=tuple(order[:best[1]]), redundant=redundant)


def skewed_expert_load(run: RunConfig, skew: float, seed: int = 0) -> torch.Tensor:
    """Routes per global expert [E] INT64 at synthetic `skew`, as notebook 01 computes
    it: the fixtures' gate on every rank (run.routing), then `skew_routing`."""
    e = run.model.n_routed_experts
    base = route_tokens(run, seed).indices(run.routing)
    return expert_load(skew_routing(base, e, skew, seed), e)
