"""The `local` transport: all ranks in one process over the symmetric window model.

Each rank's program runs as a generator; a `wait` on a window cell suspends it and a
deterministic round-robin scheduler resumes it once the cell reaches its threshold. The
protocol is the spec's (§3.4, §3.6) with the review findings fixed: full count tables,
epoch-stamped Set signals, a separate data_done window. Options: `poison` (garbage in
every window before the step) and `silent_rank` (fault injection: that rank never
signals, so its peers' waits time out with WindowTimeoutError).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TypeVar

import torch

from ..backend import StageBackend
from ..types import PackedRoutes, RecvBuffers
from .layout import RankPlan
from .rank import RankOutput, step_program
from .transport import DispatchHandle, EpStep, check_timeout, resolve_backends, window_shape
from .windows import SIGNAL_WINDOWS, SymmetricWindows, Wait, WindowShape, WindowTimeoutError
from .wire import pad_column

T = TypeVar("T")
#: Seed of the poison generator (garbage is deterministic, so runs are reproducible).
POISON_SEED = 0x5EED
#: Scheduler sleep while every live rank is blocked (only a fault gets there).
_POLL_S = 0.005


class LocalComm:
    """Rank `rank`'s end of the window protocol (implements `RankComm`)."""

    def __init__(self, rank: int, windows: SymmetricWindows, epoch: int,
                 silent: bool = False) -> None:
        self.rank = rank
        self.ranks = windows.shape.ranks
        self.win = windows
        self.epoch = epoch
        self.silent = silent

    def _signal(self, window: str) -> None:
        """Set `window[me] = epoch` on every peer (unless this rank is the silent fault)."""
        if self.silent:
            return
        for peer in range(self.ranks):
            if peer != self.rank:
                self.win.notify(peer, window, self.rank, self.epoch, op="set")

    def _wait_all(self, window: str) -> Generator[Wait, None, None]:
        for src in range(self.ranks):
            if src != self.rank:
                w = Wait(self.rank, window, src, self.epoch)
                if not self.win.satisfied(w):
                    yield w

    def publish_counts(self, hist: torch.Tensor) -> None:
        r, me = self.ranks, self.rank
        rows = torch.arange(r) + me * r                      # pub_counts rows me·R + dst
        for peer in range(r):                                # including me; zeros too
            self.win.put(peer, "pub_counts", rows, hist)
        self._signal("count_done")

    def pack(self, backend: StageBackend, x_norm_i8: torch.Tensor,
             x_norm_scale: torch.Tensor, weights: torch.Tensor,
             route_ids: torch.Tensor) -> PackedRoutes:
        """The stage backend's pack kernel (spec §2.5); `dispatch` puts its rows."""
        return backend.pack_routes(x_norm_i8, x_norm_scale, weights, route_ids)

    def collect_counts(self) -> Generator[Wait, None, torch.Tensor]:
        yield from self._wait_all("count_done")
        r, n_local = self.ranks, self.win.shape.n_local
        return self.win.local(self.rank, "pub_counts").to(torch.int64).reshape(
            r, r, n_local).clone()

    def dispatch(self, plan: RankPlan, packed: PackedRoutes
                 ) -> Generator[Wait, None, tuple[RecvBuffers, DispatchHandle]]:
        shape = self.win.shape
        c = shape.capacity
        rows = plan.local_expert[plan.order] * c + plan.slot[plan.order]
        start = 0
        for dst, n in enumerate(plan.send_split.tolist()):
            if n:
                sl = slice(start, start + n)
                self.win.put(dst, "x_i8", rows[sl], packed.x[sl])
                self.win.put(dst, "scale", rows[sl], pad_column(packed.scale[sl], torch.float32))
                self.win.put(dst, "weight", rows[sl], pad_column(packed.weight[sl], torch.float32))
                self.win.put(dst, "r_route", rows[sl], pad_column(packed.route[sl], torch.int32))
            start += n
        self._signal("data_done")
        yield from self._wait_all("data_done")
        nl, d, me = shape.n_local, shape.d_model, self.rank
        recv = RecvBuffers(                                   # stage-out (copies)
            x=self.win.local(me, "x_i8").reshape(nl, c, d).clone(),
            scale=self.win.local(me, "scale")[:, 0].reshape(nl, c).clone(),
            weight=self.win.local(me, "weight")[:, 0].reshape(nl, c).clone(),
            route=self.win.local(me, "r_route")[:, 0].reshape(nl, c).clone(),
            count=plan.recv_count.clone())
        return recv, DispatchHandle(plan=plan, recv_route=recv.route)

    def combine(self, recv_y: torch.Tensor, handle: DispatchHandle
                ) -> Generator[Wait, None, torch.Tensor]:
        """Push every received row back to routed_y_buf[r_route] on its origin (§3.6)."""
        plan, d = handle.plan, recv_y.shape[-1]
        if handle.recv_route is None:
            raise ValueError("combine needs the handle of this transport's dispatch")
        y = recv_y.reshape(-1, d)
        rr = handle.recv_route.reshape(-1).to(torch.int64)
        start = 0
        for src, n in enumerate(plan.recv_split.tolist()):   # push back, keyed by r_route
            if n:
                rows = plan.recv_rows[start:start + n]
                self.win.put(src, "routed_y_buf", rr[rows], y[rows])
            start += n
        if plan.dropped_routes.numel():                       # dropped: zero contribution
            self.win.put(self.rank, "routed_y_buf", plan.dropped_routes,
                         torch.zeros(plan.dropped_routes.numel(), d, dtype=torch.bfloat16))
        self._signal("combine_done")
        yield from self._wait_all("combine_done")
        return self.win.local(self.rank, "routed_y_buf").clone()


class LocalTransport:
    """All ranks in this process over `SymmetricWindows`; reusable across steps.

    The windows persist between `run` calls with the same shape (the epoch advances), so
    a reused transport exercises stale windows exactly as a multi-layer decode would.
    """

    name = "local"

    def __init__(self, *, poison: bool = False, timeout: float = 60.0,
                 silent_rank: int | None = None) -> None:
        self.poison = poison
        self.timeout = check_timeout(timeout)
        self.silent_rank = silent_rank
        self.windows: SymmetricWindows | None = None
        self.epoch = 0
        self._gen = torch.Generator().manual_seed(POISON_SEED)

    def _prepare(self, shape: WindowShape, poison: bool) -> SymmetricWindows:
        if self.windows is None or self.windows.shape != shape:
            self.windows = SymmetricWindows(shape)
            self.epoch = 0
        if poison:   # pretend many earlier steps ran, then trash every window
            self.epoch += int(torch.randint(1, 1000, (1,), generator=self._gen))
        self.epoch += 1
        if poison:
            self.windows.poison(self._gen, self.epoch)
        return self.windows

    def run(self, step: EpStep) -> list[RankOutput]:
        """Run one step of every rank's program to completion; outputs in rank order.
        The windows are poisoned first if this transport or the step asks for it."""
        shape = window_shape(step.run)
        backends = resolve_backends(step.backend, shape.ranks)
        return self.run_programs(
            shape, lambda r, comm: step_program(step, r, backends[r], comm),
            poison=step.poison)

    def run_programs(self, shape: WindowShape,
                     make_program: Callable[[int, LocalComm], Generator[Wait, None, T]],
                     poison: bool = False) -> list[T]:
        """Run any per-rank generator programs ``make_program(rank, comm)`` over these
        windows (e.g. an exchange-only program in a test); results in rank order."""
        if self.silent_rank is not None and not 0 <= self.silent_rank < shape.ranks:
            raise ValueError(f"silent_rank must be in [0, {shape.ranks}), "
                             f"got {self.silent_rank}")
        win = self._prepare(shape, self.poison or poison)
        gens = [make_program(r, LocalComm(r, win, self.epoch, silent=r == self.silent_rank))
                for r in range(shape.ranks)]
        return _schedule(gens, win, self.timeout)


def _schedule(gens: list[Generator[Wait, None, T]], win: SymmetricWindows,
              timeout: float) -> list[T]:
    """Round-robin: advance every rank whose pending wait holds, until all finish."""
    n = len(gens)
    waits: list[Wait | None] = [None] * n
    outs: list[T | None] = [None] * n
    done = [False] * n
    last_progress = time.monotonic()
    try:
        while not all(done):
            progressed = False
            for r in range(n):
                if done[r] or (waits[r] is not None and not win.satisfied(waits[r])):
                    continue
                progressed = True
                try:
                    waits[r] = next(gens[r])
                except StopIteration as stop:
                    outs[r], done[r], waits[r] = stop.value, True, None
            if progressed:
                last_progress = time.monotonic()
                continue
            if time.monotonic() - last_progress > timeout:
                blocked = [w for w in waits if w is not None]
                desc = "; ".join(
                    f"rank {w.rank} waits for {w.window}[{w.cell}] >= {w.threshold} "
                    f"(holds {int(win.local(w.rank, w.window)[w.cell])}: "
                    f"not yet signalled by rank {w.cell})" for w in blocked)
                raise WindowTimeoutError(f"local transport: no progress for {timeout:g} s "
                                         f"(timeout): {desc}")
            time.sleep(_POLL_S)
    finally:
        for g in gens:
            g.close()
    return [o for o in outs if o is not None]


__all__ = ["LocalComm", "LocalTransport", "SIGNAL_WINDOWS"]
