"""Routing metrics: per-expert / per-rank load, imbalance, busiest rank, count tensor."""
import pytest
import torch

from moe_kernels.analysis import routing as rt


def idx(rows):
    return torch.tensor(rows, dtype=torch.int32)


def test_expert_and_rank_load_by_hand():
    # 2 ranks x 2 tokens x top-2 over 4 experts (NL = 2: rank 0 holds 0,1; rank 1 holds 2,3)
    indices = idx([[[0, 1], [0, 2]], [[3, 0], [1, 0]]])
    load = rt.expert_load(indices, 4)
    assert load.tolist() == [4, 2, 1, 1]
    assert rt.rank_load(load, 2).tolist() == [6, 2]
    assert rt.rank_load(load, 4).tolist() == [4, 2, 1, 1]
    assert rt.rank_load(load, 1).tolist() == [8]
    assert rt.imbalance(load) == pytest.approx(4 / 2)
    assert rt.imbalance(rt.rank_load(load, 2)) == pytest.approx(6 / 4)
    assert rt.busiest_rank(rt.rank_load(load, 2)) == 0


@pytest.mark.parametrize("e,ranks", [(8, 2), (16, 4), (6, 3)])
def test_uniform_round_robin_is_balanced(e, ranks):
    t = e * 3
    flat = torch.arange(ranks * t * 2) % e
    indices = flat.reshape(ranks, t, 2)
    st = rt.routing_stats(indices, e, ranks)
    assert st.expert_imbalance == 1.0 and st.rank_imbalance == 1.0
    assert st.busiest_rank == 0  # ties go to the lowest rank
    assert int(st.rank_load.sum()) == ranks * t * 2


def test_imbalance_edge_cases():
    assert rt.imbalance(torch.zeros(4)) == 1.0
    assert rt.imbalance(torch.tensor([0, 0, 0, 8])) == pytest.approx(4.0)
    assert rt.busiest_rank(torch.tensor([1, 5, 5, 2])) == 1
    with pytest.raises(ValueError):
        rt.imbalance(torch.tensor([]))


def test_count_tensor_by_hand():
    # R=2, NL=2: counts[src, dst, e]
    indices = idx([[[0, 3], [2, 3]], [[1, 0], [1, 2]]])
    c = rt.count_tensor(indices, 4, 2)
    assert c.shape == (2, 2, 2)
    assert c[0].tolist() == [[1, 0], [1, 2]]
    assert c[1].tolist() == [[1, 2], [1, 0]]
    assert int(c.sum()) == 8


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="ranks"):
        rt.rank_load(torch.ones(6), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        rt.expert_load(idx([[[0, 4]]]), 4)
    with pytest.raises(ValueError, match=r"\[R, T, K\]"):
        rt.expert_load(idx([[0, 1]]), 4)
