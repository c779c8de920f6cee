"""PyptoBackend: every StageBackend method through a pypto kernel (SIM on CPU, NPU on Ascend).

Same signatures and dtypes as TorchBackend. Each call's SIM latency record is appended to
`self.latencies` as (stage, LatencyRecord | None) so a notebook can show what a layer cost.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig, Routing
from ..types import ExpertWeights, GateOut, PackedRoutes
from . import ffn, hc, routes
from . import gate as gate_k
from .runtime import LatencyRecord


class PyptoBackend:
    """Stage kernels in pypto 0.2.0; numbers from the CPU interpreter in SIM mode."""

    name = "pypto"

    def __init__(self) -> None:
        self.latencies: list[tuple[str, LatencyRecord | None]] = []

    def _log(self, stage: str, lat: LatencyRecord | None) -> None:
        self.latencies.append((stage, lat))

    def hc_pre(self, x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor,
               hc_base: torch.Tensor, cfg: ModelConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, lat = hc.hc_pre(x_hc, hc_fn, hc_scale, hc_base, cfg)
        self._log("hc_pre", lat)
        return out

    def gate(self, x_mixed: torch.Tensor, norm_w: torch.Tensor, gate_w: torch.Tensor,
             gate_bias: torch.Tensor, tid2eid: torch.Tensor, input_ids: torch.Tensor,
             cfg: ModelConfig, routing: Routing) -> GateOut:
        out, lat = gate_k.gate(x_mixed, norm_w, gate_w, gate_bias, tid2eid, input_ids, cfg,
                               routing)
        self._log("gate", lat)
        return out

    def expert_shared(self, x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                      w: ExpertWeights, swiglu_limit: float) -> torch.Tensor:
        out, lat = ffn.expert_shared(x_norm_i8, x_norm_scale, w, swiglu_limit)
        self._log("expert_shared", lat)
        return out

    def expert_routed(self, recv_x: torch.Tensor, recv_scale: torch.Tensor,
                      recv_w: torch.Tensor, recv_count: torch.Tensor,
                      w: ExpertWeights, swiglu_limit: float) -> torch.Tensor:
        out, lat = ffn.expert_routed(recv_x, recv_scale, recv_w, recv_count, w,
                                     swiglu_limit)
        self._log("expert_routed", lat)
        return out

    def pack_routes(self, x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                    weights: torch.Tensor, route_ids: torch.Tensor) -> PackedRoutes:
        out, lat = routes.pack_routes(x_norm_i8, x_norm_scale, weights, route_ids)
        self._log("pack_routes", lat)
        return out

    def scatter_routes(self, rows: torch.Tensor, route_ids: torch.Tensor,
                       n_routes: int) -> torch.Tensor:
        out, lat = routes.scatter_routes(rows, route_ids, n_routes)
        self._log("scatter_routes", lat)
        return out

    def reduce_routes(self, sh: torch.Tensor, routed_y_buf: torch.Tensor,
                      k: int) -> torch.Tensor:
        out, lat = routes.reduce_routes(sh, routed_y_buf, k)
        self._log("reduce_routes", lat)
        return out

    def hc_post(self, ffn_out: torch.Tensor, x_hc: torch.Tensor, post: torch.Tensor,
                comb: torch.Tensor) -> torch.Tensor:
        out, lat = hc.hc_post(ffn_out, x_hc, post, comb)
        self._log("hc_post", lat)
        return out
