"""The spec's §3.9 worked example as data: 2 ranks, 4 tokens each, NL = 4 local experts
(8 global experts), top-2, receive capacity 5 (the spec assumes RECV_MAX >= 5).

Everything is stored as nested tuples (immutable) and turned into fresh tensors on
request, so importing this module creates no shared mutable state. The expected slots,
count table and receive buffers are the spec's tables, copied verbatim, so a test or a
notebook can check `compute_layout` against them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import DispatchLayout, compute_layout

#: indices[src][t] = [k0, k1] global expert ids (spec §3.9 "Routing" table).
_ROUTING: tuple[tuple[tuple[int, int], ...], ...] = (
    ((1, 5), (5, 2), (1, 6), (7, 1)),      # rank 0
    ((5, 1), (0, 6), (5, 4), (2, 1)),      # rank 1
)
#: slot[src][t] = [slot of k0, slot of k1] (spec §3.9 "Slot assignment" table).
_SLOTS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 0), (1, 0), (1, 0), (0, 2)),
    ((2, 3), (0, 1), (3, 0), (1, 4)),
)
#: pub_counts rows src·R + dst, columns e0..e3 (spec §3.9 "pub_counts" table).
_PUB_COUNTS: tuple[tuple[int, ...], ...] = (
    (0, 3, 1, 0), (0, 2, 1, 1), (1, 2, 1, 0), (1, 2, 1, 0))
#: recv_count per rank and local expert (spec §3.9 "Prefix sums").
_RECV_COUNT: tuple[tuple[int, ...], ...] = ((1, 5, 2, 0), (1, 4, 2, 1))
#: Receive buffers: per rank, per local expert, (source rank, r_route) per slot.
_RECV: tuple[tuple[tuple[tuple[int, int], ...], ...], ...] = (
    (((1, 2),), ((0, 0), (0, 4), (0, 7), (1, 1), (1, 7)), ((0, 3), (1, 6)), ()),
    (((1, 5),), ((0, 1), (0, 2), (1, 0), (1, 4)), ((0, 5), (1, 3)), ((0, 6),)),
)


@dataclass(frozen=True)
class WorkedExample:
    """The §3.9 example: its sizes, routing and the spec's expected results."""

    ranks: int = 2
    tokens: int = 4
    n_local: int = 4
    topk: int = 2
    capacity: int = 5
    routing: tuple[tuple[tuple[int, int], ...], ...] = _ROUTING
    slots: tuple[tuple[tuple[int, int], ...], ...] = _SLOTS
    pub_counts: tuple[tuple[int, ...], ...] = _PUB_COUNTS
    recv_count: tuple[tuple[int, ...], ...] = _RECV_COUNT
    receive_buffers: tuple[tuple[tuple[tuple[int, int], ...], ...], ...] = _RECV

    @property
    def n_experts(self) -> int:
        """Global experts (R · NL = 8)."""
        return self.ranks * self.n_local

    def indices(self) -> torch.Tensor:
        """A fresh [R,T,K] int64 tensor of the routing table."""
        return torch.tensor(self.routing, dtype=torch.int64)

    def layout(self, capacity: int | None = None, overflow: str = "error"
               ) -> DispatchLayout:
        """compute_layout of the example (capacity defaults to the spec's 5)."""
        return compute_layout(self.indices(), self.n_local,
                              self.capacity if capacity is None else capacity, overflow)


def worked_example() -> WorkedExample:
    """The spec's §3.9 worked example."""
    return WorkedExample()


def check_against_spec(layout: DispatchLayout, example: WorkedExample | None = None
                       ) -> dict[str, bool]:
    """Which parts of `layout` equal the spec's §3.9 tables: slots, pub_counts,
    recv_count and receive buffers ((source, r_route) per slot)."""
    ex = example if example is not None else worked_example()
    r, nl = ex.ranks, ex.n_local
    if (layout.ranks, layout.n_local, layout.tokens, layout.topk) != (r, nl, ex.tokens,
                                                                       ex.topk):
        raise ValueError(f"layout has R={layout.ranks}, NL={layout.n_local}, "
                         f"T={layout.tokens}, K={layout.topk}; the worked example needs "
                         f"R={r}, NL={nl}, T={ex.tokens}, K={ex.topk}")
    src_map, route_map = layout.receive_map()
    got = tuple(tuple(tuple((int(s), int(q)) for s, q in zip(src_map[d, e].tolist(),
                                                            route_map[d, e].tolist(),
                                                            strict=True) if s >= 0)
                      for e in range(nl)) for d in range(r))
    return {"slots": layout.slot.tolist() == [[list(k) for k in t] for t in ex.slots],
            "pub_counts": layout.counts.reshape(r * r, nl).tolist()
            == [list(row) for row in ex.pub_counts],
            "recv_count": layout.recv_count.tolist() == [list(c) for c in ex.recv_count],
            "receive_buffers": got == ex.receive_buffers}
