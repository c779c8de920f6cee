"""PyptoBackend: every StageBackend method through its registry kernel (SIM on CPU, NPU on
Ascend).

Same signatures and dtypes as TorchBackend. Each kernel returns (output, LatencyRecord);
the record is appended to `self.latencies` as (stage, record) so a caller can show what a
layer cost, per stage and (with one backend per rank) per rank.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import ModelConfig, Routing
from ..stages import STAGES
from ..types import ExpertWeights, GateOut, PackedRoutes
from .runtime import LatencyRecord


class PyptoBackend:
    """Stage kernels in pypto 0.2.0; numbers from the CPU interpreter in SIM mode."""

    name = "pypto"

    def __init__(self) -> None:
        self.latencies: list[tuple[str, LatencyRecord | None]] = []

    def _run(self, stage: str, *args: Any) -> Any:
        out, lat = STAGES[stage].kernel()(*args)
        self.latencies.append((stage, lat))
        return out

    def hc_pre(self, x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor,
               hc_base: torch.Tensor, cfg: ModelConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._run("hc_pre", x_hc, hc_fn, hc_scale, hc_base, cfg)

    def gate(self, x_mixed: torch.Tensor, norm_w: torch.Tensor, gate_w: torch.Tensor,
             gate_bias: torch.Tensor, tid2eid: torch.Tensor, input_ids: torch.Tensor,
             cfg: ModelConfig, routing: Routing) -> GateOut:
        return self._run("gate", x_mixed, norm_w, gate_w, gate_bias, tid2eid, input_ids,
                         cfg, routing)

    def expert_shared(self, x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                      w: ExpertWeights, swiglu_limit: float) -> torch.Tensor:
        return self._run("expert_shared", x_norm_i8, x_norm_scale, w, swiglu_limit)

    def expert_routed(self, recv_x: torch.Tensor, recv_scale: torch.Tensor,
                      recv_w: torch.Tensor, recv_count: torch.Tensor,
                      w: ExpertWeights, swiglu_limit: float) -> torch.Tensor:
        return self._run("expert_routed", recv_x, recv_scale, recv_w, recv_count, w,
                         swiglu_limit)

    def pack_routes(self, x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor,
                    weights: torch.Tensor, route_ids: torch.Tensor) -> PackedRoutes:
        return self._run("pack_routes", x_norm_i8, x_norm_scale, weights, route_ids)

    def scatter_routes(self, rows: torch.Tensor, route_ids: torch.Tensor,
                       n_routes: int) -> torch.Tensor:
        return self._run("scatter_routes", rows, route_ids, n_routes)

    def reduce_routes(self, sh: torch.Tensor, routed_y_buf: torch.Tensor,
                      k: int) -> torch.Tensor:
        return self._run("reduce_routes", sh, routed_y_buf, k)

    def hc_post(self, ffn_out: torch.Tensor, x_hc: torch.Tensor, post: torch.Tensor,
                comb: torch.Tensor) -> torch.Tensor:
        return self._run("hc_post", ffn_out, x_hc, post, comb)
