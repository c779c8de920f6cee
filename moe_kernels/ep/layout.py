"""The dispatch layout: where every route lands, computed once, pure and inspectable.

Spec §3.3-§3.4. Global expert g lives on rank ``dst = g // NL`` as local expert
``e = g % NL``. Rank ``src``'s routes to (dst, e) take the slots
``[send_offset[src,dst,e], send_offset[src,dst,e] + counts[src,dst,e])`` of dst's expert
e, where ``send_offset = Σ_{s<src} counts[s,dst,e]`` (src-major), and within one source the
routes keep that source's t-major / k-minor scan order (slot = prefix + cursor).

The same few pure functions serve two callers: `compute_layout` (every rank's indices at
once, for notebooks and tests) and the EP program, where each rank plans its own routes
from the exchanged count table (`plan_rank`). `DispatchLayout` plays the role of DeepEP's
dispatch handle: pure data, printable, reused by combine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_int
from ..types import CapacityError

#: Allowed values of the `overflow` argument.
OVERFLOW_MODES: tuple[str, ...] = ("error", "drop")
#: Width in elements of the padded scalar channels: FP32/INT32 rows are padded to 8
#: columns so that each pushed row is one 32-byte minimum tile (spec §1.3 W_PAD/IDX_PAD).
PAD_COLS = 8
#: Bytes per route of each scalar channel (8 columns x 4 bytes).
PAD_BYTES = PAD_COLS * 4


@dataclass(frozen=True)
class RankPlan:
    """What one rank knows after the count exchange: the layout restricted to itself.

    Routes are numbered r = t·K + k (the spec's r_route). `order` lists the placed routes
    sorted by (dst, e, slot): the order a sender packs its outgoing rows, destination by
    destination. `recv_rows` lists, for the rows this rank receives, their flat window
    row ``e·C + slot`` in (src, e, slot) order: the order they arrive from an all-to-all.
    """

    rank: int
    dst_rank: torch.Tensor      # [T*K] int64
    local_expert: torch.Tensor  # [T*K] int64
    slot: torch.Tensor          # [T*K] int64, -1 if dropped
    order: torch.Tensor         # [P] int64 route ids of placed routes, by (dst, e, slot)
    send_split: torch.Tensor    # [R] int64 placed routes per destination
    dropped_routes: torch.Tensor  # [P'] int64 route ids beyond capacity
    recv_count: torch.Tensor    # [NL] int64 rows placed in my window per local expert
    recv_split: torch.Tensor    # [R] int64 rows I receive from each source
    recv_rows: torch.Tensor     # [sum(recv_split)] int64 flat rows e·C + slot, by (src,e,slot)
    dropped: torch.Tensor       # [NL] int64 routes to my experts beyond capacity
    recv_from: torch.Tensor     # [R(src),NL] int64 rows placed in my window per source
    recv_offset: torch.Tensor   # [R(src),NL] int64 first slot of each source's rows

    def recv_segments(self) -> list[tuple[int, int, int, int]]:
        """(arrival row, local expert, first slot, rows) of every non-empty (src, e)
        block, in arrival (src, e) order: lets a transport copy whole blocks."""
        segs, pos = [], 0
        n_local = self.recv_from.shape[1]
        for i, (n, off) in enumerate(zip(self.recv_from.reshape(-1).tolist(),
                                         self.recv_offset.reshape(-1).tolist(), strict=True)):
            if n:
                segs.append((pos, i % n_local, off, n))
                pos += n
        return segs


@dataclass(frozen=True)
class DispatchLayout:
    """Every route's destination rank, local expert and slot, for all R ranks.

    counts [R(src),R(dst),NL]: routes from src to local expert e of dst (before any drop).
    send_offset [R(src),R(dst),NL]: Σ_{s<src} counts[s,dst,e], the first slot src takes.
    recv_count [R,NL]: rows actually placed (<= capacity).
    slot / dst_rank / local_expert [R,T,K]: per route of rank src; slot -1 if dropped.
    dropped [R(dst),NL]: routes beyond capacity (zeros unless overflow="drop").
    """

    ranks: int
    n_local: int
    tokens: int
    topk: int
    capacity: int
    counts: torch.Tensor
    send_offset: torch.Tensor
    recv_count: torch.Tensor
    slot: torch.Tensor
    dst_rank: torch.Tensor
    local_expert: torch.Tensor
    dropped: torch.Tensor

    @property
    def placed(self) -> torch.Tensor:
        """[R(src),R(dst),NL] int64: routes of src actually placed at (dst, e)."""
        end = torch.clamp(self.send_offset + self.counts, max=self.capacity)
        return torch.clamp(end - self.send_offset, min=0)

    def routes_per_peer(self) -> torch.Tensor:
        """[R(src),R(dst)] int64: placed routes from src to dst (diagonal = to itself)."""
        return self.placed.sum(-1)

    def bytes_per_peer(self, d_model: int) -> dict[str, torch.Tensor]:
        """Bytes each rank sends each rank, per channel: [R(from), R(to)] int64.

        Dispatch channels flow origin -> expert owner: x_i8 (D bytes per route), scale,
        weight and r_route (32 bytes each: one FP32/INT32 value padded to an 8-column
        tile). "combine" flows back, owner -> origin: one BF16 row, 2·D bytes per route.
        The diagonal is a rank's traffic to itself (a local copy on real hardware).
        """
        return peer_channel_bytes(self.routes_per_peer(), d_model)

    def receive_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(src_rank, r_route), each [R(dst), NL, C] int64: who filled each window slot
        and with which origin route; -1 in empty slots. What a slot-map figure draws."""
        r, nl, c = self.ranks, self.n_local, self.capacity
        src_map = torch.full((r, nl, c), -1, dtype=torch.int64)
        route_map = torch.full((r, nl, c), -1, dtype=torch.int64)
        flat_slot = self.slot.reshape(r, -1)
        routes = torch.arange(flat_slot.shape[1])
        for src in range(r):
            keep = flat_slot[src] >= 0
            d = self.dst_rank.reshape(r, -1)[src][keep]
            e = self.local_expert.reshape(r, -1)[src][keep]
            s = flat_slot[src][keep]
            src_map[d, e, s] = src
            route_map[d, e, s] = routes[keep]
        return src_map, route_map

    def to_dump(self) -> dict[str, torch.Tensor]:
        """The dump's `layout` entry (int64 tensors, see the class docstring)."""
        return {"counts": self.counts.clone(), "recv_count": self.recv_count.clone(),
                "slot": self.slot.clone(), "dst_rank": self.dst_rank.clone(),
                "local_expert": self.local_expert.clone()}

    def __str__(self) -> str:
        lines = [f"DispatchLayout(R={self.ranks}, NL={self.n_local}, T={self.tokens}, "
                 f"K={self.topk}, capacity={self.capacity}, "
                 f"dropped={int(self.dropped.sum())})"]
        for dst in range(self.ranks):
            lines.append(f"  rank {dst} recv_count {self.recv_count[dst].tolist()}")
            for src in range(self.ranks):
                lines.append(f"    from {src}: counts {self.counts[src, dst].tolist()} "
                             f"offset {self.send_offset[src, dst].tolist()}")
        return "\n".join(lines)


def peer_channel_bytes(routes: torch.Tensor, d_model: int) -> dict[str, torch.Tensor]:
    """routes [R(src),R(dst)] -> bytes per channel [R(from),R(to)] int64, the byte
    accounting of `DispatchLayout.bytes_per_peer`: x_i8 D, scale / weight / r_route one
    PAD_BYTES tile each per route (origin -> owner); "combine" one BF16 row (2·D) per
    route, owner -> origin (the transpose)."""
    check_int("d_model", d_model)
    routes = routes.to(torch.int64)
    return {"x_i8": routes * d_model, "scale": routes * PAD_BYTES,
            "weight": routes * PAD_BYTES, "r_route": routes * PAD_BYTES,
            "combine": routes.T.contiguous() * (2 * d_model)}


def check_overflow_mode(overflow: str) -> None:
    """Raise a ValueError naming the allowed values unless `overflow` is one of them."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {list(OVERFLOW_MODES)}, got {overflow!r}")


def route_targets(indices: torch.Tensor, n_local: int, ranks: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [..., T, K] global expert ids -> (dst_rank, local_expert), same shape, int64."""
    g = indices.to(torch.int64)
    n_experts = ranks * n_local
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_experts):
        raise ValueError(f"indices must be global expert ids in [0, {n_experts}) "
                         f"(ranks {ranks} x n_local {n_local}), got range "
                         f"[{int(g.min())}, {int(g.max())}]")
    return g // n_local, g % n_local


def send_histogram(indices: torch.Tensor, n_local: int, ranks: int) -> torch.Tensor:
    """One rank's routes per (dst, e): indices [T,K] -> [R, NL] int64 (zeros included)."""
    dst, e = route_targets(indices, n_local, ranks)
    bucket = (dst * n_local + e).reshape(-1)
    return torch.bincount(bucket, minlength=ranks * n_local).reshape(ranks, n_local)


def scan_cursor(bucket: torch.Tensor) -> torch.Tensor:
    """cursor[i] = number of earlier routes (scan order) in the same bucket as route i."""
    n = bucket.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(bucket, stable=True).indices
    sorted_b = bucket[order]
    pos = torch.arange(n)
    is_first = torch.ones(n, dtype=torch.bool)
    is_first[1:] = sorted_b[1:] != sorted_b[:-1]
    first = torch.cummax(torch.where(is_first, pos, torch.zeros_like(pos)), dim=0).values
    cursor = torch.empty(n, dtype=torch.int64)
    cursor[order] = pos - first
    return cursor


def send_order(bucket: torch.Tensor) -> torch.Tensor:
    """Route ids sorted by bucket dst·NL + e, scan order kept: the order a sender packs
    its rows, (dst, e, slot). It does not depend on the count table, so a sender may
    pack before the table arrives (and drop the overflowing rows afterwards)."""
    return torch.sort(bucket.reshape(-1), stable=True).indices


def check_capacity(table: torch.Tensor, capacity: int, overflow: str) -> torch.Tensor:
    """table [R(src),R(dst),NL] -> dropped [R(dst),NL]; raises in overflow="error" mode."""
    total = table.sum(0)
    over = total - capacity
    if overflow == "error" and bool((over > 0).any()):
        bad = torch.nonzero(over > 0)
        dst, e = (int(v) for v in bad[0])
        n_local = table.shape[2]
        more = f" (and {len(bad) - 1} more experts over capacity)" if len(bad) > 1 else ""
        raise CapacityError(
            f"receive capacity overflow: rank {dst} local expert {e} (global expert "
            f"{dst * n_local + e}) receives count={int(total[dst, e])} rows, capacity="
            f"{capacity}{more}; raise RunConfig.recv_capacity / recv_safety or pass "
            f"overflow='drop'")
    return torch.clamp(over, min=0)


def plan_rank(rank: int, indices: torch.Tensor, table: torch.Tensor, capacity: int,
              overflow: str = "error") -> RankPlan:
    """Rank `rank`'s view of the layout, from its own indices [T,K] and the full count
    table [R(src),R(dst),NL] every rank published. Pure; every rank computes the same
    offsets from the same table, so sender and receiver agree (spec §3.8)."""
    ranks, _, n_local = table.shape
    dropped_all = check_capacity(table, capacity, overflow)
    dst, e = route_targets(indices, n_local, ranks)
    dst, e = dst.reshape(-1), e.reshape(-1)
    bucket = dst * n_local + e
    n = bucket.numel()
    offset = torch.cumsum(table, 0) - table              # [R(src),R(dst),NL] exclusive
    # In (dst, e, scan) order a route's slot is its bucket's offset plus its rank within
    # the bucket, i.e. its position minus the bucket's first position (one sort total).
    pre = send_order(bucket)                             # (dst, e, cursor) = (dst, e, slot)
    sorted_b = bucket[pre]
    hist = torch.bincount(bucket, minlength=ranks * n_local)
    base = offset[rank].reshape(-1) - (torch.cumsum(hist, 0) - hist)
    slot_sorted = base[sorted_b] + torch.arange(n)
    keep_sorted = slot_sorted < capacity
    order = pre[keep_sorted]
    slot = torch.empty(n, dtype=torch.int64)
    slot[pre] = slot_sorted.masked_fill_(~keep_sorted, -1)
    send_split = torch.bincount(sorted_b[keep_sorted] // n_local, minlength=ranks)
    # rows I receive: for each src, expert e, slots [offset, min(offset+count, C))
    my_off = offset[:, rank, :]                           # [R(src), NL]
    my_end = torch.clamp(my_off + table[:, rank, :], max=capacity)
    n_from = torch.clamp(my_end - my_off, min=0)           # [R(src), NL] placed rows
    starts = (my_off + torch.arange(n_local) * capacity).reshape(-1)
    lengths = n_from.reshape(-1)
    seg_first = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    recv_rows = (torch.repeat_interleave(starts - seg_first, lengths, output_size=total)
                 + torch.arange(total)) if total else torch.zeros(0, dtype=torch.int64)
    return RankPlan(rank=rank, dst_rank=dst, local_expert=e, slot=slot, order=order,
                    send_split=send_split, dropped_routes=torch.nonzero(slot < 0).flatten(),
                    recv_count=n_from.sum(0), recv_split=n_from.sum(1),
                    recv_rows=recv_rows, dropped=dropped_all[rank], recv_from=n_from,
                    recv_offset=my_off.clone())


def layout_from_plans(table: torch.Tensor, plans: list[RankPlan], tokens: int, topk: int,
                      capacity: int) -> DispatchLayout:
    """Assemble the global layout from every rank's plan and the shared count table."""
    ranks, _, n_local = table.shape
    shape = (ranks, tokens, topk)
    return DispatchLayout(
        ranks=ranks, n_local=n_local, tokens=tokens, topk=topk, capacity=capacity,
        counts=table.clone(), send_offset=torch.cumsum(table, 0) - table,
        recv_count=torch.stack([p.recv_count for p in plans]),
        slot=torch.stack([p.slot for p in plans]).reshape(shape),
        dst_rank=torch.stack([p.dst_rank for p in plans]).reshape(shape),
        local_expert=torch.stack([p.local_expert for p in plans]).reshape(shape),
        dropped=torch.stack([p.dropped for p in plans]))


def compute_layout(indices: torch.Tensor, n_local: int, capacity: int,
                   overflow: str = "error") -> DispatchLayout:
    """Every rank's routing indices [R,T,K] (global expert ids) -> DispatchLayout.

    Pure. Raises CapacityError (naming rank, expert, count, capacity) if a local
    expert receives more than `capacity` rows, unless overflow="drop": then the routes
    beyond capacity (the last ones in src-major, t-major / k-minor order) get slot -1,
    are counted in `dropped[dst, e]`, and the EP program gives them zero contribution.
    """
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3:
        raise ValueError(f"indices must be a [R,T,K] tensor of global expert ids, got "
                         f"{getattr(indices, 'shape', type(indices))}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must have an integer dtype, got {indices.dtype}")
    check_int("n_local", n_local)
    check_int("capacity", capacity)
    check_overflow_mode(overflow)
    ranks, tokens, topk = indices.shape
    if ranks < 1:
        raise ValueError("indices must hold at least one rank (R >= 1)")
    table = torch.stack([send_histogram(indices[r], n_local, ranks) for r in range(ranks)])
    plans = [plan_rank(r, indices[r], table, capacity, overflow) for r in range(ranks)]
    return layout_from_plans(table, plans, tokens, topk, capacity)
