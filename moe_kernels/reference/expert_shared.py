"""expert_shared: the one shared expert per token, no communication (spec §2.4)."""
from __future__ import annotations

import torch

from ..numerics import bf16_rint
from ..types import ExpertWeights
from .ffn import swiglu_int8_ffn


def expert_shared(x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                  w: ExpertWeights, swiglu_limit: float) -> torch.Tensor:
    """x_norm_i8 [T,D] INT8, x_norm_scale [T,1] FP32 -> sh [T,D] BF16 (W8A8 SwiGLU, §2.4)."""
    return bf16_rint(swiglu_int8_ffn(x_norm_i8, x_norm_scale, *w, swiglu_limit))
