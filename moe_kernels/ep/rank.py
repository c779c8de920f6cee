"""One rank's EP program, written once for every transport (spec §2.0, §3.4-§3.7).

hc_pre -> gate -> expert_shared -> count exchange -> plan -> dispatch -> expert_routed
-> combine -> reduce (sh first, then k = 0..K-1) -> hc_post.

Stage compute goes through the `StageBackend`; the exchanges (counts, dispatch, combine)
and the packing of the send rows go through the rank's `RankComm` (the transport
strategy, ep.transport). The program is a generator: a transport whose
exchanges must wait for peers in the same process (`local`) suspends it by yielding a
`Wait`; a transport whose exchanges block in the OS (`gloo`) never yields.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from ..backend import StageBackend
from ..config import RunConfig
from ..fixtures import Weights
from ..layer import STAGE_KEYS, LayerResult, front_stages
from ..types import PackedRoutes
from .layout import RankPlan, layout_from_plans
from .plan import count_routes, finish_plan, presort
from .transport import EpStep, RankComm
from .windows import Wait

#: What a rank program yields while it waits (local transport) and finally returns.
RankGen = Generator[Wait, None, "RankOutput"]


@dataclass
class RankOutput:
    """What one rank hands back: its stage tensors, x_next, and its view of the layout."""

    rank: int
    stages: dict[str, torch.Tensor]
    x_next: torch.Tensor
    table: torch.Tensor
    plan: RankPlan


def rank_program(me: int, run: RunConfig, x_hc: torch.Tensor, input_ids: torch.Tensor,
                 weights: Weights, backend: StageBackend, comm: RankComm,
                 overflow: str) -> RankGen:
    """Rank `me`'s whole layer step; x_hc [B,S,hc,D], input_ids [B,S]."""
    cfg = run.model
    k, n_local, ranks = cfg.num_experts_per_tok, run.n_local, run.ranks
    st = front_stages(run, x_hc, input_ids, weights, backend)
    counts = count_routes(st["indices"], n_local, ranks)
    comm.publish_counts(counts.hist_t)
    # sort and pack while the counts travel: the (dst, e, slot) order needs no offsets
    pre = presort(me, counts)
    packed = comm.pack(backend, st["x_norm_i8"], st["x_norm_scale"], st["weights"],
                       pre.order_t)
    table = yield from comm.collect_counts()
    plan = finish_plan(pre, table, run.recv_max, overflow)  # may raise CapacityError
    if plan.dropped_routes.numel():  # overflow="drop": keep the placed rows only
        keep = plan.slot[pre.order_t] >= 0
        packed = PackedRoutes(*(f[keep] for f in packed))
    recv, handle = yield from comm.dispatch(plan, packed)
    shard = weights.routed_shard(me, n_local)
    recv_y = backend.expert_routed(recv.x, recv.scale, recv.weight, recv.count, shard,
                                   cfg.swiglu_limit)
    routed_y_buf = yield from comm.combine(recv_y, handle)
    ffn_out = backend.reduce_routes(st["sh"], routed_y_buf, k).reshape(run.batch, run.seq, -1)
    st["ffn_out"] = ffn_out
    x_next = backend.hc_post(ffn_out, x_hc, st["post"], st["comb"])
    return RankOutput(rank=me, stages=st, x_next=x_next, table=table, plan=plan)


def step_program(step: EpStep, rank: int, backend: StageBackend, comm: RankComm
                 ) -> RankGen:
    """Rank `rank`'s program for one EpStep."""
    return rank_program(rank, step.run, step.inputs.x_hc[rank], step.inputs.input_ids[rank],
                        step.weights, backend, comm, step.overflow)


def run_to_end(gen: RankGen) -> RankOutput:
    """Drive a rank program whose exchanges never suspend (blocking transports)."""
    try:
        wait = next(gen)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError(f"a blocking transport's rank program suspended on {wait}; "
                       f"only the local transport may yield waits")


def assemble(run: RunConfig, outputs: list[RankOutput]) -> LayerResult:
    """Stack per-rank outputs into a LayerResult with its layout and dropped counts."""
    if [o.rank for o in outputs] != list(range(run.ranks)):
        raise RuntimeError(f"expected one output per rank 0..{run.ranks - 1}, got ranks "
                           f"{[o.rank for o in outputs]}")
    table = outputs[0].table
    for o in outputs[1:]:
        if not torch.equal(o.table, table):
            raise RuntimeError(f"rank {o.rank} saw a different count table than rank 0: "
                               f"the count exchange is broken")
    layout = layout_from_plans(table, [o.plan for o in outputs], run.tokens,
                               run.model.num_experts_per_tok, run.recv_max)
    stages = {k: torch.stack([o.stages[k] for o in outputs]) for k in STAGE_KEYS}
    x_next = torch.stack([o.x_next for o in outputs])
    return LayerResult(run=run, x_next=x_next, stages=stages, layout=layout,
                       dropped=layout.dropped.clone())
