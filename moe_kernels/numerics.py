"""Rounding and quantization shared by every stage, and the spec's comparator.

Spec §2.1 (Q8 and its rounding chain), §2.2/§4 (BF16 rint casts) and §5.3
(ratio_reldiff). One place for each, so that every stage rounds the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import INT8_AMAX_EPS, INT8_SCALE_MAX


def bf16_rint(x: torch.Tensor) -> torch.Tensor:
    """FP32 -> BF16, round to nearest, ties to even (the kernels' cast mode `rint`).

    torch's float->bfloat16 conversion is RNE. (The seed's hc_pre golden used
    add-0x8000-and-truncate, which rounds ties away from zero; the kernels use rint.)
    """
    if x.dtype != torch.float32:
        raise TypeError(f"bf16_rint expects float32 input, got {x.dtype}")
    return x.to(torch.bfloat16)


def sigmoid_f32(x: torch.Tensor) -> torch.Tensor:
    """σ(x) = 1/(1+exp(-x)) of an FP32 tensor, evaluated in FP64 and rounded once to FP32.

    Evaluating the transcendental in double makes the FP32 result independent of where
    an element sits in a tensor (torch's vectorised and scalar-tail paths may differ by
    an ulp in FP32), which is what lets the EP program match the single-card reference
    bit for bit when rows are regrouped by expert.
    """
    x64 = x.to(torch.float64)
    return (1.0 / (1.0 + torch.exp(-x64))).to(torch.float32)


def silu_f32(g: torch.Tensor) -> torch.Tensor:
    """silu(g) = g · σ(g) in FP32, with σ from `sigmoid_f32`."""
    return g * sigmoid_f32(g)


def matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T of FP32 operands, accumulated in FP64 and rounded once to FP32.

    An FP32 GEMM's result depends on how the library splits K across threads; with FP64
    accumulation the rounded FP32 result is the same for any thread count or batch, which
    keeps gloo ranks (one thread each) bit-identical to an in-process reference.
    """
    return torch.matmul(a.to(torch.float64), b.to(torch.float64).t()).to(torch.float32)


def sum_f32(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ over `dim` (keepdim) of an FP32 tensor, in FP64 rounded once: thread-independent."""
    return x.to(torch.float64).sum(dim=dim, keepdim=True).to(torch.float32)


def quantize_rows_int8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8 of spec §2.1 over the last dim: per-row symmetric INT8 plus FP32 dequant scale.

    amax = max(1e-4, max|v|); qs = 127/amax; s = 1/qs;
    q = INT8(trunc(FP16(INT32(rint(v*qs))))). Returns (q int8 [..., L], s fp32 [..., 1]).
    Also used for per-output-channel weight quantization (rows = output channels).
    """
    if v.dtype != torch.float32:
        raise TypeError(f"quantize_rows_int8 expects float32 input, got {v.dtype}")
    amax = torch.maximum(v.amax(dim=-1, keepdim=True), -v.amin(dim=-1, keepdim=True))
    amax = amax.clamp_min(INT8_AMAX_EPS)
    qs = torch.tensor(INT8_SCALE_MAX, dtype=torch.float32) / amax
    scale = torch.tensor(1.0, dtype=torch.float32) / qs
    q32 = (v * qs).round_().to(torch.int32)             # rint: half to even
    q = q32.to(torch.float16).to(torch.int8)            # -> FP16 (round) -> INT8 (trunc)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q · s in FP32 (the inverse of `quantize_rows_int8`, up to rounding)."""
    return q.to(torch.float32) * scale


def int8_matmul_i32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact INT32 accumulation of a [M, K] INT8 @ b [N, K]^T INT8 -> [M, N] INT32.

    Uses torch's integer GEMM (`torch._int_mm`, exact by construction). Where it is not
    available the product is taken in FP64, also exact: every product and partial sum is
    an integer below 2**53, whatever the summation order. Either way a row's result does
    not depend on the other rows of the batch.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul_i32 expects int8 operands, got {a.dtype}, {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul_i32 expects [M,K] @ [N,K]^T, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    try:
        return torch._int_mm(a.contiguous(), b.t())
    except (RuntimeError, AttributeError):  # pragma: no cover - torch builds without it
        return torch.matmul(a.to(torch.float64), b.to(torch.float64).t()).to(torch.int32)


@dataclass(frozen=True)
class ReldiffResult:
    """Outcome of `ratio_reldiff`: pass flag, bad-point count and the allowance."""

    passed: bool
    n_bad: int
    n_allowed: int
    numel: int
    worst_rdiff: float
    max_abs_err: float
    has_nonfinite: bool

    @property
    def bad_fraction(self) -> float:
        return self.n_bad / self.numel if self.numel else 0.0

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: {self.n_bad}/{self.numel} points over threshold "
                f"(allowed {self.n_allowed}), worst rdiff {self.worst_rdiff:.3g}, "
                f"max |err| {self.max_abs_err:.3g}"
                + (", non-finite values" if self.has_nonfinite else ""))


def ratio_reldiff(actual: torch.Tensor, expected: torch.Tensor, diff_thd: float = 0.01,
                  pct_thd: float = 0.05, max_diff_hd: float = math.inf) -> ReldiffResult:
    """The reference's `ratio_reldiff` comparator (spec §5.3).

    a = |act - exp|, b = max(|act|, |exp|, 2^-14/diff_thd) + 1e-9; rdiff = a if a < diff_thd
    else a/b; a point is bad when rdiff > diff_thd. Pass iff #bad <= round(pct_thd*numel),
    the worst bad rdiff is below max_diff_hd, and no value is NaN or Inf.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected "
                         f"{tuple(expected.shape)}")
    if diff_thd <= 0 or not 0 <= pct_thd <= 1:
        raise ValueError(f"diff_thd must be > 0 and pct_thd in [0, 1], got "
                         f"{diff_thd}, {pct_thd}")
    act = actual.detach().to(torch.float64).flatten()
    exp = expected.detach().to(torch.float64).flatten()
    nonfinite = bool((~torch.isfinite(act)).any() or (~torch.isfinite(exp)).any())
    a = (act - exp).abs()
    floor = torch.full_like(a, 2.0 ** -14 / diff_thd)
    b = torch.maximum(torch.maximum(act.abs(), exp.abs()), floor) + 1e-9
    rdiff = torch.where(a < diff_thd, a, a / b)
    bad = rdiff > diff_thd
    n_bad = int(bad.sum())
    numel = act.numel()
    n_allowed = int(round(pct_thd * numel))
    worst = float(rdiff[bad].max()) if n_bad else 0.0
    finite_a = a[torch.isfinite(a)]
    max_abs = float(finite_a.max()) if finite_a.numel() else 0.0
    passed = (not nonfinite) and n_bad <= n_allowed and (n_bad == 0 or worst < max_diff_hd)
    return ReldiffResult(passed=passed, n_bad=n_bad, n_allowed=n_allowed, numel=numel,
                         worst_rdiff=worst, max_abs_err=max_abs, has_nonfinite=nonfinite)
