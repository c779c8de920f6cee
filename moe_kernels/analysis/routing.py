"""Routing metrics: per-expert and per-rank load, imbalance and the busiest rank.

Experts are placed contiguously: global expert g lives on rank g // NL (spec §3.3), so
rank r holds experts [r·NL, (r+1)·NL).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_indices(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    if indices.dim() != 3:
        raise ValueError(f"indices must be [R, T, K] global expert ids, got shape "
                         f"{tuple(indices.shape)}")
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_experts):
        raise ValueError(f"indices must lie in [0, {n_experts}), got range "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    return flat


def _check_ranks(n_experts: int, ranks: int) -> int:
    if not isinstance(ranks, int) or ranks <= 0 or n_experts % ranks:
        raise ValueError(f"ranks must be a positive divisor of n_experts ({n_experts}), "
                         f"got {ranks!r}")
    return n_experts // ranks


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Routes per global expert over every rank and token: indices [R,T,K] -> [E] INT64."""
    return torch.bincount(_check_indices(indices, n_experts), minlength=n_experts)


def rank_load(load: torch.Tensor, ranks: int) -> torch.Tensor:
    """Rows each rank's experts receive: per-expert load [E] -> [R] (sum over its NL)."""
    n_local = _check_ranks(load.numel(), ranks)
    return load.reshape(ranks, n_local).sum(dim=1)


def imbalance(load: torch.Tensor) -> float:
    """max / mean of a load vector (1.0 is perfect balance; 1.0 for an all-zero load)."""
    if load.numel() == 0:
        raise ValueError("imbalance needs a non-empty load vector")
    mean = float(load.to(torch.float64).mean())
    return 1.0 if mean == 0.0 else float(load.max()) / mean


def busiest_rank(load: torch.Tensor) -> int:
    """Index of the largest entry (the lowest index on a tie)."""
    if load.numel() == 0:
        raise ValueError("busiest_rank needs a non-empty load vector")
    return int(torch.nonzero(load == load.max())[0, 0])


def count_tensor(indices: torch.Tensor, n_experts: int, ranks: int) -> torch.Tensor:
    """counts[src, dst, e]: routes from rank src's tokens to local expert e of rank dst.

    indices [R,T,K] global ids with R == ranks (the leading axis is the source rank).
    """
    if indices.dim() != 3 or indices.shape[0] != ranks:
        raise ValueError(f"indices must be [ranks={ranks}, T, K], got shape "
                         f"{tuple(indices.shape)}")
    n_local = _check_ranks(n_experts, ranks)
    _check_indices(indices, n_experts)
    out = torch.stack([torch.bincount(indices[s].reshape(-1).to(torch.int64),
                                      minlength=n_experts) for s in range(ranks)])
    return out.reshape(ranks, ranks, n_local)


@dataclass(frozen=True)
class RoutingStats:
    """Load summary of one routing: per expert, per rank, imbalance and busiest rank."""

    expert_load: torch.Tensor   # [E] INT64 routes per global expert
    rank_load: torch.Tensor     # [R] INT64 routes received by each rank's experts
    expert_imbalance: float     # max/mean over experts
    rank_imbalance: float       # max/mean over ranks
    busiest_rank: int
    busiest_load: int

    def summary(self) -> str:
        """One line for a notebook printout."""
        return (f"rank load {self.rank_load.tolist()}, imbalance (max/mean) "
                f"{self.rank_imbalance:.3f} per rank, {self.expert_imbalance:.3f} per "
                f"expert; busiest rank {self.busiest_rank} with {self.busiest_load} rows")


def routing_stats(indices: torch.Tensor, n_experts: int, ranks: int) -> RoutingStats:
    """RoutingStats of indices [R,T,K] over n_experts placed contiguously on `ranks`."""
    load = expert_load(indices, n_experts)
    per_rank = rank_load(load, ranks)
    busy = busiest_rank(per_rank)
    return RoutingStats(expert_load=load, rank_load=per_rank,
                        expert_imbalance=imbalance(load), rank_imbalance=imbalance(per_rank),
                        busiest_rank=busy, busiest_load=int(per_rank[busy]))
