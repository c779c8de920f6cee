"""`EpBuffer`: one rank's exchange over torch.distributed collectives (DeepEP-`Buffer`-like).

An explicit object owns every buffer of the exchange, sized once from the run's shape
(`WindowShape`) and reused by every step: no module-global pool, no per-step allocation
(fresh multi-MB buffers cost more in page faults than the copies on 2 shared cores).
It implements `RankComm` with three collectives per step, each over contiguous buffers
ordered by destination (no per-route messages, no per-route Python loops):

1. counts: one async all_gather of my full [R(dst),NL] histogram (zeros included), so
   every rank holds the same table [R(src),R(dst),NL] and plans its own slots;
2. dispatch: `pack` gathers the four channels straight into the wire rows
   [x_i8 | scale | weight | r_route | pad] (wire.py), in (dst, e, slot) order, while the
   counts travel; one all_to_all_single, started as soon as the counts arrive (sending
   needs no slots), so the caller's slot planning overlaps it; the receiver scatters
   the rows to e·C + slot in wide words;
3. combine: one gather of the rows in arrival order, one all_to_all_single back; every
   origin gets its rows in its own send order and reads routed_y_buf with one gather
   (the handle's return_index). r_route does not travel twice.

Only rows below the counts are read and each is written in the same step, so nothing a
step reads depends on what the buffers held (`poison` proves it in the tests).

Device collectives: with ``device="cuda:N"`` (nccl) or ``"npu:N"`` (hccl, torch_npu) the
wire and count buffers live on the device and the same code runs; the received rows come
back to host memory for the stages. UNTESTED here (no GPU/NPU on this machine).
"""
from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
import torch.distributed as dist

from ..backend import StageBackend
from ..types import PackedRoutes, RecvBuffers
from .layout import RankPlan
from .transport import DispatchHandle
from .windows import Wait, WindowShape
from .wire import (
    ROUTE_WORD,
    SCALE_WORD,
    TAIL_WORDS,
    WEIGHT_WORD,
    as_words,
    check_wire_width,
    dispatch_row_bytes,
    pack_dispatch_into,
    row_tail,
    row_words,
    unpack_dispatch,
)

#: Seed of the garbage `poison` writes into the buffers.
POISON_SEED = 0xBAD


class EpBuffer:
    """Rank `rank`'s exchange buffers and collectives (implements `RankComm`).

    group: the torch.distributed process group (None: the default group, which must be
    initialised before the first exchange). The RecvBuffers that `dispatch` returns and
    the routed_y_buf that `combine` returns are this object's buffers, valid until its
    next dispatch / combine (the rank program consumes them within the step).

    Each step costs few torch calls: every view the exchange uses (wire x words, row
    tails, scalar columns) is made once here, because on 2 shared cores each call, not
    each byte, dominates at decode sizes.
    """

    def __init__(self, rank: int, shape: WindowShape, *, group: Any = None,
                 device: str | torch.device = "cpu") -> None:
        check_wire_width(shape.d_model)
        self.rank, self.ranks, self.shape = rank, shape.ranks, shape
        self.group = group
        self.device = torch.device(device)
        self._host = self.device.type == "cpu"
        nl, c, d, routes = shape.n_local, shape.capacity, shape.d_model, shape.routes
        max_in = min(shape.ranks * routes, nl * c)      # rows one rank can receive
        width, dev = dispatch_row_bytes(d), self.device
        self.send = torch.zeros(routes, width, dtype=torch.uint8, device=dev)  # pad stays 0
        self.recv = torch.zeros(max_in, width, dtype=torch.uint8, device=dev)
        # received rows in host memory (the same tensor on CPU; a mirror on a device)
        self.recv_host = self.recv if self._host else torch.zeros(max_in, width,
                                                                  dtype=torch.uint8)
        self.x = torch.empty(nl, c, d, dtype=torch.int8)
        # received row tails [scale | weight | r_route | pad] at row e·C + slot; the
        # scalar channels are [NL, C] column views of it (no per-step copies)
        self.tail = torch.empty(nl * c, TAIL_WORDS, dtype=torch.int32)
        self.scale = self.tail[:, SCALE_WORD].view(torch.float32).view(nl, c)
        self.weight = self.tail[:, WEIGHT_WORD].view(torch.float32).view(nl, c)
        self.route = self.tail[:, ROUTE_WORD].view(nl, c)
        self.y_send = torch.empty(max_in, d, dtype=torch.bfloat16, device=dev)
        # rows back in send order; row `routes` stays zero (the row of a dropped route)
        self.y_back = torch.zeros(routes + 1, d, dtype=torch.bfloat16, device=dev)
        self.routed_y = torch.empty(routes, d, dtype=torch.bfloat16, device=dev)
        self._hist = torch.zeros(shape.ranks, nl, dtype=torch.int64, device=dev)
        self._parts = torch.zeros(shape.ranks, shape.ranks, nl, dtype=torch.int64,
                                  device=dev)
        self._part_views = list(self._parts.unbind(0))   # all_gather writes in place
        self._counts_work: Any = None
        self._ret_packed: torch.Tensor | None = None     # see pack()
        self._ret_key: tuple[int, int] = (0, 0)
        self._packed_n = 0                               # routes in the wire (pack)
        self._early: tuple[list[int], list[int], Any] | None = None  # dispatch in flight
        # views made once (see the class docstring)
        send_tail, recv_tail = row_tail(self.send, d), row_tail(self.recv_host, d)
        self._send_x = row_words(self.send, d)
        self._send_scale = send_tail[:, SCALE_WORD]
        self._send_weight = send_tail[:, WEIGHT_WORD]
        self._send_route = send_tail[:, ROUTE_WORD]
        self._send_view = PackedRoutes(*unpack_dispatch(self.send, d))
        self._recv_x, self._recv_tail = row_words(self.recv_host, d), as_words(recv_tail)
        self._x_words = row_words(self.x.view(-1, d), d)
        self._tail_words = as_words(self.tail)
        self._y_send, self._y_back = as_words(self.y_send), as_words(self.y_back)
        self._routed_y = as_words(self.routed_y)
        self._zero_row = routes                          # y_back row of dropped routes

    # -- test support ------------------------------------------------------------------
    def poison(self, seed: int = POISON_SEED) -> None:
        """Fill every buffer except the zero row with garbage (results must not change)."""
        g = torch.Generator().manual_seed(seed)
        for t in (self.recv_host, self.x, self.tail):  # (send rows are all rewritten)
            info = torch.iinfo(t.dtype)
            t.copy_(torch.randint(info.min, info.max, t.shape, generator=g, dtype=t.dtype))
        self.scale.fill_(float("nan"))
        self.weight.fill_(3e38)
        for t in (self.y_send, self.routed_y, self.y_back[:-1]):
            t.copy_(torch.randn(t.shape, generator=g) * 3e38)

    # -- RankComm ----------------------------------------------------------------------
    def publish_counts(self, hist: torch.Tensor) -> None:
        if not self._host or hist.dtype != torch.int64 or not hist.is_contiguous():
            self._hist.copy_(hist)
            hist = self._hist
        self._counts_work = dist.all_gather(self._part_views, hist,
                                            group=self.group, async_op=True)

    def pack(self, backend: StageBackend, x_norm_i8: torch.Tensor,
             x_norm_scale: torch.Tensor, weights: torch.Tensor,
             route_ids: torch.Tensor) -> PackedRoutes:
        """Gather the channels of `route_ids` [N] int64, in send order (dst, e, slot) as
        `plan.presort` gives them, straight into the wire rows (the reference pack's
        gathers, whoever the stage backend is: a gather's bytes do not depend on who
        computes it). On a device the backend packs on the host."""
        if not self._host:   # UNTESTED: dispatch copies the rows into the device wire
            return backend.pack_routes(x_norm_i8, x_norm_scale, weights, route_ids)
        n = route_ids.shape[0]
        tok = torch.div(route_ids, weights.shape[1], rounding_mode="floor")
        src, out = row_words(x_norm_i8.contiguous(), self.shape.d_model), self._send_x
        if src.dtype != out.dtype:                           # misaligned source: bytes
            src, out = x_norm_i8, self._send_view.x
        torch.index_select(src, 0, tok, out=out[:n])         # x_i8 as wide words
        torch.index_select(x_norm_scale.reshape(-1).view(torch.int32), 0, tok,
                           out=self._send_scale[:n])
        torch.index_select(weights.reshape(-1).view(torch.int32), 0, route_ids,
                           out=self._send_weight[:n])
        self._send_route[:n].copy_(route_ids)
        # while the counts travel: where each route's row comes back if none is dropped
        self._ret_packed = torch.empty_like(route_ids)
        self._ret_packed[route_ids] = torch.arange(n)
        self._ret_key = (route_ids.data_ptr(), n)
        self._packed_n = n
        v = self._send_view
        return v if n == v.x.shape[0] else \
            PackedRoutes(v.x[:n], v.scale[:n], v.weight[:n], v.route[:n])

    def collect_counts(self) -> Generator[Wait, None, torch.Tensor]:
        if self._counts_work is None:
            raise RuntimeError("collect_counts called before publish_counts")
        self._counts_work.wait()
        self._counts_work = None
        table = self._parts.to("cpu", copy=True)         # a fresh table (kept by the plan)
        self._start_dispatch(table)
        return table
        yield  # pragma: no cover  (a generator that never suspends)

    def _start_dispatch(self, table: torch.Tensor) -> None:
        """Launch the dispatch all_to_all as soon as the table is known, so the caller's
        slot planning runs while the rows travel. Sending needs no slots: only the
        splits, known from the table when no expert overflows (the same decision on every
        rank, since all hold the same table) and all my routes are packed in send order.
        Otherwise `dispatch` sends after planning (drops, device buffers)."""
        self._early, packed_n, self._packed_n = None, self._packed_n, 0
        t = table.numpy()
        if not self._host or packed_n != self.shape.routes or \
                bool((t.sum(0) > self.shape.capacity).any()):
            return
        send_split = t[self.rank].sum(1).tolist()       # = my histogram per destination
        recv_split = t[:, self.rank].sum(1).tolist()
        n_out, n_in = sum(send_split), sum(recv_split)
        work = dist.all_to_all_single(self.recv[:n_in], self.send[:n_out], recv_split,
                                      send_split, group=self.group, async_op=True)
        self._early = (send_split, recv_split, work)

    def dispatch(self, plan: RankPlan, packed: PackedRoutes
                 ) -> Generator[Wait, None, tuple[RecvBuffers, DispatchHandle]]:
        send_split, recv_split = plan.send_split.tolist(), plan.recv_split.tolist()
        n_out, n_in = sum(send_split), sum(recv_split)
        recv, early, self._early = self.recv[:n_in], self._early, None
        if early is not None:                               # started by collect_counts
            early[2].wait()
            if (early[0], early[1]) != (send_split, recv_split) or \
                    self._ret_key != (plan.order.data_ptr(), n_out):
                raise RuntimeError("dispatch: the plan or the packed rows differ from "
                                   "what the counts announced")
        else:
            if n_out and packed.x.data_ptr() != self.send.data_ptr():
                pack_dispatch_into(self.send, packed)      # packed elsewhere (drop, device)
            dist.all_to_all_single(recv, self.send[:n_out], recv_split, send_split,
                                   group=self.group)
        if not self._host:                                  # UNTESTED (nccl / hccl)
            self.recv_host[:n_in].copy_(recv)
        rows = plan.recv_rows                               # flat e·C + slot, arrival order
        self._x_words[rows] = self._recv_x[:n_in]
        self._tail_words[rows] = self._recv_tail[:n_in]    # scale, weight, route at once
        ret = self._ret_packed      # valid if the plan sends exactly the packed routes
        if ret is None or n_out != self.shape.routes or \
                self._ret_key != (plan.order.data_ptr(), n_out):
            ret = torch.full((self.shape.routes,), self._zero_row, dtype=torch.int64)
            ret[plan.order] = torch.arange(n_out)         # dropped routes: the zero row
        self._ret_packed = None
        recv_bufs = RecvBuffers(x=self.x, scale=self.scale, weight=self.weight,
                                route=self.route, count=plan.recv_count)
        return recv_bufs, DispatchHandle(plan=plan, return_index=ret)
        yield  # pragma: no cover

    def combine(self, recv_y: torch.Tensor, handle: DispatchHandle
                ) -> Generator[Wait, None, torch.Tensor]:
        """Rows go back in arrival order, so every origin gets them in its send order
        (plan.order), which `handle.return_index` maps to routed_y_buf rows."""
        plan, d = handle.plan, self.shape.d_model
        if recv_y.dtype != torch.bfloat16:
            raise TypeError(f"combine sends BF16 rows, got {recv_y.dtype}")
        if handle.return_index is None:
            raise ValueError("combine needs the handle of this buffer's dispatch")
        send_split, recv_split = plan.send_split.tolist(), plan.recv_split.tolist()
        n_out, n_in = sum(send_split), sum(recv_split)
        rows, ret = plan.recv_rows, handle.return_index
        if not self._host:                                  # UNTESTED (nccl / hccl)
            recv_y, rows, ret = recv_y.to(self.device), rows.to(self.device), \
                ret.to(self.device)
        torch.index_select(as_words(recv_y.reshape(-1, d)), 0, rows,
                           out=self._y_send[:n_in])         # rows as 16-byte words
        dist.all_to_all_single(self.y_back[:n_out], self.y_send[:n_in], send_split,
                               recv_split, group=self.group)
        torch.index_select(self._y_back, 0, ret, out=self._routed_y)
        return self.routed_y if self._host else self.routed_y.cpu()
        yield  # pragma: no cover


__all__ = ["EpBuffer", "POISON_SEED"]
