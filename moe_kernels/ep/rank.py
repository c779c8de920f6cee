"""One rank's EP program, written once for every transport (spec §2.0, §3.4-§3.7).

hc_pre -> gate -> expert_shared -> count exchange -> plan -> dispatch -> expert_routed
-> combine -> reduce (sh first, then k = 0..K-1) -> hc_post.

Stage compute goes through the `StageBackend`; only the three exchanges go through the
rank's `RankComm` (the transport strategy). The program is a generator: a transport whose
exchanges must wait for peers in the same process (`local`) suspends it by yielding a
`Wait`; a transport whose exchanges block in the OS (`gloo`) never yields.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..backend import StageBackend
from ..config import RunConfig
from ..fixtures import Weights
from ..layer import front_stages
from ..types import PackedRoutes, RecvBuffers
from .layout import RankPlan, plan_rank, route_targets, send_histogram, send_order
from .windows import Wait

#: What a rank program yields while it waits (local transport) and finally returns.
RankGen = Generator[Wait, None, "RankOutput"]


class RankComm(Protocol):
    """One rank's end of a transport: the three exchanges of the EP step.

    Each method is a generator (``yield from comm.op(...)``) returning its result.
    """

    rank: int
    ranks: int

    def publish_counts(self, hist: torch.Tensor) -> None:
        """Start publishing my full histogram [R(dst),NL] (zeros included) to every
        rank; does not wait, so the caller can pack its rows meanwhile."""
        ...

    def collect_counts(self) -> Generator[Wait, None, torch.Tensor]:
        """Wait for every rank's histogram; return the count table [R(src),R(dst),NL]."""
        ...

    def dispatch(self, plan: RankPlan, packed: PackedRoutes
                 ) -> Generator[Wait, None, RecvBuffers]:
        """Send my placed routes (packed in `plan.order`) to their slots; return my
        receive buffers [NL, C, ...] with counts `plan.recv_count` (rows beyond the
        count are unspecified)."""
        ...

    def combine(self, plan: RankPlan, recv_y: torch.Tensor, recv_route: torch.Tensor
                ) -> Generator[Wait, None, torch.Tensor]:
        """Return every received row to its origin's routed_y_buf[r_route]; return my
        routed_y_buf [T·K, D] BF16 (rows of dropped routes zero)."""
        ...


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
    dst, e = route_targets(st["indices"], n_local, ranks)
    comm.publish_counts(send_histogram(st["indices"], n_local, ranks))
    # pack while the counts travel: the (dst, e, slot) order needs no offsets
    pre = send_order(dst * n_local + e)
    packed = backend.pack_routes(st["x_norm_i8"], st["x_norm_scale"], st["weights"], pre)
    table = yield from comm.collect_counts()
    plan = plan_rank(me, st["indices"], table, run.recv_max, overflow)  # may raise
    if plan.dropped_routes.numel():  # overflow="drop": keep the placed rows only
        keep = plan.slot[pre] >= 0
        packed = PackedRoutes(*(f[keep] for f in packed))
    recv = yield from comm.dispatch(plan, packed)
    shard = weights.routed_shard(me, n_local)
    recv_y = backend.expert_routed(recv.x, recv.scale, recv.weight, recv.count, shard,
                                   cfg.swiglu_limit)
    routed_y_buf = yield from comm.combine(plan, recv_y, recv.route)
    ffn_out = backend.reduce_routes(st["sh"], routed_y_buf, k).reshape(run.batch, run.seq, -1)
    st["ffn_out"] = ffn_out
    x_next = backend.hc_post(ffn_out, x_hc, st["post"], st["comb"])
    return RankOutput(rank=me, stages=st, x_next=x_next, table=table, plan=plan)


def run_to_end(gen: RankGen) -> RankOutput:
    """Drive a rank program whose exchanges never suspend (blocking transports)."""
    try:
        wait = next(gen)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError(f"a blocking transport's rank program suspended on {wait}; "
                       f"only the local transport may yield waits")
