"""Views of a DispatchLayout for the dispatch notebook (spec §3.3-§3.4, §3.9): the slot
table, receive buffers as (source, r_route) lists, receive-window images, bytes per
channel, capacity headroom and what an overflow does.

Pure functions over `moe_kernels.ep.DispatchLayout`: tensors and frozen dataclasses in,
tensors, lists and frozen dataclasses out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..ep.examples import worked_example
from ..ep.layout import DispatchLayout, compute_layout, peer_channel_bytes
from ..types import CapacityError
from .comm import DISPATCH_CHANNELS
from .gate_inputs import route_tokens
from .skew import skew_routing

#: Name of the combine channel in `DispatchLayout.bytes_per_peer`.
COMBINE = "combine"
#: Channels in drawing order: the four dispatch channels, then combine.
ALL_CHANNELS: tuple[str, ...] = DISPATCH_CHANNELS + (COMBINE,)


@dataclass(frozen=True)
class SlotRow:
    """One route of the spec's slot-assignment table."""

    src: int
    t: int
    k: int
    r_route: int
    expert: int      # global expert id g
    dst: int
    e: int           # local expert on dst
    slot: int        # -1 if dropped
    prefix: int      # send_offset[src, dst, e]: the first slot src takes there

    def __str__(self) -> str:
        slot = "dropped" if self.slot < 0 else f"{self.slot} (= {self.prefix} + " \
                                                f"{self.slot - self.prefix})"
        return (f"src {self.src} (t{self.t},k{self.k}) r_route {self.r_route:>3} "
                f"g {self.expert:>3} -> dst {self.dst} e {self.e:>2} slot {slot}")


def slot_table(layout: DispatchLayout, src: int | None = None) -> list[SlotRow]:
    """Every route (of rank `src`, or of all ranks) in scan order src, t, k."""
    srcs = range(layout.ranks) if src is None else [_check_rank(layout, src)]
    rows: list[SlotRow] = []
    k_ = layout.topk
    for s in srcs:
        for t in range(layout.tokens):
            for k in range(k_):
                dst = int(layout.dst_rank[s, t, k])
                e = int(layout.local_expert[s, t, k])
                rows.append(SlotRow(src=s, t=t, k=k, r_route=t * k_ + k,
                                    expert=dst * layout.n_local + e, dst=dst, e=e,
                                    slot=int(layout.slot[s, t, k]),
                                    prefix=int(layout.send_offset[s, dst, e])))
    return rows


def receive_buffers(layout: DispatchLayout) -> list[list[list[tuple[int, int]]]]:
    """[dst][e] -> [(source rank, r_route) per filled slot, in slot order]: the spec's
    "resulting receive buffers" listing."""
    src_map, route_map = layout.receive_map()
    return [[[(int(s), int(r)) for s, r in zip(src_map[d, e].tolist(),
                                               route_map[d, e].tolist(), strict=True)
              if s >= 0] for e in range(layout.n_local)] for d in range(layout.ranks)]


def format_receive_buffers(layout: DispatchLayout) -> str:
    """The receive buffers as text, one line per (rank, local expert)."""
    lines = []
    for d, per_e in enumerate(receive_buffers(layout)):
        lines.append(f"rank {d}:")
        for e, rows in enumerate(per_e):
            body = ", ".join(f"s{i} = {sr}" for i, sr in enumerate(rows)) or "empty"
            lines.append(f"  e{e}: {body}")
    return "\n".join(lines)


def pub_counts(layout: DispatchLayout) -> torch.Tensor:
    """The spec's pub_counts matrix [R·R, NL]: row src·R + dst (what every rank holds
    after the count exchange)."""
    return layout.counts.reshape(layout.ranks * layout.ranks, layout.n_local).clone()


def by_global_expert(mat: torch.Tensor) -> torch.Tensor:
    """[R(src), R(dst), NL] -> [R(src), R·NL]: columns are global experts dst·NL + e."""
    if mat.dim() != 3 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"expected a [R, R, NL] tensor, got shape {tuple(mat.shape)}")
    return mat.reshape(mat.shape[0], -1).clone()


def window_image(layout: DispatchLayout, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank dst's receive window as two [NL, C] int64 images: the source rank of each
    slot and its r_route (-1 where empty). Slot s of expert e is window row e·C + s."""
    d = _check_rank(layout, dst)
    src_map, route_map = layout.receive_map()
    return src_map[d].clone(), route_map[d].clone()


def bytes_per_route(d_model: int) -> dict[str, int]:
    """Bytes one route moves per channel: x_i8 D, scale / weight / r_route one padded
    32-byte tile each, combine one BF16 row (2·D)."""
    return {c: int(b) for c, b in peer_channel_bytes(torch.ones(1, 1), d_model).items()}


@dataclass(frozen=True)
class ChannelBytes:
    """Bytes per (from, to) rank pair and channel, and their totals."""

    per_peer: dict[str, torch.Tensor]   # channel -> [R(from), R(to)] int64

    def total(self, channel: str) -> int:
        """All bytes of one channel (self traffic included)."""
        return int(self.per_peer[channel].sum())

    def link_total(self, channel: str) -> int:
        """Bytes of one channel that cross a link (from != to)."""
        m = self.per_peer[channel]
        return int(m.sum() - torch.diagonal(m).sum())

    def dispatch_total(self) -> int:
        """Sum of the four dispatch channels."""
        return sum(self.total(c) for c in DISPATCH_CHANNELS)

    def rows(self) -> list[dict[str, int | str]]:
        """One row per channel: total and link bytes."""
        return [{"channel": c, "bytes": self.total(c), "link_bytes": self.link_total(c)}
                for c in ALL_CHANNELS]


def channel_bytes(layout: DispatchLayout, d_model: int) -> ChannelBytes:
    """Bytes per peer and channel of the placed routes (DispatchLayout.bytes_per_peer)."""
    return ChannelBytes(per_peer=layout.bytes_per_peer(d_model))


@dataclass(frozen=True)
class Headroom:
    """Receive demand per local expert against the window capacity."""

    demand: torch.Tensor    # [R, NL] int64: rows routed to each local expert (pre-drop)
    capacity: int

    @property
    def headroom(self) -> torch.Tensor:
        """[R, NL] capacity - demand (negative = overflow)."""
        return self.capacity - self.demand

    @property
    def peak_utilisation(self) -> float:
        """Busiest expert's demand / capacity."""
        return float(self.demand.max()) / self.capacity

    @property
    def tightest(self) -> tuple[int, int]:
        """(rank, local expert) with the least headroom (lowest index on a tie)."""
        flat = int(torch.argmax(self.demand.reshape(-1)))
        return divmod(flat, self.demand.shape[1])

    def summary(self) -> str:
        """One line for a notebook printout."""
        r, e = self.tightest
        return (f"capacity {self.capacity} rows per expert; busiest: rank {r} local "
                f"expert {e} with {int(self.demand[r, e])} rows "
                f"({100 * self.peak_utilisation:.0f} % of capacity, headroom "
                f"{int(self.headroom[r, e])} rows); mean demand "
                f"{float(self.demand.double().mean()):.1f} rows")


def headroom(layout: DispatchLayout) -> Headroom:
    """Demand (counts summed over sources, before any drop) vs the layout's capacity."""
    return Headroom(demand=layout.counts.sum(0), capacity=layout.capacity)


def capacity_for_factor(tokens: int, topk: int, n_local: int, factor: float) -> int:
    """Receive capacity that is `factor` x the mean rows per local expert:
    max(1, ceil(T·K/NL · factor))."""
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    for name, v in (("tokens", tokens), ("topk", topk), ("n_local", n_local)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return max(1, math.ceil(tokens * topk / n_local * factor))


@dataclass(frozen=True)
class OverflowOutcome:
    """The same routing at a reduced capacity, in both overflow modes."""

    capacity: int
    error: str | None           # CapacityError message (overflow="error"), or None
    dropped: torch.Tensor       # [R, NL] int64 routes dropped (overflow="drop")
    placed: torch.Tensor        # [R, NL] int64 rows placed (overflow="drop")
    layout: DispatchLayout      # the overflow="drop" layout

    @property
    def overflowed(self) -> bool:
        return self.error is not None

    @property
    def dropped_total(self) -> int:
        return int(self.dropped.sum())

    @property
    def routes_total(self) -> int:
        return int(self.layout.counts.sum())

    def summary(self) -> str:
        """What each mode did, one paragraph."""
        if not self.overflowed:
            return f"capacity {self.capacity}: no expert overflows, nothing dropped"
        return (f"overflow='error' raises CapacityError: {self.error}\n"
                f"overflow='drop' places {int(self.placed.sum())} rows and drops "
                f"{self.dropped_total} of {self.routes_total} routes "
                f"({100 * self.dropped_total / self.routes_total:.1f} %); dropped per "
                f"rank {self.dropped.sum(1).tolist()}")


def overflow_outcome(indices: torch.Tensor, n_local: int, capacity: int) -> OverflowOutcome:
    """compute_layout of indices [R,T,K] at `capacity` with overflow="error" (message
    kept) and overflow="drop" (dropped / placed per local expert)."""
    try:
        compute_layout(indices, n_local, capacity, overflow="error")
        error = None
    except CapacityError as exc:
        error = str(exc)
    lay = compute_layout(indices, n_local, capacity, overflow="drop")
    return OverflowOutcome(capacity=capacity, error=error, dropped=lay.dropped.clone(),
                           placed=lay.recv_count.clone(), layout=lay)


@dataclass(frozen=True)
class LayoutInputs:
    """What the dispatch notebook lays out: routing indices, sizes, capacity, source."""

    indices: torch.Tensor   # [R, T, K] int64 global expert ids
    n_local: int
    capacity: int
    d_model: int
    source: str             # where the routing comes from (for titles and printouts)

    @property
    def ranks(self) -> int:
        return int(self.indices.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.indices.shape[1])

    @property
    def topk(self) -> int:
        return int(self.indices.shape[2])

    def layout(self, capacity: int | None = None, overflow: str = "drop"
               ) -> DispatchLayout:
        """compute_layout at the inputs' capacity (or `capacity`); overflow "drop" by
        default so an over-full window is reported, not raised."""
        return compute_layout(self.indices, self.n_local,
                              self.capacity if capacity is None else capacity, overflow)


def layout_inputs(run: RunConfig, seed: int, skew: float = 0.0,
                  use_worked_example: bool = False) -> LayoutInputs:
    """The routing the dispatch notebook draws: the spec's §3.9 worked example (R=2,
    T=4, NL=4, K=2, capacity 5; run's sizes ignored except D), or the gate's `run.routing`
    route on every rank's fixture tokens, with the synthetic skew applied when skew > 0."""
    d = run.model.hidden_size
    if use_worked_example:
        ex = worked_example()
        return LayoutInputs(indices=ex.indices(), n_local=ex.n_local, capacity=ex.capacity,
                            d_model=d, source="the worked example")
    base = route_tokens(run, seed).indices(run.routing).to(torch.int64)
    n_experts = run.model.n_routed_experts
    idx = skew_routing(base, n_experts, skew, seed).to(torch.int64) if skew > 0 else base
    src = f"{run.model.name}, {run.routing} route" + (f", skew {skew:g}" if skew > 0 else "")
    return LayoutInputs(indices=idx, n_local=run.n_local, capacity=run.recv_max,
                        d_model=d, source=src)


def _check_rank(layout: DispatchLayout, rank: int) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < layout.ranks:
        raise ValueError(f"rank must be an integer in [0, {layout.ranks}), got {rank!r}")
    return rank
