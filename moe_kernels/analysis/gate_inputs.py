"""Gate inputs and routing without the routed expert weights.

`fixtures.make_weights` builds every routed expert (about 800 MB of INT8 for the demo
preset); routing only needs hc_pre's and the gate's weights, which
`fixtures.make_gate_weights` builds alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig, RunConfig
from ..fixtures import GateWeights, make_gate_weights, make_inputs
from ..reference.gate import gate, gate_scores
from ..reference.hc_pre import hc_pre


def gate_weights(cfg: ModelConfig, seed: int = 0) -> GateWeights:
    """hc_pre + gate weights identical to `make_weights(cfg, seed)`'s, built cheaply."""
    return make_gate_weights(cfg, seed)


@dataclass(frozen=True)
class RoutingSample:
    """Gate outputs of every rank's tokens, for both routes (leading rank axis)."""

    score: torch.Tensor          # [R, T, E] FP32 unbiased sqrt-softplus scores
    biased: torch.Tensor         # [R, T, E] FP32 score + gate_bias (selection only)
    hash_indices: torch.Tensor   # [R, T, K] INT32 global ids, hash route
    hash_weights: torch.Tensor   # [R, T, K] FP32
    sort_indices: torch.Tensor   # [R, T, K] INT32 global ids, sort route (top-k biased)
    sort_weights: torch.Tensor   # [R, T, K] FP32

    def indices(self, routing: str) -> torch.Tensor:
        """The [R,T,K] indices of route 'hash' or 'sort'."""
        if routing not in ("hash", "sort"):
            raise ValueError(f"routing must be one of ['hash', 'sort'], got {routing!r}")
        return self.hash_indices if routing == "hash" else self.sort_indices

    def weights(self, routing: str) -> torch.Tensor:
        """The [R,T,K] routing weights of route 'hash' or 'sort'."""
        if routing not in ("hash", "sort"):
            raise ValueError(f"routing must be one of ['hash', 'sort'], got {routing!r}")
        return self.hash_weights if routing == "hash" else self.sort_weights


def route_tokens(run: RunConfig, seed: int = 0,
                 weights: GateWeights | None = None) -> RoutingSample:
    """hc_pre -> gate on every rank's fixture inputs (make_inputs(run, seed)) with both
    routes, using the reference stages; no routed expert weights are built."""
    cfg = run.model
    w = weights if weights is not None else gate_weights(cfg, seed)
    inputs = make_inputs(run, seed)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in RoutingSample.__dataclass_fields__}
    for r in range(run.ranks):
        x_mixed, _, _ = hc_pre(inputs.x_hc[r], w.hc_fn, w.hc_scale, w.hc_base, cfg)
        for routing in ("hash", "sort"):
            g = gate(x_mixed, w.norm_w, w.gate_w, w.gate_bias, w.tid2eid,
                     inputs.input_ids[r], cfg, routing)
            out[f"{routing}_indices"].append(g.indices)
            out[f"{routing}_weights"].append(g.weights)
        score, biased = gate_scores(g.x_norm.to(torch.float32), w.gate_w, w.gate_bias)
        out["score"].append(score)
        out["biased"].append(biased)
    return RoutingSample(**{k: torch.stack(v) for k, v in out.items()})
