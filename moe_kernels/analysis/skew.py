"""Synthetic routing skew: concentrate traffic on a few hot experts, continuously.

Model (Plackett-Luce over a Zipf popularity, conditioned on a base routing).
Each token t gets a preference key per expert, u[t,e] = g[t,e] + skew · log w_e, and takes
the K experts with the largest keys (K distinct experts, order by key).

* w_e = 1 / (1 + rank_of_e) is a Zipf popularity over a hot-expert order (a seeded
  permutation of the experts unless one is given), so `skew` is the Zipf exponent.
* g[t,·] are i.i.d. Gumbel(0,1) keys, sorted, with the K largest handed to the token's
  base experts in their base order and the rest to the other experts in random order.
  This conditions the Gumbel keys on the base routing: at skew = 0 the top-K is exactly
  the base routing; when the base routing is uniform at random, the keys are plain i.i.d.
  Gumbels and the result is exactly sampling K experts without replacement with
  probabilities proportional to w_e ** skew (the Gumbel-top-k trick).
* As skew grows, every token drifts toward the K hottest experts.

Everything is drawn from a torch.Generator seeded with `seed`: same inputs, same output.
"""
from __future__ import annotations

import torch

from .routing import RoutingStats, routing_stats

#: Seed offset so skew draws never share a stream with the fixtures' generators.
_SKEW_STREAM = 0x5EED_0001


def _gen(seed: int, stream: int) -> torch.Generator:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + stream) % (2 ** 63))
    return g


def hot_expert_order(n_experts: int, seed: int) -> torch.Tensor:
    """A seeded permutation of the experts, hottest first: [E] INT64."""
    return torch.randperm(n_experts, generator=_gen(seed, _SKEW_STREAM + 1))


def zipf_popularity(n_experts: int, skew: float, order: torch.Tensor | None = None,
                    seed: int = 0) -> torch.Tensor:
    """Normalised popularity p_e ∝ (1 + rank_of_e) ** -skew, [E] FP64 summing to 1.
    `order` lists experts hottest first (default: `hot_expert_order(n_experts, seed)`)."""
    order = hot_expert_order(n_experts, seed) if order is None else order
    rank_of = torch.empty(n_experts, dtype=torch.float64)
    rank_of[order.to(torch.int64)] = torch.arange(n_experts, dtype=torch.float64)
    w = (1.0 + rank_of) ** (-float(skew))
    return w / w.sum()


def uniform_routing(ranks: int, tokens: int, k: int, n_experts: int, seed: int
                    ) -> torch.Tensor:
    """indices [R,T,K] INT32: every token picks K distinct experts uniformly at random."""
    if not 0 < k <= n_experts:
        raise ValueError(f"k must be in [1, n_experts={n_experts}], got {k}")
    keys = torch.rand(ranks * tokens, n_experts, generator=_gen(seed, _SKEW_STREAM + 2))
    return torch.argsort(keys, dim=1)[:, :k].to(torch.int32).reshape(ranks, tokens, k)


def skew_routing(indices: torch.Tensor, n_experts: int, skew: float, seed: int = 0,
                 order: torch.Tensor | None = None) -> torch.Tensor:
    """Skewed routing [R,T,K] INT32 from base indices [R,T,K] (K distinct global ids per
    token); skew >= 0, skew = 0 returns the base routing unchanged (see module doc)."""
    if not isinstance(skew, (int, float)) or isinstance(skew, bool) or not skew >= 0:
        raise ValueError(f"skew must be a number >= 0, got {skew!r}")
    if indices.dim() != 3:
        raise ValueError(f"indices must be [R,T,K], got shape {tuple(indices.shape)}")
    r, t, k = indices.shape
    base = indices.reshape(-1, k).to(torch.int64)
    if base.numel() and (int(base.min()) < 0 or int(base.max()) >= n_experts):
        raise ValueError(f"indices must lie in [0, {n_experts}), got range "
                         f"[{int(base.min())}, {int(base.max())}]")
    if k > 1 and bool((base.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("indices must hold K distinct experts per token")
    if skew == 0:
        return indices.to(torch.int32).clone()
    n = base.shape[0]
    g = _gen(seed, _SKEW_STREAM + 3)
    u = torch.rand(n, n_experts, generator=g, dtype=torch.float64).clamp_min(1e-300)
    gumbel = torch.sort(-torch.log(-torch.log(u)), dim=1, descending=True).values
    # position of each expert in the token's preference order: base experts first (in
    # base order), then the others in a random order
    chosen = torch.zeros(n, n_experts, dtype=torch.bool)
    chosen.scatter_(1, base, True)
    tie = torch.rand(n, n_experts, generator=g, dtype=torch.float64)
    rest_order = torch.argsort(torch.where(chosen, 2.0, tie), dim=1)[:, :n_experts - k]
    pref = torch.cat([base, rest_order], dim=1)          # [N, E] experts by preference
    keys = torch.empty(n, n_experts, dtype=torch.float64)
    keys.scatter_(1, pref, gumbel)
    log_w = torch.log(zipf_popularity(n_experts, 1.0, order=order, seed=seed))
    u_keys = keys + float(skew) * log_w
    out = torch.argsort(-u_keys, dim=1, stable=True)[:, :k]
    return out.to(torch.int32).reshape(r, t, k)


#: Skew values the routing notebook sweeps for its imbalance-vs-skew curve.
SKEW_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def skew_sweep(indices: torch.Tensor, n_experts: int, ranks: int,
               skews: tuple[float, ...] = SKEW_GRID, seed: int = 0) -> list[RoutingStats]:
    """RoutingStats of `skew_routing(indices, n_experts, s, seed)` for every s in skews
    (the same seed, so the curves are one family of routings)."""
    return [routing_stats(skew_routing(indices, n_experts, s, seed), n_experts, ranks)
            for s in skews]
