"""Per-rank timing bodies for benchmarks/bench_ep_exchange.py, run inside a SpawnedWorld.

They live in the package (not the script) so that spawned children can import them.
The exchange needs only each rank's gate outputs (x_norm_i8, x_norm_scale, top-k indices
and weights), so they are synthesised here: no hc / gate / expert weights are built.
Each repetition is bracketed by barriers; a repetition's time is the slowest rank's.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..backend import TorchBackend
from ..config import RunConfig
from ..types import GateOut
from .buffer import EpBuffer
from .layout import PAD_BYTES, plan_rank, send_histogram
from .plan import count_routes, finish_plan, presort
from .rank import run_to_end
from .transport import window_shape
from .wire import as_words, dispatch_row_bytes, row_words

#: Names of the phases `exchange_rank` times, in order.
PHASES: tuple[str, ...] = ("pack (counts out, presort, wire pack)", "counts wait + plan",
                           "dispatch (a2a, unpack)", "combine (gather, a2a, gather)")


def synthetic_gate(run: RunConfig, rank: int, seed: int = 0) -> GateOut:
    """Rank `rank`'s gate outputs with uniform random top-k experts (distinct per
    token, like hash routing's expectation): what the exchange moves, nothing else."""
    cfg = run.model
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    t, d, k, e = run.tokens, cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    indices = torch.rand(t, e, generator=g).topk(k, dim=1).indices.to(torch.int32)
    return GateOut(x_norm=torch.zeros(0),
                   x_norm_i8=torch.randint(-127, 128, (t, d), generator=g, dtype=torch.int8),
                   x_norm_scale=torch.rand(t, 1, generator=g) / 127,
                   indices=indices, weights=torch.rand(t, k, generator=g))


def _timed(fn: Callable[[], object]) -> float:
    """Seconds of one collective step, max over ranks."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def exchange_rank(rank: int, run: RunConfig, reps: int, warmup: int,
                  seed: int = 0) -> dict[str, object]:
    """Time EP dispatch+combine (route targets, count all_gather, wire pack, plan, one
    all_to_all_single each way, unpack, gather by route: the exchange part of
    rank.rank_program, in its order) against two bare all_to_all_single calls moving the
    same wire bytes per peer (D + 16 per route out, 2·D back), with and without a
    blocking all_gather of the count histogram in front; interleaved, same processes."""
    be, shape = TorchBackend(), window_shape(run)
    gate = synthetic_gate(run, rank, seed)
    buf = EpBuffer(rank, shape)
    recv_y = torch.randn(shape.n_local, shape.capacity, shape.d_model).to(torch.bfloat16)
    nl, r_, cap = shape.n_local, shape.ranks, shape.capacity

    def ep_exchange(stamps: list[float] | None = None) -> None:
        counts = count_routes(gate.indices, nl, r_)
        buf.publish_counts(counts.hist_t)
        pre = presort(rank, counts)
        packed = buf.pack(be, gate.x_norm_i8, gate.x_norm_scale, gate.weights, pre.order_t)
        if stamps is not None:
            stamps.append(time.perf_counter())
        table = run_to_end(buf.collect_counts())
        plan = finish_plan(pre, table, cap)
        if stamps is not None:
            stamps.append(time.perf_counter())
        recv, handle = run_to_end(buf.dispatch(plan, packed))
        if stamps is not None:
            stamps.append(time.perf_counter())
        run_to_end(buf.combine(recv_y, handle))
        if stamps is not None:
            stamps.append(time.perf_counter())

    hist = send_histogram(gate.indices, nl, r_)
    buf.publish_counts(hist)
    plan = plan_rank(rank, gate.indices, run_to_end(buf.collect_counts()), cap)
    out_b, back_b = dispatch_row_bytes(shape.d_model), 2 * shape.d_model
    send_split, recv_split = plan.send_split.tolist(), plan.recv_split.tolist()
    d_send = torch.randint(0, 255, (sum(send_split) * out_b,), dtype=torch.uint8)
    d_recv = torch.empty(sum(recv_split) * out_b, dtype=torch.uint8)
    c_send = torch.randint(0, 255, (sum(recv_split) * back_b,), dtype=torch.uint8)
    c_recv = torch.empty(sum(send_split) * back_b, dtype=torch.uint8)
    h_parts = list(torch.empty(r_, *hist.shape, dtype=hist.dtype).unbind(0))

    def a2a_bound() -> None:
        dist.all_to_all_single(d_recv, d_send, [n * out_b for n in recv_split],
                               [n * out_b for n in send_split])
        dist.all_to_all_single(c_recv, c_send, [n * back_b for n in send_split],
                               [n * back_b for n in recv_split])

    def a2a_counts_bound() -> None:  # plus the count all_gather EP cannot avoid
        dist.all_gather(h_parts, hist)
        a2a_bound()

    # the floor: the same three collectives plus the four row copies any placement
    # into [NL, C] slots needs (pack gather, unpack scatter, combine gather, gather by
    # route), without planning; what EP costs at best on CPU
    d, n_out, n_in = shape.d_model, sum(send_split), sum(recv_split)
    tok = torch.div(plan.order, gate.weights.shape[1], rounding_mode="floor")
    ret = torch.empty_like(plan.order)
    ret[plan.order] = torch.arange(n_out)
    f_send = torch.zeros(n_out, out_b, dtype=torch.uint8)
    f_recv = torch.zeros(n_in, out_b, dtype=torch.uint8)
    f_x = torch.empty(shape.n_local * cap, d, dtype=torch.int8)
    f_y = torch.empty(n_in, d, dtype=torch.bfloat16)
    f_back = torch.empty(n_out, d, dtype=torch.bfloat16)
    f_routed = torch.empty(n_out, d, dtype=torch.bfloat16)

    def copies_floor() -> None:
        dist.all_gather(h_parts, hist)
        torch.index_select(row_words(gate.x_norm_i8, d), 0, tok, out=row_words(f_send, d))
        dist.all_to_all_single(f_recv, f_send, recv_split, send_split)
        row_words(f_x, d)[plan.recv_rows] = row_words(f_recv, d)
        torch.index_select(as_words(recv_y.view(-1, d)), 0, plan.recv_rows,
                           out=as_words(f_y))
        dist.all_to_all_single(f_back, f_y, send_split, recv_split)
        torch.index_select(as_words(f_back), 0, ret, out=as_words(f_routed))

    def phases() -> list[float]:  # this rank's seconds per phase of one exchange
        t = [time.perf_counter()]
        ep_exchange(t)
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    for _ in range(warmup):
        ep_exchange()
        a2a_bound()
        a2a_counts_bound()
        copies_floor()
    ep_t, a2a_t, a2a_c_t, floor_t, phase_t = [], [], [], [], []
    for _ in range(reps):  # interleaved, so load drift hits all alike
        ep_t.append(_timed(ep_exchange))
        a2a_t.append(_timed(a2a_bound))
        a2a_c_t.append(_timed(a2a_counts_bound))
        floor_t.append(_timed(copies_floor))
        dist.barrier()
        phase_t.append(phases())
    return {"ep": ep_t, "a2a": a2a_t, "a2a_counts": a2a_c_t, "floor": floor_t,
            "phases": phase_t,
            "phase_names": list(PHASES),
            "send_routes": send_split, "recv_routes": recv_split,
            "bytes_out": sum(send_split) * out_b, "bytes_back": sum(recv_split) * back_b,
            "row_bytes": out_b, "spec_row_bytes": shape.d_model + 3 * PAD_BYTES}
