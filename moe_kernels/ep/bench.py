"""Per-rank timing bodies for benchmarks/bench_ep_exchange.py, run inside a SpawnedWorld.

They live in the package (not the script) so that spawned children can import them.
Each repetition is bracketed by barriers; a repetition's time is the slowest rank's.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..backend import TorchBackend
from ..config import RunConfig
from ..fixtures import Inputs, Weights
from ..layer import front_stages
from .dist import DistComm, run_rank
from .layout import PAD_BYTES, plan_rank, route_targets, send_histogram, send_order
from .program import window_shape
from .rank import run_to_end
from .wire import dispatch_row_bytes


def _timed(fn: Callable[[], object]) -> float:
    """Seconds of one collective step, max over ranks."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def exchange_rank(rank: int, run: RunConfig, inputs: Inputs, weights: Weights,
                  reps: int, warmup: int) -> dict[str, object]:
    """Time EP dispatch+combine (counts all_gather, plan, pack, 1 all_to_all each way,
    unpack, gather by route) against two bare all_to_all_single calls moving the same
    wire bytes per peer (D + 16 per route out, 2·D back), with and without a blocking
    all_gather of the count histogram in front; all three interleaved, same buffers
    sizes, same processes."""
    be = TorchBackend()
    shape = window_shape(run)
    st = front_stages(run, inputs.x_hc[rank], inputs.input_ids[rank], weights, be)
    comm = DistComm(rank, shape, be)
    hist = send_histogram(st["indices"], shape.n_local, shape.ranks)
    recv_y = torch.randn(shape.n_local, shape.capacity, shape.d_model).to(torch.bfloat16)

    dst, e = route_targets(st["indices"], shape.n_local, shape.ranks)

    def ep_exchange() -> None:  # the exchange part of rank.rank_program, verbatim order
        comm.publish_counts(hist)
        packed = be.pack_routes(st["x_norm_i8"], st["x_norm_scale"], st["weights"],
                                send_order(dst * shape.n_local + e))
        table = run_to_end(comm.collect_counts())
        plan = plan_rank(rank, st["indices"], table, shape.capacity)
        recv = run_to_end(comm.dispatch(plan, packed))
        run_to_end(comm.combine(plan, recv_y, recv.route))

    comm.publish_counts(hist)
    table = run_to_end(comm.collect_counts())
    plan = plan_rank(rank, st["indices"], table, shape.capacity)
    # the bound moves exactly EP's wire bytes: D + 16 per route out, 2·D back
    out_b, back_b = dispatch_row_bytes(shape.d_model), 2 * shape.d_model
    send_split, recv_split = plan.send_split.tolist(), plan.recv_split.tolist()
    d_send = torch.randint(0, 255, (sum(send_split) * out_b,), dtype=torch.uint8)
    d_recv = torch.empty(sum(recv_split) * out_b, dtype=torch.uint8)
    c_send = torch.randint(0, 255, (sum(recv_split) * back_b,), dtype=torch.uint8)
    c_recv = torch.empty(sum(send_split) * back_b, dtype=torch.uint8)
    h_parts = [torch.empty_like(hist) for _ in range(shape.ranks)]

    def a2a_bound() -> None:
        dist.all_to_all_single(d_recv, d_send, [n * out_b for n in recv_split],
                               [n * out_b for n in send_split])
        dist.all_to_all_single(c_recv, c_send, [n * back_b for n in send_split],
                               [n * back_b for n in recv_split])

    def a2a_counts_bound() -> None:  # plus the count all_gather EP cannot avoid
        dist.all_gather(h_parts, hist)
        a2a_bound()

    def phases() -> list[float]:  # this rank's seconds per phase of one exchange
        t = [time.perf_counter()]
        comm.publish_counts(hist)
        packed = be.pack_routes(st["x_norm_i8"], st["x_norm_scale"], st["weights"],
                                send_order(dst * shape.n_local + e))
        t.append(time.perf_counter())
        table = run_to_end(comm.collect_counts())
        plan = plan_rank(rank, st["indices"], table, shape.capacity)
        t.append(time.perf_counter())
        recv = run_to_end(comm.dispatch(plan, packed))
        t.append(time.perf_counter())
        run_to_end(comm.combine(plan, recv_y, recv.route))
        t.append(time.perf_counter())
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    for _ in range(warmup):
        ep_exchange()
        a2a_bound()
        a2a_counts_bound()
    ep_t, a2a_t, a2a_c_t, phase_t = [], [], [], []
    for _ in range(reps):  # interleaved, so load drift hits all alike
        ep_t.append(_timed(ep_exchange))
        a2a_t.append(_timed(a2a_bound))
        a2a_c_t.append(_timed(a2a_counts_bound))
        dist.barrier()
        phase_t.append(phases())
    return {"ep": ep_t, "a2a": a2a_t, "a2a_counts": a2a_c_t, "phases": phase_t,
            "phase_names": ["pack (backend.pack_routes)", "counts wait + plan",
                            "dispatch (wire pack, a2a, unpack)",
                            "combine (gather, a2a, gather by route)"],
            "send_routes": send_split, "recv_routes": recv_split,
            "bytes_out": sum(send_split) * out_b, "bytes_back": sum(recv_split) * back_b,
            "row_bytes": out_b, "spec_row_bytes": shape.d_model + 3 * PAD_BYTES}


def layer_rank(rank: int, run: RunConfig, inputs: Inputs, weights: Weights,
               reps: int) -> list[float]:
    """Seconds of the whole EP layer step (this transport), max over ranks, per rep."""
    out = []
    for _ in range(reps):
        out.append(_timed(lambda: run_rank(rank, run, inputs, weights, "torch", False,
                                           "error")))
    return out
