"""The shared W8A8 SwiGLU expert (spec §2.4 expert_shared) as a pypto kernel.

The math is `ffn.swiglu_rows`'s, op for op, over every token of the rank, written out here
with the shared expert's own tiling, which is tuned apart from the routed kernel's (its own
module, so that its timings in the SIM cache are keyed apart from expert_routed's): cube
tiles with their own activation K, the SwiGLU in two I-chunks when the w1/w3 tiles take two
cube waves (the first chunk's SwiGLU runs under the second wave; the Q8's row amax is the
max of the chunks' amaxes), w2 panels that narrow in the order their tasks start, and a
dequant tile per w2 panel (it runs under the w2 tasks).
"""
# No `from __future__ import annotations`: pypto reads kernel annotations as objects.
import functools

import torch

from ..types import ExpertWeights
from . import runtime as rt
from .ffn import (
    COL_TILE,
    FFN_CUBE_M,
    check_weights,
    cube_tile_sizes,
    swiglu_h,
    w2_dequant,
)
from .q8 import q8_apply, q8_scales
from .runtime import LatencyRecord
from .tiling import divisor_tile

# Tuning constants; what was measured for each is in docs/kernel-tuning.md.
#: N tile of the shared expert's w2 matmul: the widest 32-aligned panel whose tasks fill
#: the 24 cube cores in one wave (each task reloads the whole activation).
SHARED_W2_N = 192
#: w2 panels (N tile, tasks) in the order the AICPU starts them when the w2 tasks fit one
#: cube wave: it starts one every ~0.2 µs after the Q8 phase (~4.6 µs in all), so the later
#: tasks get narrower panels and end with the first ones; 12·192 + 8·160 + 4·128 = 4096.
SHARED_W2_TIERS = ((SHARED_W2_N, 12), (160, 8), (128, 4))
#: N tile of the shared expert's w1/w3 matmuls, one tile per cube task: 2 x 11 tiles
#: fill one wave at flash (I = 2048), 2 x 22 take two at demo (see `_chunks`).
SHARED_W13_N = 192
#: Row tile of the SwiGLU/Q8 phase when it is one phase: at 2 rows the Q8's final cast
#: stays in the SwiGLU task instead of becoming its own phase.
SHARED_H_ROW_TILE = 2
#: K of the activation per L1 fill (the weights keep FFN_CUBE_K1): [128, 2048] INT8 is
#: 256 KiB next to a 192 KiB weight fill, and a task loads it 2-4 times instead of 4-7.
SHARED_CUBE_KA1 = 2048
#: Cube cores of the 910B: when the w1/w3 tiles (one per task) need two waves, the first
#: wave is the I-chunk whose SwiGLU runs under the second (SHARED_H0_ROW_TILE).
SHARED_CUBE_CORES = 24
#: Row tiles of the two-wave form: the first I-chunk's SwiGLU (h and its row amax,
#: written to GM) runs in 8-row tasks while the cube computes the second chunk; the
#: second chunk's SwiGLU and the Q8 of both chunks run in 4-row tasks after it. The two
#: row tiles must differ, or the partitioner fuses the chunks into one phase again.
SHARED_H0_ROW_TILE, SHARED_H1_ROW_TILE = 8, 4
#: Row tile of the dequant, whose column tile is the w2 panel (`_w2_panels`): each dequant
#: task waits for its own w2 task only and runs beside the other w2 tasks.
SHARED_Y_ROW_TILE = 64


def _cube_tiles(pypto, m: int, k: int, n: int) -> None:
    """Cube tiles [M, K] x [N, K]^T: ffn.cube_tile_sizes' M / K0 / weight K1, and the
    activation K per L1 fill (SHARED_CUBE_KA1) apart."""
    mt, k0, k1 = cube_tile_sizes(m, k)
    ka1 = k1 * divisor_tile("matmul K / K1", k // k1, max(1, SHARED_CUBE_KA1 // k1))
    pypto.set_cube_tile_shapes([mt, mt], [k0, ka1, k1], [n, n])


def _chunks(t: int, d: int, i: int) -> tuple[tuple[int, int, int, int], ...]:
    """The I-chunks (offset, width, vector rows, vector columns) of the SwiGLU/Q8: one
    chunk when the w1/w3 tiles fit one cube wave, else the first wave's columns and the
    rest."""
    c0 = SHARED_CUBE_CORES // 2 * SHARED_W13_N   # w1 and w3 tiles of the first wave
    if 2 * -(-i // SHARED_W13_N) <= SHARED_CUBE_CORES:   # then also i <= c0
        ct = divisor_tile("min(hidden, intermediate)", min(d, i), COL_TILE)
        return ((0, i, divisor_tile("tokens", t, SHARED_H_ROW_TILE), ct),)
    return ((0, c0, divisor_tile("tokens", t, SHARED_H0_ROW_TILE), c0),
            (c0, i - c0, divisor_tile("tokens", t, SHARED_H1_ROW_TILE), i - c0))


def _w2_panels(t: int, d: int) -> tuple[tuple[int, int, int], ...]:
    """The w2 output columns as (offset, width, N tile) panels: SHARED_W2_TIERS when the
    T rows and D columns fit their one cube wave, else SHARED_W2_N throughout."""
    tasks = -(-t // FFN_CUBE_M) * sum(k for _, k in SHARED_W2_TIERS)
    if tasks > SHARED_CUBE_CORES or d > sum(n * k for n, k in SHARED_W2_TIERS):
        return ((0, d, SHARED_W2_N),)
    panels, off = [], 0
    for n, k in SHARED_W2_TIERS:
        width = min(n * k, d - off)
        if width > 0:
            panels.append((off, width, n))
            off += width
    return tuple(panels)


def _swiglu_chunk(pypto, ins: tuple, limit: float, chunk: tuple[int, int, int, int]):
    """(h, row amax of |h|) over intermediate columns [off, off + n), h = silu(g)·u with
    ffn.swiglu_rows' ops in the same order, on views of w1 / w3 / s1 / s3."""
    x, xs, w1, s1, w3, s3 = ins
    off, n, rows, cols = chunk
    d = x.shape[1]
    pypto.set_vec_tile_shapes(rows, cols)
    _cube_tiles(pypto, x.shape[0], d, SHARED_W13_N)
    h = swiglu_h(pypto, x, xs, pypto.view(w1, [n, d], [off, 0]),
                 pypto.view(s1, [1, n], [0, off]),
                 pypto.view(w3, [n, d], [off, 0]), pypto.view(s3, [1, n], [0, off]), limit)
    return h, pypto.amax(pypto.abs(h), -1, keepdim=True)


def _shared_body(pypto, ins: tuple, sh, limit: float, chunks: tuple) -> None:
    """sh = bf16(SwiGLU-W8A8(x)) with the SwiGLU/Q8 in I-chunks (`_chunks`). The Q8 is
    q8.quantize_rows_q8's: its row amax is the max of the chunks' row amaxes (a max is
    exact in any order), and every chunk is quantised with the same scale."""
    x, xs, w1, s1, w3, s3, w2, s2 = ins
    t = x.shape[0]
    parts = [_swiglu_chunk(pypto, (x, xs, w1, s1, w3, s3), limit, c) for c in chunks]
    amax = parts[0][1]
    for _, a in parts[1:]:
        amax = pypto.maximum(amax, a)
    qs, h_scale = q8_scales(pypto, amax)
    q = []
    for (h, _), c in zip(parts, chunks, strict=True):
        pypto.set_vec_tile_shapes(chunks[-1][2], c[3])   # in the last chunk's tasks
        q.append(q8_apply(pypto, h, qs))
    h_i8 = q[0] if len(q) == 1 else pypto.concat(q, -1)
    d, i = w2.shape
    for off, width, n in _w2_panels(t, d):   # each dequant tile is its w2 panel's
        _cube_tiles(pypto, t, i, n)
        pypto.set_vec_tile_shapes(divisor_tile("tokens", t, SHARED_Y_ROW_TILE), n)
        y = w2_dequant(pypto, h_i8, h_scale, pypto.view(w2, [width, i], [off, 0]),
                       pypto.view(s2, [1, width], [0, off]))
        pypto.assemble(pypto.cast(y, pypto.DT_BF16, pypto.CastMode.CAST_RINT), [0, off], sh)


@functools.lru_cache(maxsize=16)
def _shared_kernel(t: int, d: int, i: int, limit: float):
    pypto = rt.ensure_ready()
    chunks = _chunks(t, d, i)
    body = _shared_body
    # one w1/w3 tile per cube task (pypto would pair the tiles that share the activation
    # into 22 tasks at demo): the first wave is then exactly the first chunk's tiles
    opts = {**rt.jit_options(), "pass_options": {"cube_l1_reuse_setting": {-1: 1}}}

    @pypto.frontend.jit(**opts)
    def expert_shared_k(x: pypto.Tensor((t, d), pypto.DT_INT8),
                        xs: pypto.Tensor((t, 1), pypto.DT_FP32),
                        w1: pypto.Tensor((i, d), pypto.DT_INT8),
                        s1: pypto.Tensor((1, i), pypto.DT_FP32),
                        w3: pypto.Tensor((i, d), pypto.DT_INT8),
                        s3: pypto.Tensor((1, i), pypto.DT_FP32),
                        w2: pypto.Tensor((d, i), pypto.DT_INT8),
                        s2: pypto.Tensor((1, d), pypto.DT_FP32),
                        sh: pypto.Tensor((t, d), pypto.DT_BF16)):
        """sh = bf16(SwiGLU-W8A8(x))."""
        body(pypto, (x, xs, w1, s1, w3, s3, w2, s2), sh, limit, chunks)

    return expert_shared_k


def expert_shared(x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                  w: ExpertWeights, swiglu_limit: float
                  ) -> tuple[torch.Tensor, LatencyRecord | None]:
    """x_norm_i8 [T,D] INT8, x_norm_scale [T,1] FP32 -> (sh [T,D] BF16, latency)."""
    w1, w1_scale, w3, w3_scale, w2, w2_scale = w
    d, i = check_weights(w1, w3, w2, ())
    if x_norm_i8.dim() != 2 or x_norm_i8.shape[1] != d or x_norm_i8.dtype != torch.int8:
        raise ValueError(f"x_norm_i8 must be [T,{d}] int8, got {tuple(x_norm_i8.shape)} "
                         f"{x_norm_i8.dtype}")
    t = x_norm_i8.shape[0]
    sh = torch.empty(t, d, dtype=torch.bfloat16)
    f32 = torch.float32
    lat = rt.launch(_shared_kernel(t, d, i, float(swiglu_limit)), x_norm_i8.contiguous(),
                    x_norm_scale.to(f32).reshape(t, 1).contiguous(), w1.contiguous(),
                    w1_scale.to(f32).reshape(1, i).contiguous(), w3.contiguous(),
                    w3_scale.to(f32).reshape(1, i).contiguous(), w2.contiguous(),
                    w2_scale.to(f32).reshape(1, d).contiguous(), sh, name="expert_shared")
    return sh, lat
