"""The shared W8A8 SwiGLU expert (spec §2.4 expert_shared) as a pypto kernel.

The math is `ffn.swiglu_rows`, over every token of the rank; this module holds only the
shared expert's tiling, which is tuned apart from the routed kernel's (its own module, so
that its timings in the SIM cache are keyed apart from expert_routed's).
"""
# No `from __future__ import annotations`: pypto reads kernel annotations as objects.
import functools

import torch

from ..types import ExpertWeights
from . import runtime as rt
from .ffn import COL_TILE, ROW_TILE, check_weights, cube_tiles, swiglu_rows
from .runtime import LatencyRecord
from .tiling import divisor_tile

# Tuning constants; what was measured for each is in docs/kernel-tuning.md.
#: N tile of the shared expert's w2 matmul: the widest 32-aligned panel whose tasks fill
#: the 24 cube cores in one wave (each task reloads the whole activation).
SHARED_W2_N = 192
#: N tile of the shared expert's w1/w3 matmuls: two tiles per task that share the
#: activation in L1.
SHARED_W13_N = 192
#: Row tile of the shared expert's SwiGLU/Q8 phase: at 2 rows the Q8's final cast stays
#: in the SwiGLU task instead of becoming its own phase.
SHARED_H_ROW_TILE = 2


@functools.lru_cache(maxsize=16)
def _shared_kernel(t: int, d: int, i: int, limit: float):
    pypto = rt.ensure_ready()
    rt_ = divisor_tile("tokens", t, ROW_TILE)
    rt_h = divisor_tile("tokens", t, SHARED_H_ROW_TILE)
    ct = divisor_tile("min(hidden, intermediate)", min(d, i), COL_TILE)
    swiglu = swiglu_rows
    tiles = cube_tiles
    w2_n = SHARED_W2_N

    @pypto.frontend.jit(**rt.jit_options())
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
        pypto.set_vec_tile_shapes(rt_h, ct)
        tiles(pypto, t, (d, i), SHARED_W13_N)
        y = swiglu(pypto, x, xs, w1, s1, w3, s3, w2, s2, limit,
                   w2_tiles=(t, (d, i), w2_n, (rt_, ct)))
        sh[:] = pypto.cast(y, pypto.DT_BF16, pypto.CastMode.CAST_RINT)

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
