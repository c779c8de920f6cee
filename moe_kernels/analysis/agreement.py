"""Per-rank agreement of an EP run with a reference: bit-identity, max error and the
spec's ratio_reldiff comparator (§5.3), summarised for tables and plots.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..numerics import ReldiffResult, ratio_reldiff

#: Spec §5.3 tolerance for x_next (moe_ep at 60d25e5f and later): diff_thd, pct_thd.
X_NEXT_DIFF_THD = 3e-3
X_NEXT_PCT_THD = 0.05


@dataclass(frozen=True)
class RankAgreement:
    """One rank's tensor against the reference."""

    rank: int
    bit_identical: bool
    n_diff: int                # elements whose bits differ
    numel: int
    max_abs_err: float
    reldiff: ReldiffResult
    worst_ratio: float = 0.0   # max over elements of error_ratio (>= 1 is a bad point)

    def __str__(self) -> str:
        ident = "bit-identical" if self.bit_identical else f"{self.n_diff} elements differ"
        return (f"rank {self.rank}: {ident}, max |err| {self.max_abs_err:.3g}; "
                f"ratio_reldiff {self.reldiff}")


@dataclass(frozen=True)
class Comparison:
    """A labelled run against a reference, rank by rank."""

    label: str
    per_rank: tuple[RankAgreement, ...]
    diff_thd: float
    pct_thd: float

    @property
    def bit_identical(self) -> bool:
        return all(a.bit_identical for a in self.per_rank)

    @property
    def passed(self) -> bool:
        """ratio_reldiff passes on every rank."""
        return all(a.reldiff.passed for a in self.per_rank)

    @property
    def max_abs_err(self) -> float:
        return max(a.max_abs_err for a in self.per_rank)

    @property
    def worst_ratio(self) -> float:
        """Largest error as a share of the per-element threshold, over every rank."""
        return max(a.worst_ratio for a in self.per_rank)

    @property
    def bad_share_of_allowance(self) -> float:
        """Bad points as a share of the allowed fraction pct_thd (worst rank; < 1 passes)."""
        return max(a.reldiff.bad_fraction for a in self.per_rank) / self.pct_thd \
            if self.pct_thd else 0.0

    def summary(self) -> str:
        """One line: verdict, worst error, tolerance."""
        verdict = ("bit-identical" if self.bit_identical else
                   "PASS" if self.passed else "FAIL")
        bad = sum(a.reldiff.n_bad for a in self.per_rank)
        numel = sum(a.numel for a in self.per_rank)
        return (f"{self.label}: {verdict} (max |err| {self.max_abs_err:.3g}, "
                f"{bad}/{numel} points over diff_thd={self.diff_thd:g}, "
                f"allowed {self.pct_thd:.0%} per rank)")


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Raw bits of a tensor, so that bit-identity also holds for NaN payloads."""
    if x.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return x.contiguous().view(view)
    return x


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, diff_thd: float
                ) -> torch.Tensor:
    """Each element's error as a share of ratio_reldiff's threshold (FP64, flat):
    rdiff / diff_thd with rdiff = |a - e| below diff_thd, else |a - e| / max(|a|, |e|,
    2^-14/diff_thd); an element is a bad point when the ratio exceeds 1 (spec §5.3)."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if not diff_thd > 0:
        raise ValueError(f"diff_thd must be > 0, got {diff_thd!r}")
    a = actual.detach().to(torch.float64).reshape(-1)
    e = expected.detach().to(torch.float64).reshape(-1)
    err = (a - e).abs()
    floor = torch.full_like(err, 2.0 ** -14 / diff_thd)
    scale = torch.maximum(torch.maximum(a.abs(), e.abs()), floor) + 1e-9
    return torch.where(err < diff_thd, err, err / scale) / diff_thd


def agreement_per_rank(actual: torch.Tensor, expected: torch.Tensor,
                       diff_thd: float = X_NEXT_DIFF_THD, pct_thd: float = X_NEXT_PCT_THD
                       ) -> list[RankAgreement]:
    """actual / expected [R, ...] (same shape and dtype) -> one RankAgreement per rank."""
    if actual.shape != expected.shape or actual.dim() < 1:
        raise ValueError(f"actual and expected must have the same [R, ...] shape, got "
                         f"{tuple(actual.shape)} and {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise ValueError(f"actual and expected must have the same dtype, got "
                         f"{actual.dtype} and {expected.dtype}")
    out = []
    for r in range(actual.shape[0]):
        a, e = actual[r], expected[r]
        n_diff = int((_bits(a) != _bits(e)).sum())
        res = ratio_reldiff(a, e, diff_thd, pct_thd)
        ratio = error_ratio(a, e, diff_thd)
        finite = ratio[torch.isfinite(ratio)]
        worst = (math.inf if finite.numel() < ratio.numel()
                 else float(finite.max()) if finite.numel() else 0.0)
        out.append(RankAgreement(rank=r, bit_identical=n_diff == 0, n_diff=n_diff,
                                 numel=a.numel(), max_abs_err=res.max_abs_err, reldiff=res,
                                 worst_ratio=worst))
    return out


def compare(label: str, actual: torch.Tensor, expected: torch.Tensor,
            diff_thd: float = X_NEXT_DIFF_THD, pct_thd: float = X_NEXT_PCT_THD
            ) -> Comparison:
    """A labelled Comparison of actual vs expected [R, ...]."""
    return Comparison(label=label, diff_thd=diff_thd, pct_thd=pct_thd,
                      per_rank=tuple(agreement_per_rank(actual, expected, diff_thd,
                                                        pct_thd)))


def comparison_table(comparisons: Sequence[Comparison]) -> str:
    """Text table: one line per (comparison, rank)."""
    lines = [f"{'comparison':<34} {'rank':>4} {'bit-identical':>13} {'max |err|':>10} "
             f"{'bad points':>17} {'reldiff':>7}"]
    for c in comparisons:
        for a in c.per_rank:
            lines.append(f"{c.label:<34} {a.rank:>4} {str(a.bit_identical):>13} "
                         f"{a.max_abs_err:>10.3g} {a.reldiff.n_bad:>8}/{a.numel:<8} "
                         f"{'PASS' if a.reldiff.passed else 'FAIL':>7}")
    return "\n".join(lines)
