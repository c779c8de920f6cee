"""Views of the combine for the per-rank combine notebook (spec §3.6-§3.7): where each
routed_y_buf row comes from, the push-back walk of one expert-owning rank, the terms of
the reduce and what its order does.

Pure functions over a DispatchLayout and stage tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ep.layout import DispatchLayout
from ..numerics import bf16_rint
from ..reference.dispatch_combine import reduce_routes


@dataclass(frozen=True)
class RowSources:
    """For every origin rank's routed_y_buf row r = t·K + k: who computed it."""

    owner: torch.Tensor    # [R(origin), T, K] int64 expert-owning rank, -1 if dropped
    expert: torch.Tensor   # [R, T, K] int64 global expert id
    slot: torch.Tensor     # [R, T, K] int64 slot in the owner's window, -1 if dropped

    def rows_from(self) -> torch.Tensor:
        """[R(origin), R(owner)] int64: routed_y_buf rows each owner pushes back to each
        origin (dropped routes not counted)."""
        r = self.owner.shape[0]
        out = torch.zeros(r, r, dtype=torch.int64)
        for o in range(r):
            own = self.owner[o].reshape(-1)
            out[o] = torch.bincount(own[own >= 0], minlength=r)
        return out


def row_sources(layout: DispatchLayout) -> RowSources:
    """RowSources of a layout: owner = dst_rank of the route (−1 if it was dropped)."""
    dropped = layout.slot < 0
    owner = torch.where(dropped, torch.full_like(layout.dst_rank, -1), layout.dst_rank)
    return RowSources(owner=owner.clone(),
                      expert=(layout.dst_rank * layout.n_local + layout.local_expert).clone(),
                      slot=layout.slot.clone())


@dataclass(frozen=True)
class PushbackRow:
    """One row of rank `owner`'s push-back: recv_y[e, slot] -> routed_y_buf[r_route]
    on rank `origin`."""

    owner: int
    origin: int
    e: int
    slot: int
    r_route: int

    def __str__(self) -> str:
        return (f"rank {self.owner} e{self.e} s{self.slot} -> rank {self.origin} "
                f"routed_y_buf row {self.r_route}")


def pushback_rows(layout: DispatchLayout, owner: int) -> list[PushbackRow]:
    """Rank `owner`'s push-back in the spec's order (§3.6 step 1): for each origin rank
    dst (ascending), each local expert e, the slots [src_off, src_off + n) that dst's
    routes took, each returned to routed_y_buf[r_route] on dst."""
    if not isinstance(owner, int) or not 0 <= owner < layout.ranks:
        raise ValueError(f"owner must be a rank in [0, {layout.ranks}), got {owner!r}")
    src_map, route_map = layout.receive_map()
    out: list[PushbackRow] = []
    placed = layout.placed
    for origin in range(layout.ranks):
        for e in range(layout.n_local):
            off = int(layout.send_offset[origin, owner, e])
            for slot in range(off, off + int(placed[origin, owner, e])):
                if int(src_map[owner, e, slot]) != origin:  # pragma: no cover - invariant
                    raise RuntimeError(f"slot {slot} of rank {owner} expert {e} is not "
                                       f"held by origin {origin}: layout is inconsistent")
                out.append(PushbackRow(owner=owner, origin=origin, e=e, slot=slot,
                                       r_route=int(route_map[owner, e, slot])))
    return out


def reduce_terms(sh: torch.Tensor, routed_y_buf: torch.Tensor, k: int) -> torch.Tensor:
    """RMS per token of each term of the reduce: sh [T,D] and routed_y_buf [T·K,D]
    -> [T, 1+K] FP64 (column 0 the shared expert, column 1+j route k=j)."""
    t, d = sh.shape
    if routed_y_buf.shape != (t * k, d):
        raise ValueError(f"routed_y_buf must be [T·K, D] = [{t * k}, {d}] for sh {t}x{d} "
                         f"and k={k}, got {tuple(routed_y_buf.shape)}")
    terms = torch.cat([sh.to(torch.float64).unsqueeze(1),
                       routed_y_buf.to(torch.float64).reshape(t, k, d)], dim=1)
    return terms.pow(2).mean(dim=-1).sqrt()


@dataclass(frozen=True)
class ReduceCheck:
    """The reduce recomputed from sh and routed_y_buf: the spec's way, in reverse order,
    and with BF16 instead of FP32 accumulation."""

    spec_order_matches: bool   # bf16(sh + y_0 + ... + y_{K-1}) == ffn_out bit for bit
    reversed_differs: int      # elements where bf16(y_{K-1} + ... + y_0 + sh) differs
    bf16_accum_differs: int    # elements where rounding to BF16 after every add differs
    numel: int

    def summary(self) -> str:
        verdict = "bit-identical to" if self.spec_order_matches else "DIFFERENT from"
        pct = 100 / self.numel if self.numel else 0.0
        return (f"the spec's reduce (FP32, sh then k = 0..K-1) is {verdict} ffn_out; "
                f"reverse order changes {self.reversed_differs} of {self.numel} elements "
                f"({pct * self.reversed_differs:.2f} %), BF16 accumulation changes "
                f"{self.bf16_accum_differs} ({pct * self.bf16_accum_differs:.2f} %)")


def reduce_check(sh: torch.Tensor, routed_y_buf: torch.Tensor, k: int,
                 ffn_out: torch.Tensor) -> ReduceCheck:
    """Recompute ffn_out [T,D] (or [B,S,D]) from sh [T,D] and routed_y_buf [T·K,D]."""
    t, d = sh.shape
    if routed_y_buf.shape != (t * k, d):
        raise ValueError(f"routed_y_buf must be [T·K, D] = [{t * k}, {d}], got "
                         f"{tuple(routed_y_buf.shape)}")
    want = ffn_out.reshape(t, d)
    spec = reduce_routes(sh, routed_y_buf, k)
    ys = routed_y_buf.to(torch.float32).reshape(t, k, d)
    acc = ys[:, k - 1].clone()
    for j in range(k - 2, -1, -1):
        acc = acc + ys[:, j]
    rev = bf16_rint(acc + sh.to(torch.float32))
    acc16 = sh.clone()
    for j in range(k):
        acc16 = bf16_rint(acc16.to(torch.float32) + ys[:, j])
    return ReduceCheck(spec_order_matches=bool(torch.equal(spec, want)),
                       reversed_differs=int((rev != spec).sum()),
                       bf16_accum_differs=int((acc16 != spec).sum()), numel=spec.numel())
