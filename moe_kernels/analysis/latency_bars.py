"""Stacked-bar and sweep data of per-rank stage latency (what notebook 04 plots)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..stages import STAGE_NAMES
from .rank_latency import KernelCall


@dataclass(frozen=True)
class StackedBars:
    """Stacked-bar data: one bar per category, one segment per stage (us)."""

    categories: tuple[str, ...]
    segments: dict[str, tuple[float, ...]]   # stage -> value per category (program order)

    @property
    def totals(self) -> tuple[float, ...]:
        return tuple(sum(v[i] for v in self.segments.values())
                     for i in range(len(self.categories)))


def per_rank_stage_bars(calls: Sequence[KernelCall], ranks: int,
                        stages: Sequence[str] = STAGE_NAMES) -> StackedBars:
    """Sum of SIM us per (stage, rank); stages no rank called are left out."""
    if not isinstance(ranks, int) or ranks <= 0:
        raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
    seg: dict[str, list[float]] = {s: [0.0] * ranks for s in stages}
    seen: set[str] = set()
    for c in calls:
        if c.stage not in seg:
            raise ValueError(f"call stage {c.stage!r} is not one of {list(stages)}")
        if not 0 <= c.rank < ranks:
            raise ValueError(f"call rank {c.rank} outside [0, {ranks})")
        seg[c.stage][c.rank] += c.aicore_us
        seen.add(c.stage)
    return StackedBars(categories=tuple(f"rank {r}" for r in range(ranks)),
                       segments={s: tuple(v) for s, v in seg.items() if s in seen})


def add_segments(bars: StackedBars, extra: Mapping[str, Sequence[float]]) -> StackedBars:
    """`bars` with more segments (e.g. modelled dispatch / combine) appended."""
    n = len(bars.categories)
    for name, vals in extra.items():
        if len(vals) != n:
            raise ValueError(f"segment {name!r} needs {n} values, got {len(vals)}")
        if name in bars.segments:
            raise ValueError(f"segment {name!r} already present")
    return StackedBars(bars.categories, {**bars.segments,
                                         **{k: tuple(float(x) for x in v)
                                            for k, v in extra.items()}})


# --------------------------------------------------------------------------- sweeps
def stage_sweep(runs: Sequence[Any], seed: int = 0, stages: Sequence[str] | None = None,
                report: Callable[..., list] | None = None,
                known: Mapping[Any, list] | None = None) -> list[list]:
    """`report(run, seed, stages)` (default `pto.report.stage_report`) for every run;
    runs found in `known` (run -> records, e.g. a report already made) are reused."""
    if report is None:
        from ..pto.report import stage_report
        report = stage_report
    known = known or {}
    return [known[r] if r in known else report(r, seed, None if stages is None
                                               else tuple(stages)) for r in runs]


def sweep_series(reports: Sequence[Sequence[Any]], total: bool = True,
                 fixed: Sequence[Any] = ()) -> dict[str, list[float]]:
    """stage -> [sim_us per sweep point] from stage_report outputs (records with .stage,
    .sim_us), plus 'total (sum of stages)' when `total`. `fixed`: records of stages the
    sweep does not change (not re-run), added to every point's total."""
    if not reports:
        raise ValueError("need at least one sweep point")
    names = [r.stage for r in reports[0]]
    out: dict[str, list[float]] = {n: [] for n in names}
    for recs in reports:
        by = {r.stage: r.sim_us for r in recs}
        if set(by) != set(names):
            raise ValueError(f"sweep points report different stages: {sorted(by)} vs "
                             f"{sorted(names)}")
        for n in names:
            out[n].append(float(by[n]))
    extra = [r for r in fixed if r.stage not in out]
    if total and len(names) + len(extra) > 1:
        base = float(sum(r.sim_us for r in extra))
        label = "total (sum of stages)" if not extra else (
            f"total (sum of stages; {len(extra)} unchanged stages fixed)")
        out[label] = [base + float(sum(r.sim_us for r in recs)) for recs in reports]
    return out


def batch_sweep_runs(run: Any, batches: Sequence[int]) -> list:
    """`run` at every batch per rank of `batches` (the receive capacity follows T)."""
    return [replace(run, batch=int(b), recv_capacity=None) for b in batches]


def ranks_sweep_runs(run: Any, ranks: Sequence[int]) -> list:
    """`run` at every rank count of `ranks` (tokens per rank fixed, NL = E / ranks)."""
    return [replace(run, ranks=int(r), recv_capacity=None) for r in ranks]
