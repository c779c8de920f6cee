"""Q8 (spec §2.1) inside a pypto kernel: the one statement of the per-row INT8 chain that
the gate, the shared expert and the routed experts trace.

amax = max(1e-4, max|v|); qs = 127/amax; s = 1/qs; q = INT8(trunc(FP16(INT32(rint(v·qs))))).
The FP32->INT32 (rint) -> FP16 -> INT8 (trunc) chain is written out because a direct
FP32->INT8 cast wraps on overflow in pypto 0.2.0 (|v·qs| <= 127 here, so no wrap).
Split in two so a kernel can take a row's amax over column chunks (a max is exact in any
order) and quantise every chunk with the same scale.
"""
# No `from __future__ import annotations`: pypto reads kernel annotations as objects.
from ..config import INT8_AMAX_EPS, INT8_SCALE_MAX


def q8_scales(pypto, amax):
    """(qs, s) from a row amax of |v| [.., 1] FP32: qs = 127 / max(1e-4, amax), s = 1/qs."""
    amax = pypto.maximum(amax, INT8_AMAX_EPS)
    qs = pypto.div(pypto.full(amax.shape, INT8_SCALE_MAX, pypto.DT_FP32), amax)
    return qs, pypto.div(pypto.full(amax.shape, 1.0, pypto.DT_FP32), qs)


def q8_apply(pypto, v, qs):
    """INT8(trunc(FP16(INT32(rint(v·qs))))): v quantised with its row's qs."""
    q32 = pypto.cast(pypto.mul(v, qs), pypto.DT_INT32, pypto.CastMode.CAST_RINT)
    q16 = pypto.cast(q32, pypto.DT_FP16, pypto.CastMode.CAST_ROUND)
    return pypto.cast(q16, pypto.DT_INT8, pypto.CastMode.CAST_TRUNC)


def quantize_rows_q8(pypto, v):
    """Q8 over the last dim: returns (q INT8, s FP32 [.., 1])."""
    qs, s = q8_scales(pypto, pypto.amax(pypto.abs(v), -1, keepdim=True))
    return q8_apply(pypto, v, qs), s
