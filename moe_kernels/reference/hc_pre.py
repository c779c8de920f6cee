"""hc_pre: hyper-connection pre-mix with Sinkhorn normalisation (spec §2.2)."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..numerics import bf16_rint, matmul_f32, sigmoid_f32, sum_f32


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Spec §2.2 step 6 on [..., hc, hc] FP32 logits: row softmax + eps, column
    normalisation, then (iters - 1) x (row, column) normalisations, each `/(sum + eps)`."""
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def hc_pre(x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor,
           hc_base: torch.Tensor, cfg: ModelConfig
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_hc [B,S,hc,D] BF16 -> (x_mixed [B,S,D] BF16, post [B,S,hc] FP32, comb [B,S,hc,hc] FP32).

    r = rsqrt(mean(X^2) + eps) over the flattened 4D row; mix = r * (X @ fn^T);
    pre = σ(mix·s0 + b) + eps, post = 2σ(mix·s1 + b), comb = sinkhorn(mix·s2 + b);
    x_mixed = bf16(Σ_h pre[h] · x_hc[h]) accumulated in FP32, h = 0..hc-1.
    """
    hc, d = cfg.hc_mult, cfg.hidden_size
    b, s = x_hc.shape[:2]
    if tuple(x_hc.shape) != (b, s, hc, d):
        raise ValueError(f"x_hc must be [B,S,{hc},{d}], got {tuple(x_hc.shape)}")
    xf = x_hc.to(torch.float32).reshape(b * s, hc * d)
    r = torch.rsqrt(sum_f32(xf * xf, dim=-1) / (hc * d) + cfg.rms_norm_eps)
    mix = r * matmul_f32(xf, hc_fn.to(torch.float32))
    pre = sigmoid_f32(mix[:, :hc] * hc_scale[0] + hc_base[:hc]) + cfg.hc_eps
    post = 2.0 * sigmoid_f32(mix[:, hc:2 * hc] * hc_scale[1] + hc_base[hc:2 * hc])
    logits = (mix[:, 2 * hc:] * hc_scale[2] + hc_base[2 * hc:]).reshape(b * s, hc, hc)
    comb = sinkhorn(logits, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    xs = x_hc.to(torch.float32).reshape(b * s, hc, d)
    acc = pre[:, 0:1] * xs[:, 0]
    for h in range(1, hc):
        acc = acc + pre[:, h:h + 1] * xs[:, h]
    x_mixed = bf16_rint(acc).reshape(b, s, d)
    return x_mixed, post.reshape(b, s, hc), comb.reshape(b, s, hc, hc)
