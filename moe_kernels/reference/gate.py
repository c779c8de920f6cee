"""gate: FFN RMSNorm, per-token INT8, sqrt-softplus scores and top-k routing (spec §2.3)."""
from __future__ import annotations

import torch

from ..config import ModelConfig, Routing
from ..numerics import bf16_rint, matmul_f32, quantize_rows_int8, sum_f32
from ..types import GateOut


def ffn_norm(x_mixed: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    """x_norm = bf16(x · rsqrt(mean(x^2) + eps) · norm_w), x_mixed [B,S,D] -> [T,D] BF16."""
    x = x_mixed.to(torch.float32).reshape(-1, x_mixed.shape[-1])
    inv = torch.rsqrt(sum_f32(x * x, dim=-1) / x.shape[-1] + eps)
    return bf16_rint(x * inv * norm_w)


def softplus_f32(z: torch.Tensor) -> torch.Tensor:
    """softplus(z) = max(z, 0) + log(1 + exp(-|z|)), as the kernel writes it (spec §2.3)."""
    z64 = z.to(torch.float64)
    tail = torch.log(1.0 + torch.exp(-z64.abs())).to(torch.float32)
    return torch.clamp(z, min=0.0) + tail


def gate_scores(xg: torch.Tensor, gate_w: torch.Tensor, gate_bias: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, biased) [T,E] FP32: score = sqrt(softplus(xg @ gate_w^T)), biased = score + bias.
    The bias only selects experts; the weights use the unbiased score."""
    z = matmul_f32(xg, gate_w.to(torch.float32))
    score = torch.sqrt(softplus_f32(z))
    return score, score + gate_bias


def select_sort(biased: torch.Tensor, k: int) -> torch.Tensor:
    """First k of a stable descending sort of `biased`: ties go to the lower expert id."""
    return torch.argsort(-biased, dim=-1, stable=True)[:, :k].to(torch.int32)


def select_hash(tid2eid: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """indices[t] = tid2eid[input_ids[t]] (hash layers)."""
    ids = input_ids.reshape(-1).to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= tid2eid.shape[0]):
        raise ValueError(f"input_ids must lie in [0, {tid2eid.shape[0]}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return tid2eid[ids].to(torch.int32)


def routing_weights(score: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """weights[t,k] = score[t, idx_k] / Σ_k' score[t, idx_k'] · scale, summed k = 0..K-1."""
    picked = torch.gather(score, 1, indices.to(torch.int64))
    total = picked[:, 0:1]
    for k in range(1, picked.shape[1]):
        total = total + picked[:, k:k + 1]
    return picked / total * scale


def gate(x_mixed: torch.Tensor, norm_w: torch.Tensor, gate_w: torch.Tensor,
         gate_bias: torch.Tensor, tid2eid: torch.Tensor, input_ids: torch.Tensor,
         cfg: ModelConfig, routing: Routing) -> GateOut:
    """x_mixed [B,S,D] BF16 -> GateOut. Routing over all n_routed_experts (global)."""
    x_norm = ffn_norm(x_mixed, norm_w, cfg.rms_norm_eps)
    xg = x_norm.to(torch.float32)
    x_norm_i8, x_norm_scale = quantize_rows_int8(xg)
    score, biased = gate_scores(xg, gate_w, gate_bias)
    k = cfg.num_experts_per_tok
    if routing == "hash":
        indices = select_hash(tid2eid, input_ids)
    elif routing == "sort":
        indices = select_sort(biased, k)
    else:
        raise ValueError(f"routing must be 'hash' or 'sort', got {routing!r}")
    if indices.shape[1] != k:
        raise ValueError(f"routing produced {indices.shape[1]} experts per token, expected {k}")
    weights = routing_weights(score, indices, cfg.routed_scaling_factor)
    return GateOut(x_norm, x_norm_i8, x_norm_scale, indices, weights)
