"""SIM stage times of one EP rank at any preset, without the CPU interpreter, cached on disk.

Every stage but expert_routed depends only on the run's shape (tokens, sizes, routing):
one SIM run each, cached by `pto.report.time_stage`. expert_routed follows the rows each
local expert received: its kernel is specialised to the per-expert rows rounded up to 16
(`pto.ffn.routed_rows`), and experts with no rows are absent. One direct SIM of a 32-expert
flash kernel takes about 100 s and 5 GiB (compile time grows faster than linearly with the
experts), so per-rank times are DERIVED from a few small measured kernels:

    t(rows) = base + Σ_{e: rows_e > 0} g(rows_e)

fitted on the same (NL, C, D, I) as the rank: g(16) and base from kernels with n1 and n2
experts at 16 rows (the SIM time is linear in the active experts from 4 experts on: at
flash 4/8/16/32 experts gave 110.4/193.4/360.7/683.0 us, 20.5-20.9 us per expert), g(L)
for every other row level L (16·2^j below C, and C) from one kernel with n1 experts at L;
g is interpolated linearly between levels. A held-out check kernel (2·n2 experts, half
at 16 rows, half at the top level) must be predicted within FIT_TOLERANCE, else the fit
is not used and every rank is simulated directly (tiny shapes are latency-bound, not
additive). Ranks with at most DIRECT_MAX_ACTIVE experts holding rows (below the linear
regime) are simulated directly (small kernels, seconds).
`derivation_check` compares the derivation with direct SIM runs of real rank loads.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..config import RunConfig
from ..pto import ffn
from ..pto.report import configured_limits, roofline_us, time_stage
from ..stages import StageShape, stage_cost
from . import cache
from .child import run_child

#: Active experts of the two fit kernels (clipped to NL): inside the linear regime.
FIT_EXPERTS = (4, 8)
#: Ranks with at most this many experts holding rows are simulated directly.
DIRECT_MAX_ACTIVE = 4
#: A fit whose held-out check kernel misses by more than this (relative) is not used:
#: every rank is then simulated directly (small shapes, where the kernel is not yet
#: bandwidth-bound and the time is not additive over experts).
FIT_TOLERANCE = 0.05
#: Routed kernels streaming more INT8 weight bytes than this are simulated in a child
#: process (see `_measure_isolated`): 10 flash experts (25 MB each).
ISOLATE_WEIGHT_BYTES = 256 * 2 ** 20


def _routed_shape(rows: Sequence[int], capacity: int, hidden: int, intermediate: int,
                  limit: float) -> dict[str, Any]:
    return {"rows": [int(r) for r in rows], "capacity": int(capacity), "hidden": int(hidden),
            "intermediate": int(intermediate), "swiglu_limit": float(limit)}


def routed_sim_us(rows: Sequence[int], capacity: int, hidden: int, intermediate: int,
                  limit: float) -> tuple[float, bool]:
    """(SIM us, cache hit) of the routed kernel specialised to `rows` (already rounded by
    `ffn.routed_rows`), measured directly without the interpreter; 0 when no rows."""
    if not any(rows):
        return 0.0, True
    entry, hit = routed_entry(rows, capacity, hidden, intermediate, limit)
    return float(entry["aicore_us"]), hit


def routed_entry(rows: Sequence[int], capacity: int, hidden: int, intermediate: int,
                 limit: float, isolate: bool = True) -> tuple[dict[str, Any], bool]:
    """(timing-cache entry, cache hit) of the routed kernel specialised to `rows` (some
    nonzero); a miss is simulated in a child interpreter when the kernel is large and
    `isolate` (a caller that already is such a child passes False)."""
    args = (tuple(int(r) for r in rows), int(capacity), int(hidden), int(intermediate),
            float(limit))
    key = cache.make_key("expert_routed", _routed_shape(*args))
    return cache.cached(key, (lambda: _measure_isolated(args)) if isolate
                        else (lambda: _measure_routed(*args)))


def _measure_routed(rows: tuple[int, ...], capacity: int, hidden: int, intermediate: int,
                    limit: float) -> dict[str, Any]:
    lat = ffn.expert_routed_latency(rows, capacity, hidden, intermediate, limit)
    return {"aicore_us": lat.aicore_us, "n_tasks": lat.n_tasks,
            "utilization": lat.utilization}


def _measure_isolated(args: tuple) -> dict[str, Any]:
    """_measure_routed, in a child interpreter (`step.child`) when the kernel streams more
    than ISOLATE_WEIGHT_BYTES, so a step that simulates several ranks directly does not
    exhaust a 24 GiB machine."""
    rows, _, hidden, intermediate, _ = args
    weights = sum(1 for m in rows if m) * 3 * hidden * intermediate
    if weights <= ISOLATE_WEIGHT_BYTES:
        return _measure_routed(*args)
    code = ("import json, sys; from moe_kernels.step.child import emit; "
            "from moe_kernels.step.timing import _measure_routed; "
            "a = json.loads(sys.argv[1]); a[0] = tuple(a[0]); emit(_measure_routed(*a))")
    return run_child(["-c", code, json.dumps(list(args))], "expert_routed")


def row_levels(capacity: int) -> tuple[int, ...]:
    """Row counts at which g is measured: 16, 32, 64, ... below the capacity, and the
    capacity's own bound (routed rows never exceed it)."""
    top = ffn.routed_rows([capacity], capacity)[0]
    levels, m = [], ffn.ROUTED_ROW_QUANTUM
    while m < top:
        levels.append(m)
        m *= 2
    return tuple(levels) + (top,)


@dataclass(frozen=True)
class RoutedFit:
    """t(rows) = base_us + Σ_e g(rows_e) (SIM cost model, fitted; see module doc)."""

    base_us: float
    levels: tuple[int, ...]       # row levels g is measured at
    per_expert_us: tuple[float, ...]  # g at each level
    n_local: int
    capacity: int
    check_rel_err: float = 0.0    # prediction / SIM - 1 on the held-out check kernel

    @property
    def faithful(self) -> bool:
        """True when the held-out check kernel is predicted within FIT_TOLERANCE."""
        return abs(self.check_rel_err) <= FIT_TOLERANCE

    def g(self, m: int) -> float:
        """Per-expert time at m rows, linear between measured levels."""
        lv, gv = self.levels, self.per_expert_us
        if m <= lv[0]:
            return gv[0]
        for j in range(1, len(lv)):
            if m <= lv[j]:
                w = (m - lv[j - 1]) / (lv[j] - lv[j - 1])
                return gv[j - 1] + w * (gv[j] - gv[j - 1])
        return gv[-1]

    def predict(self, rows: Sequence[int]) -> float:
        """Derived SIM us of the routed kernel at `rows` (rounded per expert); 0 if none."""
        active = [m for m in rows if m > 0]
        return self.base_us + sum(self.g(m) for m in active) if active else 0.0


def fit_routed(n_local: int, capacity: int, hidden: int, intermediate: int, limit: float,
               max_rows: int | None = None) -> RoutedFit | None:
    """The RoutedFit at these sizes from cached/measured fit kernels; None when NL is too
    small for two distinct fit sizes (then every rank is simulated directly). max_rows
    (the most rows any local expert received): levels stop at the first 16·2^j >= it, so
    a large capacity (R·T) does not cost fit kernels at rows no expert holds."""
    n1, n2 = (min(n, n_local) for n in FIT_EXPERTS)
    if n1 == n2:
        return None
    top = capacity
    if max_rows is not None:
        m = ffn.ROUTED_ROW_QUANTUM
        while m < max_rows:
            m *= 2
        top = min(capacity, m)
    levels = row_levels(top)

    def sim(n: int, m: int) -> float:
        rows = [m] * n + [0] * (n_local - n)
        return routed_sim_us(rows, capacity, hidden, intermediate, limit)[0]
    t1, t2 = sim(n1, levels[0]), sim(n2, levels[0])
    g0 = (t2 - t1) / (n2 - n1)
    base = t1 - n1 * g0
    per = [g0] + [(sim(n1, m) - base) / n1 for m in levels[1:]]
    fit = RoutedFit(base_us=base, levels=levels, per_expert_us=tuple(per),
                    n_local=n_local, capacity=capacity)
    # held out: as many experts as fit (up to 16), half at 16 rows, half at the top level
    n3 = min(n_local, 2 * n2)
    rows = [levels[0]] * (n3 - n3 // 2) + [levels[-1]] * (n3 // 2) + [0] * (n_local - n3)
    sim3 = routed_sim_us(rows, capacity, hidden, intermediate, limit)[0]
    return replace(fit, check_rel_err=fit.predict(rows) / sim3 - 1.0)


@dataclass(frozen=True)
class RoutedTime:
    """One rank's expert_routed time and how it was obtained ('sim' or 'derived')."""

    us: float
    method: str
    rows: tuple[int, ...]         # rows computed per local expert (rounded)


def routed_time(counts: Sequence[int], run: RunConfig, capacity: int,
                fit: RoutedFit | None, direct: bool = False) -> RoutedTime:
    """expert_routed time of one rank from its received counts per local expert."""
    cfg = run.model
    rows = ffn.routed_rows([int(c) for c in counts], capacity)
    active = sum(1 for m in rows if m)
    if not active:
        return RoutedTime(0.0, "none", rows)
    if direct or fit is None or not fit.faithful or active <= DIRECT_MAX_ACTIVE:
        us, _ = routed_sim_us(rows, capacity, cfg.hidden_size, cfg.moe_intermediate_size,
                              cfg.swiglu_limit)
        return RoutedTime(us, "sim", rows)
    return RoutedTime(fit.predict(rows), "derived", rows)


def shape_stage_us(run: RunConfig, stages: Sequence[str], seed: int = 0
                   ) -> tuple[dict[str, float], dict[str, str]]:
    """(us, fallbacks): SIM us of every stage in `stages` but expert_routed
    (rank-independent), cached. A kernel that fails to compile at this shape gets its
    roofline time at pypto's configured A2A3 limits instead, and `fallbacks[stage]` says
    so (with the error's first line): the step still runs, and says which number is not
    SIM."""
    us: dict[str, float] = {}
    fallbacks: dict[str, str] = {}
    for s in stages:
        if s == "expert_routed":
            continue
        try:
            us[s] = float(time_stage(run, s, seed)[0]["aicore_us"])
        except Exception as exc:  # noqa: BLE001 - pypto raises bare RuntimeErrors
            cost = stage_cost(s, StageShape.from_run(run))
            us[s] = roofline_us(cost.hbm_bytes, cost.int8_ops, cost.fp_flops,
                                configured_limits())
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            fallbacks[s] = f"roofline at A2A3.ini limits: SIM kernel failed ({first[:120]})"
    return us, fallbacks


def derivation_check(run: RunConfig, capacity: int, rank_counts: Sequence[Sequence[int]]
                     ) -> list[dict[str, Any]]:
    """Derived vs direct SIM expert_routed time for each count vector (one per rank):
    rows, derived_us, sim_us, rel_err = derived / sim - 1. Direct runs are cached."""
    cfg = run.model
    fit = fit_routed(run.n_local, capacity, cfg.hidden_size, cfg.moe_intermediate_size,
                     cfg.swiglu_limit)
    out = []
    for counts in rank_counts:
        rows = ffn.routed_rows([int(c) for c in counts], capacity)
        sim = routed_time(counts, run, capacity, fit, direct=True).us
        der = fit.predict(rows) if fit is not None else sim
        out.append({"rows": list(rows), "derived_us": der, "sim_us": sim,
                    "rel_err": (der / sim - 1.0) if sim else 0.0,
                    "fit_used": fit is not None and fit.faithful,
                    "check_rel_err": fit.check_rel_err if fit is not None else 0.0})
    return out
