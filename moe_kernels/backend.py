"""Stage backends: one interface, two implementations (torch reference, pypto kernels).

The layer and the EP program call stages only through a `StageBackend`, so swapping
`backend="torch"` for `backend="pypto"` changes who computes, never the data flow.
Every method has the signature and dtypes of the torch reference it names.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .config import ModelConfig, Routing
from .reference import dispatch_combine as _dc
from .reference import expert_routed as _er
from .reference import expert_shared as _es
from .reference import gate as _gate
from .reference import hc_post as _hp
from .reference import hc_pre as _hpre
from .types import ExpertWeights, GateOut, PackedRoutes

BACKENDS: tuple[str, ...] = ("torch", "pypto")


class StageBackend(Protocol):
    name: str

    def hc_pre(self, x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor,
               hc_base: torch.Tensor, cfg: ModelConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def gate(self, x_mixed: torch.Tensor, norm_w: torch.Tensor, gate_w: torch.Tensor,
             gate_bias: torch.Tensor, tid2eid: torch.Tensor, input_ids: torch.Tensor,
             cfg: ModelConfig, routing: Routing) -> GateOut: ...

    def expert_shared(self, x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                      w: ExpertWeights, swiglu_limit: float) -> torch.Tensor: ...

    def expert_routed(self, recv_x: torch.Tensor, recv_scale: torch.Tensor,
                      recv_w: torch.Tensor, recv_count: torch.Tensor,
                      w: ExpertWeights, swiglu_limit: float) -> torch.Tensor: ...

    def pack_routes(self, x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                    weights: torch.Tensor, route_ids: torch.Tensor) -> PackedRoutes: ...

    def scatter_routes(self, rows: torch.Tensor, route_ids: torch.Tensor,
                       n_routes: int) -> torch.Tensor: ...

    def reduce_routes(self, sh: torch.Tensor, routed_y_buf: torch.Tensor,
                      k: int) -> torch.Tensor: ...

    def hc_post(self, ffn_out: torch.Tensor, x_hc: torch.Tensor, post: torch.Tensor,
                comb: torch.Tensor) -> torch.Tensor: ...


def pack_routes_torch(x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                      weights: torch.Tensor, route_ids: torch.Tensor) -> PackedRoutes:
    """Gather the four channels of routes `route_ids` [N] (token = route // K)."""
    k = weights.shape[1]
    r = route_ids.to(torch.int64)
    tok = r // k
    return PackedRoutes(x=torch.index_select(x_norm_i8, 0, tok),
                        scale=torch.index_select(x_norm_scale.reshape(-1), 0, tok),
                        weight=torch.index_select(weights.reshape(-1), 0, r),
                        route=r.to(torch.int32))


def scatter_routes_torch(rows: torch.Tensor, route_ids: torch.Tensor,
                         n_routes: int) -> torch.Tensor:
    """routed_y_buf [n_routes, D]: row route_ids[i] <- rows[i]; each route exactly once."""
    r = route_ids.to(torch.int64)
    if r.numel() != n_routes or not torch.equal(torch.sort(r).values, torch.arange(n_routes)):
        raise RuntimeError(f"scatter_routes needs every route in [0, {n_routes}) exactly "
                           f"once, got {r.numel()} rows")
    out = torch.empty(n_routes, rows.shape[-1], dtype=rows.dtype)
    out[r] = rows
    return out


class TorchBackend:
    """The torch reference stages (the golden), on CPU."""

    name = "torch"

    hc_pre = staticmethod(_hpre.hc_pre)
    gate = staticmethod(_gate.gate)
    expert_shared = staticmethod(_es.expert_shared)
    expert_routed = staticmethod(_er.expert_routed)
    pack_routes = staticmethod(pack_routes_torch)
    scatter_routes = staticmethod(scatter_routes_torch)
    reduce_routes = staticmethod(_dc.reduce_routes)
    hc_post = staticmethod(_hp.hc_post)


def get_backend(name: str) -> StageBackend:
    """The backend called `name` ("torch" or "pypto"); pypto is imported only when asked."""
    if name == "torch":
        return TorchBackend()
    if name == "pypto":
        from .pto.backend import PyptoBackend  # heavy import, only on request
        return PyptoBackend()
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
