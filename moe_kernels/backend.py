"""Stage backends: one interface, two implementations (torch reference, pypto kernels).

The layer and the EP program call stages only through a `StageBackend`, so swapping
`backend="torch"` for `backend="pypto"` changes who computes, never the data flow.
Every method has the signature and dtypes of the torch reference it names.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .config import ModelConfig, Routing
from .stages import STAGES
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


class TorchBackend:
    """The torch reference stages (the golden), on CPU: each stage's registry reference."""

    name = "torch"

    hc_pre = staticmethod(STAGES["hc_pre"].reference)
    gate = staticmethod(STAGES["gate"].reference)
    expert_shared = staticmethod(STAGES["expert_shared"].reference)
    expert_routed = staticmethod(STAGES["expert_routed"].reference)
    pack_routes = staticmethod(STAGES["pack_routes"].reference)
    scatter_routes = staticmethod(STAGES["scatter_routes"].reference)
    reduce_routes = staticmethod(STAGES["reduce_routes"].reference)
    hc_post = staticmethod(STAGES["hc_post"].reference)


def get_backend(name: str) -> StageBackend:
    """The backend called `name` ("torch" or "pypto"); pypto is imported only when asked."""
    if name == "torch":
        return TorchBackend()
    if name == "pypto":
        from .pto.backend import PyptoBackend  # heavy import, only on request
        return PyptoBackend()
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
