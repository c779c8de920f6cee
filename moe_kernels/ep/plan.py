"""The EP program's slot planning in two phases, so most of it hides behind the counts.

`layout.plan_rank` is the readable, pure statement of a rank's plan (used by
`compute_layout`). The program calls the same computation split in two:

* `count_routes(indices, ...)`: my histogram, published first;
* `presort(rank, counts)` needs only my own routes, so it runs while the count
  all_gather travels: the (dst, e, scan) order and each route's rank in its bucket;
* `finish_plan(pre, table, ...)` adds the table's offsets: slots, capacity and drops,
  and the rows I receive in arrival order.

Both are a fixed number of vectorised NumPy ops on these small index arrays (about 2x
faster than torch's per-op overhead; no per-route or per-expert Python loops), sharing
memory with the RankPlan's torch tensors, which equal `plan_rank`'s (checked by
tests/test_ep_plan.py). The global expert id g is already the bucket id dst·NL + e
(spec §3.3), so no bucket is computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .layout import RankPlan, check_capacity


@dataclass(frozen=True)
class PreSort:
    """My routes sorted by bucket, before any count table (see `presort`); NumPy int64,
    torch views share the memory."""

    rank: int
    n_local: int
    ranks: int
    order: np.ndarray          # [N] route ids by (dst, e, scan): send_order
    sorted_bucket: np.ndarray  # [N] bucket of order[i]
    cursor: np.ndarray         # [N] rank of order[i] within its bucket
    hist: np.ndarray           # [R(dst), NL] my routes per bucket (zeros too)
    order_t: torch.Tensor      # `order` as torch
    dst_rank: torch.Tensor     # [N] int64 per route r
    local_expert: torch.Tensor  # [N] int64 per route r
    send_split: torch.Tensor   # [R] routes per destination (before any drop)


@dataclass(frozen=True)
class RouteCounts:
    """My routes' buckets and histogram: all the count exchange needs (NumPy)."""

    n_local: int
    ranks: int
    bucket: np.ndarray   # [N] global expert id = dst·NL + e, per route r = t·K + k
    hist: np.ndarray     # [R(dst), NL] my routes per bucket (zeros too)

    @property
    def hist_t(self) -> torch.Tensor:
        """`hist` as a torch tensor (shares memory)."""
        return torch.from_numpy(self.hist)


def count_routes(indices: torch.Tensor, n_local: int, ranks: int) -> RouteCounts:
    """indices [T,K] global expert ids -> my histogram, checked to be in range; the
    first thing a rank computes, so its counts leave before it sorts or packs."""
    g = indices.reshape(-1).numpy()
    n_experts = ranks * n_local
    try:
        hist = np.bincount(g, minlength=n_experts)   # longer iff an id >= n_experts
    except ValueError:                                 # a negative id
        hist = np.zeros(0, dtype=np.int64)
    if hist.shape[0] != n_experts:
        raise ValueError(f"indices must be global expert ids in [0, {n_experts}) "
                         f"(ranks {ranks} x n_local {n_local}), got range "
                         f"[{int(g.min())}, {int(g.max())}]")
    return RouteCounts(n_local=n_local, ranks=ranks, bucket=g.astype(np.int64),
                       hist=hist.reshape(ranks, n_local))


def presort(rank: int, counts: RouteCounts) -> PreSort:
    """Everything of my plan that does not need the count table."""
    g, hist = counts.bucket, counts.hist.reshape(-1)
    order = np.argsort(g, kind="stable")
    sorted_b = g[order]
    cursor = np.arange(g.size) - np.repeat(np.cumsum(hist) - hist, hist)  # rank in bucket
    dst, e = np.divmod(g, counts.n_local)
    f = torch.from_numpy
    return PreSort(rank=rank, n_local=counts.n_local, ranks=counts.ranks, order=order,
                   sorted_bucket=sorted_b, cursor=cursor, hist=counts.hist,
                   order_t=f(order), dst_rank=f(dst), local_expert=f(e),
                   send_split=f(counts.hist.sum(1)))


def finish_plan(pre: PreSort, table: torch.Tensor, capacity: int,
                overflow: str = "error") -> RankPlan:
    """My RankPlan from my presort and the count table [R(src),R(dst),NL] every rank
    published; raises CapacityError in overflow="error" mode (same as plan_rank)."""
    me, nl, ranks = pre.rank, pre.n_local, pre.ranks
    t = table.numpy()
    over = t.sum(0) - capacity                           # [R(dst), NL]
    any_over = bool((over > 0).any())
    if any_over:
        check_capacity(table, capacity, overflow)        # raises in "error" mode
    offset = np.cumsum(t, 0) - t                         # [R(src),R(dst),NL] exclusive
    slot_sorted = offset[me].reshape(-1)[pre.sorted_bucket] + pre.cursor
    slot = np.empty_like(slot_sorted)
    my_off = offset[:, me, :]                            # [R(src), NL]
    f = torch.from_numpy
    if not any_over:                                     # nothing dropped anywhere
        order, send_split = pre.order_t, pre.send_split
        slot[pre.order] = slot_sorted
        dropped_routes = torch.zeros(0, dtype=torch.int64)
        n_from = t[:, me, :]
        dropped = torch.zeros(nl, dtype=torch.int64)
    else:
        keep = slot_sorted < capacity
        order = f(pre.order[keep])
        slot[pre.order] = np.where(keep, slot_sorted, -1)
        send_split = f(np.bincount(pre.sorted_bucket[keep] // nl, minlength=ranks))
        dropped_routes = f(np.flatnonzero(slot < 0))
        n_from = np.clip(np.minimum(my_off + t[:, me, :], capacity) - my_off, 0, None)
        dropped = f(np.maximum(over[me], 0))
    lengths = n_from.reshape(-1)
    starts = (my_off + np.arange(0, nl * capacity, capacity)).reshape(-1)
    seg_first = np.cumsum(lengths) - lengths
    recv_rows = np.repeat(starts - seg_first, lengths) + np.arange(int(lengths.sum()))
    return RankPlan(rank=me, dst_rank=pre.dst_rank, local_expert=pre.local_expert,
                    slot=f(slot), order=order, send_split=send_split,
                    dropped_routes=dropped_routes, recv_count=f(n_from.sum(0)),
                    recv_split=f(n_from.sum(1)), recv_rows=f(recv_rows), dropped=dropped,
                    recv_from=f(n_from), recv_offset=f(my_off))
