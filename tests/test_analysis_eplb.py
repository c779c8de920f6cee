"""EPLB what-if: replica choice, placement rule, load conservation, parameter checks."""
import pytest
import torch

from moe_kernels.analysis.eplb import eplb_whatif


def test_one_hot_expert_two_ranks():
    plan = eplb_whatif(torch.tensor([10, 0, 0, 0]), ranks=2, redundant=2)
    # expert 0 (rank 0) gets a copy on rank 1: 5 + 5; the second slot (rank 0, the only
    # one left) takes the lowest-id expert rank 0 lacks, expert 2 (no load)
    assert plan.replicas == ((0, 1), (2, 0))
    assert plan.placement.tolist() == [[0, 1, 2], [2, 3, 0]]
    assert plan.copies.tolist() == [2, 1, 2, 1]
    assert plan.load_before.tolist() == [10.0, 0.0]
    assert plan.load_after.tolist() == [5.0, 5.0]
    assert plan.imbalance_before == 2.0 and plan.imbalance_after == 1.0


def test_three_ranks_by_hand():
    # E=6, NL=2: rank 0 {0,1}=12+0, rank 1 {2,3}=6+0, rank 2 {4,5}=0+0 -> [12, 6, 0]
    load = torch.tensor([12, 0, 6, 0, 0, 0])
    plan = eplb_whatif(load, ranks=3, redundant=3)
    # slot 1: expert 0 (12/copy) -> least-loaded rank without it: rank 2 (load 0)
    #         -> shares 6: [6, 6, 6]
    # slot 2: expert 0 (6/copy) ties expert 2 (6/copy) -> lower id, expert 0; the only
    #         rank with room lacking it is rank 1 -> shares 4: [4, 6+4, 4]
    # slot 3: expert 0 has R copies; expert 2 (6/copy) -> rank 0 (room, lacks it)
    #         -> shares 3: [4+3, 3+4, 4] = [7, 7, 4]
    assert plan.replicas == ((0, 2), (0, 1), (2, 0))
    assert plan.copies.tolist() == [3, 1, 2, 1, 1, 1]
    assert plan.load_after.tolist() == [7.0, 7.0, 4.0]
    assert plan.placement.tolist() == [[0, 1, 2], [2, 3, 0], [4, 5, 0]]


@pytest.mark.parametrize("e,ranks,red", [(16, 2, 4), (16, 4, 8), (12, 3, 6), (8, 2, 8)])
def test_invariants(e, ranks, red):
    g = torch.Generator().manual_seed(e * 100 + red)
    load = torch.randint(0, 100, (e,), generator=g)
    plan = eplb_whatif(load, ranks, red)
    assert plan.placement.shape == (ranks, e // ranks + red // ranks)
    assert float(plan.load_after.sum()) == pytest.approx(float(load.sum()))
    assert float(plan.load_before.sum()) == pytest.approx(float(load.sum()))
    assert int(plan.copies.sum()) == e + red and int(plan.copies.max()) <= ranks
    for r in range(ranks):  # never two copies of one expert on a rank
        row = plan.placement[r].tolist()
        assert len(set(row)) == len(row)
    for g_ in range(e):
        assert int((plan.placement == g_).sum()) == int(plan.copies[g_])


def test_zero_redundant_is_identity():
    load = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    plan = eplb_whatif(load, 4, 0)
    assert torch.equal(plan.load_before, plan.load_after)
    assert plan.load_before.tolist() == [4.0, 5.0, 14.0, 8.0]
    assert plan.busiest_before == 2


@pytest.mark.parametrize("ranks,red", [(2, 3), (2, -2), (2, 18), (3, 3)])
def test_bad_redundant_or_ranks(ranks, red):
    with pytest.raises(ValueError, match="redundant|ranks"):
        eplb_whatif(torch.ones(16, dtype=torch.int64), ranks, red)
