"""The program's two-phase planner (ep.plan) equals the readable `layout.plan_rank`, field
by field, for random routings, with and without capacity drops, for R in {1, 2, 4, 8}."""
from __future__ import annotations

import pytest
import torch

from moe_kernels.ep.layout import plan_rank, send_histogram
from moe_kernels.ep.plan import count_routes, finish_plan, presort
from moe_kernels.types import CapacityError


def _random_indices(g: torch.Generator, ranks: int, tokens: int, k: int,
                    experts: int) -> torch.Tensor:
    """[R,T,K] distinct experts per token, skewed towards low ids (to force overflow)."""
    w = torch.linspace(2.0, 0.5, experts)
    return torch.stack([torch.multinomial(w.expand(tokens, -1), k, generator=g)
                        for _ in range(ranks)]).to(torch.int32)


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("capacity", [3, 1000])
def test_presort_finish_equals_plan_rank(ranks: int, seed: int, capacity: int) -> None:
    g = torch.Generator().manual_seed(seed * 31 + ranks)
    n_local, tokens, k = 4, 6, 3
    ind = _random_indices(g, ranks, tokens, k, ranks * n_local)
    table = torch.stack([send_histogram(ind[r], n_local, ranks) for r in range(ranks)])
    for r in range(ranks):
        want = plan_rank(r, ind[r], table, capacity, "drop")
        got = finish_plan(presort(r, count_routes(ind[r], n_local, ranks)), table, capacity,
                          "drop")
        for f in want.__dataclass_fields__:
            a, b = getattr(got, f), getattr(want, f)
            assert a == b if isinstance(a, int) else (a.dtype == b.dtype and torch.equal(a, b)), f


def test_finish_plan_raises_like_plan_rank() -> None:
    ind = torch.zeros(2, 4, 1, dtype=torch.int32)  # every route to expert 0
    table = torch.stack([send_histogram(ind[r], 2, 2) for r in range(2)])
    with pytest.raises(CapacityError) as want:
        plan_rank(0, ind[0], table, 3)
    with pytest.raises(CapacityError) as got:
        finish_plan(presort(0, count_routes(ind[0], 2, 2)), table, 3)
    assert str(got.value) == str(want.value)


def test_count_routes_rejects_out_of_range_experts() -> None:
    with pytest.raises(ValueError, match=r"global expert ids in \[0, 4\)"):
        count_routes(torch.tensor([[0, 4]]), 2, 2)
