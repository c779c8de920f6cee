"""W8A8 SwiGLU experts (spec §2.4 expert_shared, §2.7 expert_routed) as pypto kernels.

g = (x_i8 w1^T)_i32 · xs · s1, u likewise; optional clamp; h = silu(g)·u; (h_i8, hs) = Q8(h);
y = (h_i8 w2^T)_i32 · hs · s2 [· routing weight]; bf16(y).

pypto 0.2.0 on DAV_2201 has int8 matmul with a fused (fixpipe) dequant only to FP16, and
the spec dequantises in FP32: we take the INT32 accumulator and dequantise with vector ops.
"""
# No `from __future__ import annotations`: pypto reads kernel annotations as objects.
import functools
from collections.abc import Sequence

import torch

from ..types import ExpertWeights
from . import runtime as rt
from .q8 import quantize_rows_q8
from .runtime import LatencyRecord
from .tiling import divisor_tile

# Tuning constants; what was measured for each is in docs/kernel-tuning.md.
#: INT8 matmul cube tiles [M, K] x [N, K]^T: K 256 in L0 and 1024 per L1 fill (long
#: contiguous weight rows per core), 128 output channels per tile.
FFN_CUBE_K0, FFN_CUBE_K1, FFN_CUBE_N = 256, 1024, 128
#: Max rows per cube M tile (16-aligned; decode batches are 32-256 rows per matmul).
FFN_CUBE_M = 128
#: Vector tiles on [rows, I] FP32: 4 rows x a whole 4096 row (64 KiB), so the Q8 amax
#: needs no partial maxima; 8 rows do not fit the unified buffer.
ROW_TILE, COL_TILE = 4, 4096


def swiglu_h(pypto, x, xs, w1, s1, w3, s3, limit: float):
    """h = silu(g)·u [M, N] FP32 over rows x [M, D] INT8 (xs [M, 1]) and weight rows w1, w3
    [N, D] INT8 (s1, s3 [1, N]): g = (x w1^T)_i32 · xs · s1, u likewise, clamped if limit."""
    g = pypto.mul(pypto.mul(pypto.cast(pypto.matmul(x, w1, pypto.DT_INT32, b_trans=True),
                                       pypto.DT_FP32), xs), s1)
    u = pypto.mul(pypto.mul(pypto.cast(pypto.matmul(x, w3, pypto.DT_INT32, b_trans=True),
                                       pypto.DT_FP32), xs), s3)
    if limit > 0:
        g = pypto.minimum(g, limit)
        u = pypto.clip(u, -limit, limit)
    return pypto.mul(pypto.mul(g, pypto.sigmoid(g)), u)


def w2_dequant(pypto, h_i8, hs, w2, s2):
    """y = (h_i8 w2^T)_i32 · hs · s2 [M, D] FP32 (the INT32 accumulator dequantised in FP32)."""
    return pypto.mul(pypto.mul(pypto.cast(pypto.matmul(h_i8, w2, pypto.DT_INT32,
                                                       b_trans=True), pypto.DT_FP32), hs), s2)


def swiglu_rows(pypto, x, xs, w1, s1, w3, s3, w2, s2, limit: float, row_w=None,
                w2_tiles=None):
    """The FFN of one weight set over rows x [M, D] INT8 (xs [M, 1]); returns FP32 y [M, D].
    w2_tiles: (m, k_dims, n[, (rows, cols)]) arguments of cube_tiles for the w2 matmul, if
    it differs, and optionally the vector tile shape from the w2 matmul on."""
    h_i8, hs = quantize_rows_q8(pypto, swiglu_h(pypto, x, xs, w1, s1, w3, s3, limit))
    if w2_tiles is not None:
        cube_tiles(pypto, *w2_tiles[:3])
        if len(w2_tiles) > 3:
            pypto.set_vec_tile_shapes(*w2_tiles[3])
    y = w2_dequant(pypto, h_i8, hs, w2, s2)
    if row_w is not None:
        y = pypto.mul(y, row_w)
    return y


def cube_tile_sizes(m: int, k: int) -> tuple[int, int, int]:
    """(M, K0, K1) of an INT8 matmul over m rows and a K of k: M up to FFN_CUBE_M in 16-row
    steps, K0 / K1 the largest divisors of k up to FFN_CUBE_K0 / FFN_CUBE_K1."""
    mt = min(FFN_CUBE_M, -(-m // 16) * 16)
    k0 = divisor_tile("matmul K", k, FFN_CUBE_K0)
    return mt, k0, max(k0, divisor_tile("matmul K", k, FFN_CUBE_K1))


def cube_tiles(pypto, m: int, k_dims: tuple[int, ...], n: int = FFN_CUBE_N) -> None:
    mt, k0, k1 = cube_tile_sizes(m, min(k_dims))
    pypto.set_cube_tile_shapes([mt, mt], [k0, k1], [n, n])


def check_weights(w1, w3, w2, lead: tuple[int, ...]) -> tuple[int, int]:
    i, d = w1.shape[-2:]
    for name, w, shape in (("w1", w1, (*lead, i, d)), ("w3", w3, (*lead, i, d)),
                           ("w2", w2, (*lead, d, i))):
        if tuple(w.shape) != shape or w.dtype != torch.int8:
            raise ValueError(f"{name} must be {list(shape)} int8, got {tuple(w.shape)} {w.dtype}")
    return d, i


#: Row quantum of the routed kernel: each local expert computes its received rows rounded
#: up to the cube's 16-row M fractal (and capped at the capacity C); an expert that
#: received nothing is left out of the kernel, so its weights are never streamed.
ROUTED_ROW_QUANTUM = 16


def routed_rows(counts: Sequence[int], capacity: int) -> tuple[int, ...]:
    """Rows the routed kernel computes per local expert for received `counts`:
    min(C, ceil(count / 16) · 16), and 0 for an expert that received no row."""
    q = ROUTED_ROW_QUANTUM
    out = []
    for n in counts:
        n = int(n)
        if not 0 <= n <= capacity:
            raise ValueError(f"recv_count must lie in [0, capacity={capacity}], got {n}")
        out.append(min(capacity, -(-n // q) * q))
    return tuple(out)


def _routed_expert(pypto, e: int, rows: tuple[int, ...], c: int, d: int, i: int, ct: int,
                   limit: float, ins: tuple, y) -> None:
    """Traced inside the routed kernel: local expert e over its first rows[e] slots.
    (A plain function: the kernel parser takes neither `continue` nor tuple unpacking.)"""
    x, xs, rw, w1, s1, w3, s3, w2, s2 = ins
    m = rows[e]
    pypto.set_vec_tile_shapes(divisor_tile("rows of a local expert", m, ROW_TILE), ct)
    cube_tiles(pypto, m, (d, i))
    ye = swiglu_rows(pypto, pypto.view(x, [m, d], [e * c, 0]),
                      pypto.view(xs, [m, 1], [e * c, 0]),
                      pypto.view(w1, [i, d], [e * i, 0]), pypto.view(s1, [1, i], [e, 0]),
                      pypto.view(w3, [i, d], [e * i, 0]), pypto.view(s3, [1, i], [e, 0]),
                      pypto.view(w2, [d, i], [e * d, 0]), pypto.view(s2, [1, d], [e, 0]),
                      limit, pypto.view(rw, [m, 1], [e * c, 0]))
    pypto.assemble(pypto.cast(ye, pypto.DT_BF16, pypto.CastMode.CAST_RINT), [e * c, 0], y)


@functools.lru_cache(maxsize=32)
def _routed_kernel(rows: tuple[int, ...], c: int, d: int, i: int, limit: float,
                   verify: bool = True):
    """The routed kernel specialised to `rows` (see `routed_rows`): expert e computes the
    first rows[e] slots of its C-slot block; experts with rows[e] == 0 are absent."""
    pypto = rt.ensure_ready()
    nl = len(rows)
    ct = divisor_tile("min(hidden, intermediate)", min(d, i), COL_TILE)
    active = [e for e, m in enumerate(rows) if m]  # a list: the parser unrolls the loop
    body = _routed_expert

    @pypto.frontend.jit(**rt.jit_options(verify=verify))
    def expert_routed_k(x: pypto.Tensor((nl * c, d), pypto.DT_INT8),
                        xs: pypto.Tensor((nl * c, 1), pypto.DT_FP32),
                        rw: pypto.Tensor((nl * c, 1), pypto.DT_FP32),
                        w1: pypto.Tensor((nl * i, d), pypto.DT_INT8),
                        s1: pypto.Tensor((nl, i), pypto.DT_FP32),
                        w3: pypto.Tensor((nl * i, d), pypto.DT_INT8),
                        s3: pypto.Tensor((nl, i), pypto.DT_FP32),
                        w2: pypto.Tensor((nl * d, i), pypto.DT_INT8),
                        s2: pypto.Tensor((nl, d), pypto.DT_FP32),
                        y: pypto.Tensor((nl * c, d), pypto.DT_BF16)):
        """y[e, :rows[e]] = bf16(SwiGLU-W8A8_e(x[e, :rows[e]]) · w[e]) per local expert."""
        for e in active:
            body(pypto, e, rows, c, d, i, ct, limit, (x, xs, rw, w1, s1, w3, s3, w2, s2), y)

    return expert_routed_k


def _launch_routed(rows: tuple[int, ...], c: int, d: int, i: int, limit: float,
                   verify: bool, tensors: list[torch.Tensor]) -> LatencyRecord | None:
    if not any(rows):
        return None  # nothing received: no kernel, no weight traffic
    return rt.launch(_routed_kernel(rows, c, d, i, float(limit), verify), *tensors,
                     name="expert_routed")


def expert_routed(recv_x: torch.Tensor, recv_scale: torch.Tensor, recv_w: torch.Tensor,
                  recv_count: torch.Tensor, w: ExpertWeights, swiglu_limit: float
                  ) -> tuple[torch.Tensor, LatencyRecord | None]:
    """recv_x [NL,C,D] INT8, recv_scale/recv_w [NL,C] FP32, recv_count [NL] ->
    (recv_y [NL,C,D] BF16, latency); rows >= recv_count[e] are exactly 0.

    The kernel is specialised to the received counts (`routed_rows`): expert e computes
    its count rounded up to 16 rows, and an expert with no rows is not computed (latency
    None when no expert received anything). Rows between the count and the 16-row bound
    get scale 0 and weight 0 on the host, which makes their y exactly 0 whatever the
    (dirty) recv_x tail holds; rows the kernel does not compute are zeroed on the host.
    """
    nl, c, d = recv_x.shape
    w1, w1_scale, w3, w3_scale, w2, w2_scale = w
    d_w, i = check_weights(w1, w3, w2, (nl,))
    if d_w != d or recv_x.dtype != torch.int8:
        raise ValueError(f"recv_x must be [NL,C,{d_w}] int8, got {tuple(recv_x.shape)} "
                         f"{recv_x.dtype}")
    counts = recv_count.reshape(-1).to(torch.int64)
    if counts.numel() != nl:
        raise ValueError(f"recv_count must have {nl} entries, got {counts.numel()}")
    rows = routed_rows(counts.tolist(), c)
    valid = torch.arange(c)[None, :] < counts[:, None]                     # [NL, C]
    f32 = torch.float32
    xs = torch.where(valid, recv_scale.to(f32), torch.zeros((), dtype=f32))
    rw = torch.where(valid, recv_w.to(f32), torch.zeros((), dtype=f32))
    y = torch.zeros(nl * c, d, dtype=torch.bfloat16)
    lat = _launch_routed(rows, c, d, i, swiglu_limit, True, [
        recv_x.reshape(nl * c, d).contiguous(), xs.reshape(nl * c, 1).contiguous(),
        rw.reshape(nl * c, 1).contiguous(), w1.reshape(nl * i, d).contiguous(),
        w1_scale.to(f32).contiguous(), w3.reshape(nl * i, d).contiguous(),
        w3_scale.to(f32).contiguous(), w2.reshape(nl * d, i).contiguous(),
        w2_scale.to(f32).contiguous(), y])
    y = y.reshape(nl, c, d)
    y[~valid] = 0  # rows the kernel did not compute hold whatever the interpreter left
    return y, lat


def expert_routed_latency(rows: tuple[int, ...], capacity: int, hidden: int,
                          intermediate: int, swiglu_limit: float) -> LatencyRecord | None:
    """SIM latency of the routed kernel specialised to `rows` (per local expert, from
    `routed_rows`), WITHOUT the CPU interpreter: every input is uninitialised
    (torch.empty; the cost model does not read values), so weights of any size cost no
    memory. None when no expert has rows."""
    nl, c, d, i = len(rows), capacity, hidden, intermediate
    e = torch.empty
    i8, f32 = torch.int8, torch.float32
    return _launch_routed(tuple(rows), c, d, i, swiglu_limit, False, [
        e(nl * c, d, dtype=i8), e(nl * c, 1, dtype=f32), e(nl * c, 1, dtype=f32),
        e(nl * i, d, dtype=i8), e(nl, i, dtype=f32), e(nl * i, d, dtype=i8),
        e(nl, i, dtype=f32), e(nl * d, i, dtype=i8), e(nl, d, dtype=f32),
        e(nl * c, d, dtype=torch.bfloat16)])
