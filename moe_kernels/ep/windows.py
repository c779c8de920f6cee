"""The symmetric window model behind the `local` transport (spec §3.2).

Every rank owns the same named windows. A rank reads its own windows freely; it reaches a
peer's windows only through one-sided operations: `put` (rows into a payload window),
`notify` (Set or AtomicAdd on one cell of a signal/count window) and `wait` (block until
one of *its own* cells reaches a threshold).

Nothing the protocol reads may depend on what a window held before the step (review
findings R1, R2 of spec §4):

* pub_counts: every sender publishes its FULL count row-block, zeros included (Set),
  so every cell read in a step was written in that step.
* signals (count_done, data_done, combine_done): one cell per source rank, written once
  per phase with Set(epoch), waited on with ``>= epoch``. Epochs increase by one per
  step, so a value left by any earlier step (< epoch) never opens a barrier. The signals
  are zeroed once at allocation (the host-side reset every runtime does when it creates
  a window); after that the protocol never needs a reset. data_done is separate from
  count_done so that no cell mixes Set and AtomicAdd (the race of spec §3.10, `ccbdc4fa`).
* payload channels and routed_y_buf: only slots below the published counts are read, and
  every origin route is written back exactly once (dropped routes are zeroed by their
  origin), so their prior contents never reach a result.

`poison()` fills every window with garbage to prove the last two points: NaN / huge
values in the payloads, random counts in pub_counts, and random stale epochs (anything
an earlier step could have left, i.e. values below the current epoch) in the signals.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import PAD_COLS

#: Signal windows: one INT64 cell per source rank, monotonic epochs.
SIGNAL_WINDOWS: tuple[str, ...] = ("count_done", "data_done", "combine_done")
#: Payload windows written by peers with `put` (the four dispatch channels + combine).
PAYLOAD_WINDOWS: tuple[str, ...] = ("x_i8", "scale", "weight", "r_route", "routed_y_buf")
WINDOWS: tuple[str, ...] = ("pub_counts",) + SIGNAL_WINDOWS + PAYLOAD_WINDOWS
NOTIFY_OPS: tuple[str, ...] = ("set", "add")


class WindowTimeoutError(TimeoutError):
    """A rank waited longer than the timeout for a peer's signal."""


@dataclass(frozen=True)
class WindowShape:
    """Sizes of one rank's windows: R ranks, NL local experts, C slots each, T·K routes."""

    ranks: int
    n_local: int
    capacity: int
    routes: int
    d_model: int


@dataclass(frozen=True)
class Wait:
    """A pending wait of rank `rank`: its own `window[cell] >= threshold`."""

    rank: int
    window: str
    cell: int
    threshold: int


def _alloc(shape: WindowShape) -> dict[str, torch.Tensor]:
    r, nl, c, n, d = shape.ranks, shape.n_local, shape.capacity, shape.routes, shape.d_model
    rows = nl * c
    return {
        "pub_counts": torch.zeros(r * r, nl, dtype=torch.int32),   # row src·R + dst
        "count_done": torch.zeros(r, dtype=torch.int64),
        "data_done": torch.zeros(r, dtype=torch.int64),
        "combine_done": torch.zeros(r, dtype=torch.int64),
        "x_i8": torch.zeros(rows, d, dtype=torch.int8),              # row e·C + slot
        "scale": torch.zeros(rows, PAD_COLS, dtype=torch.float32),
        "weight": torch.zeros(rows, PAD_COLS, dtype=torch.float32),
        "r_route": torch.zeros(rows, PAD_COLS, dtype=torch.int32),
        "routed_y_buf": torch.zeros(n, d, dtype=torch.bfloat16),    # row = origin route
    }


class SymmetricWindows:
    """The same named windows on every rank, reached through put / notify / wait."""

    def __init__(self, shape: WindowShape) -> None:
        self.shape = shape
        self._win = [_alloc(shape) for _ in range(shape.ranks)]

    # -- reads of one's own windows ---------------------------------------------------
    def local(self, rank: int, window: str) -> torch.Tensor:
        """Rank `rank`'s own window `window` (read access for that rank only)."""
        self._check(rank, window)
        return self._win[rank][window]

    # -- one-sided operations -----------------------------------------------------------
    def put(self, peer: int, window: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write `values` [N, ...] into rows `rows` [N] of `window` on rank `peer`."""
        self._check(peer, window)
        if window not in PAYLOAD_WINDOWS + ("pub_counts",):
            raise ValueError(f"put targets a payload window {list(PAYLOAD_WINDOWS)} or "
                             f"pub_counts, got {window!r}")
        self._win[peer][window][rows] = values.to(self._win[peer][window].dtype)

    def notify(self, peer: int, window: str, cell: int, value: int, op: str = "set") -> None:
        """Set or AtomicAdd `value` into `window[cell]` on rank `peer`."""
        self._check(peer, window)
        if window not in SIGNAL_WINDOWS:
            raise ValueError(f"notify targets a signal window {list(SIGNAL_WINDOWS)}, "
                             f"got {window!r}")
        if op not in NOTIFY_OPS:
            raise ValueError(f"notify op must be one of {list(NOTIFY_OPS)}, got {op!r}")
        w = self._win[peer][window]
        w[cell] = value if op == "set" else w[cell] + value

    def satisfied(self, wait: Wait) -> bool:
        """Whether `wait` may return now."""
        return int(self._win[wait.rank][wait.window][wait.cell]) >= wait.threshold

    # -- test support -------------------------------------------------------------------
    def poison(self, generator: torch.Generator, epoch: int) -> None:
        """Fill every window with garbage; signals get random stale epochs in [0, epoch)."""
        for win in self._win:
            for name, t in win.items():
                if name in SIGNAL_WINDOWS:
                    t.copy_(torch.randint(0, max(epoch, 1), t.shape, generator=generator))
                elif name == "pub_counts":
                    t.copy_(torch.randint(0, 1 << 20, t.shape, generator=generator))
                elif t.dtype in (torch.int8, torch.int32):
                    info = torch.iinfo(t.dtype)
                    t.copy_(torch.randint(info.min, info.max, t.shape, generator=generator))
                else:
                    g = torch.randn(t.shape, generator=generator) * 3e38
                    g.view(-1)[::7] = float("nan")
                    t.copy_(g.to(t.dtype))

    def _check(self, rank: int, window: str) -> None:
        if not 0 <= rank < self.shape.ranks:
            raise ValueError(f"rank must be in [0, {self.shape.ranks}), got {rank}")
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {list(WINDOWS)}, got {window!r}")
