"""The W8A8 SwiGLU expert FFN shared by expert_shared and expert_routed (spec §2.4, §2.7).

g = (x_i8 · w1^T)_INT32 · xs · s1, u likewise with w3; optional clamp
g <- min(g, L), u <- clamp(u, -L, L) when L > 0; h = silu(g)·u; (h_i8, hs) = Q8(h);
y = (h_i8 · w2^T)_INT32 · hs · s2 [· row_weight]. Products are taken left to right in
FP32. Every step is row-local, so a row's result does not depend on its neighbours.
"""
from __future__ import annotations

import torch

from ..numerics import int8_matmul_i32, quantize_rows_int8, silu_f32


def swiglu_int8_ffn(x_i8: torch.Tensor, xs: torch.Tensor,
                    w1: torch.Tensor, s1: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor,
                    w2: torch.Tensor, s2: torch.Tensor, swiglu_limit: float,
                    row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """x_i8 [M,D] INT8, xs [M,1] FP32, w1/w3 [I,D] INT8 + [I] FP32, w2 [D,I] INT8 + [D] FP32
    -> y [M,D] FP32 (before the BF16 cast). `row_weight` [M,1] is multiplied after the
    w2 dequantisation (the routing weight, spec §2.7 step 5)."""
    g = int8_matmul_i32(x_i8, w1).to(torch.float32) * xs * s1
    u = int8_matmul_i32(x_i8, w3).to(torch.float32) * xs * s3
    if swiglu_limit > 0:
        g = torch.clamp(g, max=swiglu_limit)
        u = torch.clamp(u, min=-swiglu_limit, max=swiglu_limit)
    h = silu_f32(g) * u
    h_i8, hs = quantize_rows_int8(h)
    y = int8_matmul_i32(h_i8, w2).to(torch.float32) * hs * s2
    if row_weight is not None:
        y = y * row_weight
    return y
