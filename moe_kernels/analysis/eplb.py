"""EPLB-style what-if: replicate hot experts into redundant slots and re-balance ranks.

Rules (a simplified DeepSeek EPLB; the home placement is kept):

1. Slots. Every rank keeps its NL home experts (expert g on rank g // NL) and gains
   `redundant / R` extra slots, so slots per rank = NL + redundant / R; `redundant` must
   be a multiple of R (at most E·(R-1): one copy of an expert per rank).
2. Shares. Every copy of expert g serves load_g / copies_g rows; a rank's load is the
   sum of the shares of the copies it holds.
3. Greedy, one redundant slot at a time: the expert with the highest load per copy
   (ties to the lower expert id) among those that some rank with a free slot does not
   hold yet gains a copy, placed on the least-loaded such rank (load counted with the
   updated shares; ties to the lower rank id). A rank with a free slot always lacks
   some expert, so every slot gets filled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .routing import busiest_rank, imbalance


@dataclass(frozen=True)
class EplbPlan:
    """Result of `eplb_whatif`: copies, placement and rank load before and after."""

    copies: torch.Tensor            # [E] INT64, copies per expert (1 = no replica)
    placement: torch.Tensor         # [R, NL + redundant/R] INT64 global expert per slot
    load_before: torch.Tensor       # [R] FP64 per-rank load without replicas
    load_after: torch.Tensor        # [R] FP64 per-rank load with replicas
    replicas: tuple[tuple[int, int], ...]  # (expert, rank) per redundant slot, in order

    @property
    def imbalance_before(self) -> float:
        return imbalance(self.load_before)

    @property
    def imbalance_after(self) -> float:
        return imbalance(self.load_after)

    @property
    def busiest_before(self) -> int:
        return busiest_rank(self.load_before)

    @property
    def busiest_after(self) -> int:
        return busiest_rank(self.load_after)

    def summary(self) -> str:
        """One line for a notebook printout."""
        return (f"imbalance {self.imbalance_before:.3f} -> {self.imbalance_after:.3f}; "
                f"busiest rank {self.busiest_before} "
                f"({float(self.load_before.max()):.1f} rows) -> {self.busiest_after} "
                f"({float(self.load_after.max()):.1f} rows); replicas (expert, rank): "
                f"{list(self.replicas)}")


def eplb_whatif(load: torch.Tensor, ranks: int, redundant: int) -> EplbPlan:
    """Replicate hot experts of per-expert `load` [E] into `redundant` slots on `ranks`
    ranks, placing each replica greedily (rules in the module docstring)."""
    e = load.numel()
    if not isinstance(ranks, int) or ranks <= 0 or e % ranks:
        raise ValueError(f"ranks must be a positive divisor of n_experts ({e}), got {ranks!r}")
    max_red = e * (ranks - 1)
    if (not isinstance(redundant, int) or isinstance(redundant, bool) or redundant < 0
            or redundant % ranks or redundant > max_red):
        raise ValueError(f"redundant must be a multiple of ranks ({ranks}) in "
                         f"[0, {max_red}] (at most one copy per rank per expert), "
                         f"got {redundant!r}")
    if bool((load < 0).any()):
        raise ValueError("load must be non-negative")
    n_local = e // ranks
    lf = load.to(torch.float64)
    home = torch.arange(e) // n_local
    holds = torch.zeros(ranks, e, dtype=torch.bool)
    holds[home, torch.arange(e)] = True
    before = holds.to(torch.float64) @ lf
    copies = torch.ones(e, dtype=torch.int64)
    free = torch.full((ranks,), redundant // ranks, dtype=torch.int64)
    slots: list[list[int]] = [list(range(r * n_local, (r + 1) * n_local))
                              for r in range(ranks)]
    placed: list[tuple[int, int]] = []
    for _ in range(redundant):
        open_ranks = free > 0
        feasible = (~holds & open_ranks[:, None]).any(dim=0)          # [E]
        per_copy = torch.where(feasible, lf / copies, torch.tensor(-1.0, dtype=torch.float64))
        g = int(torch.nonzero(per_copy == per_copy.max())[0, 0])
        copies[g] += 1
        rank_now = holds.to(torch.float64) @ (lf / copies)
        cands = [r for r in range(ranks) if bool(open_ranks[r]) and not bool(holds[r, g])]
        dst = min(cands, key=lambda r: (float(rank_now[r]), r))
        holds[dst, g] = True
        free[dst] -= 1
        slots[dst].append(g)
        placed.append((g, dst))
    after = holds.to(torch.float64) @ (lf / copies)
    return EplbPlan(copies=copies, placement=torch.tensor(slots, dtype=torch.int64),
                    load_before=before, load_after=after, replicas=tuple(placed))
