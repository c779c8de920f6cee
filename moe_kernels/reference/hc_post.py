"""hc_post: hyper-connection post-mix with the residual (spec §2.9)."""
from __future__ import annotations

import torch

from ..numerics import bf16_rint


def hc_post(ffn_out: torch.Tensor, x_hc: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> torch.Tensor:
    """x_next[t,o] = bf16(post[t,o]·ffn_out[t] + Σ_i comb[t,i,o]·x_hc[t,i]), i = 0..hc-1 in order.

    ffn_out [B,S,D] BF16, x_hc [B,S,hc,D] BF16, post [B,S,hc] FP32, comb [B,S,hc,hc] FP32
    -> x_next [B,S,hc,D] BF16. comb is read transposed (element [i, o]).
    """
    b, s, hc, d = x_hc.shape
    if tuple(ffn_out.shape) != (b, s, d):
        raise ValueError(f"ffn_out must be [{b},{s},{d}], got {tuple(ffn_out.shape)}")
    f = ffn_out.to(torch.float32).unsqueeze(2)                # [B,S,1,D]
    xh = x_hc.to(torch.float32)
    acc = post.unsqueeze(-1) * f                               # [B,S,hc,D]
    for i in range(hc):
        acc = acc + comb[:, :, i, :].unsqueeze(-1) * xh[:, :, i:i + 1, :]
    return bf16_rint(acc)
