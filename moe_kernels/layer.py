"""The single-card layer (spec §2.10): every rank's tokens through one card holding all
routed experts. This is the contract the EP program must match bit for bit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .backend import StageBackend, TorchBackend
from .config import RunConfig
from .fixtures import Inputs, Weights
from .reference.dispatch_combine import dispatch_single

if TYPE_CHECKING:  # annotation only: ep imports this module at run time
    from .ep.layout import DispatchLayout

#: Per-rank intermediate tensors recorded for every run (the dump's `stages`).
STAGE_KEYS: tuple[str, ...] = ("x_mixed", "post", "comb", "x_norm", "x_norm_i8",
                               "x_norm_scale", "indices", "weights", "sh", "ffn_out")


@dataclass
class LayerResult:
    """x_next [R,B,S,hc,D] BF16 and the per-rank stage tensors (leading rank axis).

    EP runs also carry `layout` (where every route went) and `dropped` [R,NL] (routes
    beyond capacity, zeros unless overflow="drop"); both are None for the single card.
    """

    run: RunConfig
    x_next: torch.Tensor
    stages: dict[str, torch.Tensor]
    layout: DispatchLayout | None = None
    dropped: torch.Tensor | None = None

    def expert_load(self) -> torch.Tensor:
        """Routes per global expert, summed over ranks: [E] INT64."""
        return torch.bincount(self.stages["indices"].reshape(-1).to(torch.int64),
                              minlength=self.run.model.n_routed_experts)


def front_stages(run: RunConfig, x_hc: torch.Tensor, input_ids: torch.Tensor,
                 weights: Weights, backend: StageBackend) -> dict[str, torch.Tensor]:
    """hc_pre -> gate -> expert_shared for one rank's tokens (no communication)."""
    cfg = run.model
    x_mixed, post, comb = backend.hc_pre(x_hc, weights.hc_fn, weights.hc_scale,
                                         weights.hc_base, cfg)
    g = backend.gate(x_mixed, weights.norm_w, weights.gate_w, weights.gate_bias,
                     weights.tid2eid, input_ids, cfg, run.routing)
    sh = backend.expert_shared(g.x_norm_i8, g.x_norm_scale, weights.shared,
                               cfg.swiglu_limit)
    return {"x_mixed": x_mixed, "post": post, "comb": comb, **g._asdict(), "sh": sh}


def run_rank_single_card(run: RunConfig, x_hc: torch.Tensor, input_ids: torch.Tensor,
                         weights: Weights, backend: StageBackend | None = None
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One rank's tokens [B,S,...] through the whole layer on one card with all experts.
    Returns (stage tensors, x_next [B,S,hc,D])."""
    backend = backend or TorchBackend()
    cfg = run.model
    st = front_stages(run, x_hc, input_ids, weights, backend)
    k = cfg.num_experts_per_tok
    recv = dispatch_single(st["indices"], st["x_norm_i8"], st["x_norm_scale"],
                           st["weights"], n_local=cfg.n_routed_experts)
    recv_y = backend.expert_routed(recv.x, recv.scale, recv.weight, recv.count,
                                   weights.routed_shard(0, cfg.n_routed_experts),
                                   cfg.swiglu_limit)
    n = recv.count.tolist()
    rows = torch.cat([recv_y[e, :c] for e, c in enumerate(n)])
    routes = torch.cat([recv.route[e, :c] for e, c in enumerate(n)])
    buf = backend.scatter_routes(rows, routes, run.tokens * k)
    ffn_out = backend.reduce_routes(st["sh"], buf, k).reshape(run.batch, run.seq, -1)
    st["ffn_out"] = ffn_out
    x_next = backend.hc_post(ffn_out, x_hc, st["post"], st["comb"])
    return st, x_next


def reference_layer(run: RunConfig, inputs: Inputs, weights: Weights,
                    backend: StageBackend | None = None) -> LayerResult:
    """Every rank's tokens through the single-card layer; stacked along a rank axis."""
    per_rank = [run_rank_single_card(run, inputs.x_hc[r], inputs.input_ids[r], weights,
                                     backend) for r in range(run.ranks)]
    stages = {k: torch.stack([st[k] for st, _ in per_rank]) for k in STAGE_KEYS}
    x_next = torch.stack([x for _, x in per_rank])
    return LayerResult(run=run, x_next=x_next, stages=stages)
