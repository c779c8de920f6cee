"""Single-card dispatch and combine (spec §2.6, §2.8), keyed by route.

Dispatch scans routes in t-major, k-minor order and appends each to its local expert's
rows. Combine writes every expert row back to its route r = t·K + k, so a token that
picks one expert twice keeps both contributions (the token-keyed scratch of §2.8 would
overwrite one), then reduces sh + Σ_k in FP32, k = 0..K-1.
"""
from __future__ import annotations

import torch

from ..numerics import bf16_rint
from ..types import CapacityError, PackedRoutes, RecvBuffers


def dispatch_single(indices: torch.Tensor, x_i8: torch.Tensor, x_scale: torch.Tensor,
                    weights: torch.Tensor, n_local: int, capacity: int | None = None
                    ) -> RecvBuffers:
    """indices [T,K] local expert ids in [0, n_local) -> RecvBuffers.

    capacity None sizes the window to the busiest expert; a given capacity that is too
    small raises CapacityError naming the expert, its count and the capacity.
    """
    t_tokens, k = indices.shape
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_local):
        raise ValueError(f"indices must lie in [0, {n_local}), got range "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    count = torch.bincount(flat, minlength=n_local)
    need = int(count.max()) if count.numel() else 0
    cap = need if capacity is None else capacity
    if need > cap:
        e = int(torch.argmax(count))
        raise CapacityError(f"local expert {e} receives {need} rows, capacity is {cap}")
    # slot of route r = number of earlier routes (scan order) to the same expert
    onehot = torch.nn.functional.one_hot(flat, n_local)
    slot = (torch.cumsum(onehot, dim=0) - onehot).gather(1, flat[:, None]).squeeze(1)
    d = x_i8.shape[-1]
    routes = torch.arange(t_tokens * k)
    tok = routes // k
    buf = RecvBuffers(
        x=torch.zeros(n_local, cap, d, dtype=torch.int8),
        scale=torch.zeros(n_local, cap, dtype=torch.float32),
        weight=torch.zeros(n_local, cap, dtype=torch.float32),
        route=torch.full((n_local, cap), -1, dtype=torch.int32),
        count=count)
    buf.x[flat, slot] = x_i8[tok]
    buf.scale[flat, slot] = x_scale.reshape(-1)[tok]
    buf.weight[flat, slot] = weights.reshape(-1)
    buf.route[flat, slot] = routes.to(torch.int32)
    return buf


def pack_routes(x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                weights: torch.Tensor, route_ids: torch.Tensor) -> PackedRoutes:
    """Gather the four dispatch channels of routes `route_ids` [N] (token = route // K)."""
    k = weights.shape[1]
    r = route_ids.to(torch.int64)
    tok = r // k
    return PackedRoutes(x=torch.index_select(x_norm_i8, 0, tok),
                        scale=torch.index_select(x_norm_scale.reshape(-1), 0, tok),
                        weight=torch.index_select(weights.reshape(-1), 0, r),
                        route=r.to(torch.int32))


def scatter_routes(rows: torch.Tensor, route_ids: torch.Tensor, n_routes: int) -> torch.Tensor:
    """routed_y_buf [n_routes, D]: row route_ids[i] <- rows[i]; each route exactly once."""
    r = route_ids.to(torch.int64)
    if r.numel() != n_routes or not torch.equal(torch.sort(r).values, torch.arange(n_routes)):
        raise RuntimeError(f"scatter_routes needs every route in [0, {n_routes}) exactly "
                           f"once, got {r.numel()} rows")
    out = torch.empty(n_routes, rows.shape[-1], dtype=rows.dtype)
    out[r] = rows
    return out


def reduce_routes(sh: torch.Tensor, routed_y_buf: torch.Tensor, k: int) -> torch.Tensor:
    """ffn_out [T,D] BF16 = bf16(FP32(sh) + Σ_{k=0}^{K-1} FP32(routed_y_buf[t·K + k])) (§3.6)."""
    t_tokens, d = sh.shape
    ys = routed_y_buf.to(torch.float32).reshape(t_tokens, k, d)
    acc = sh.to(torch.float32)
    for j in range(k):
        acc = acc + ys[:, j]
    return bf16_rint(acc)
