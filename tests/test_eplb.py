"""EPLB what-if: replication order, packing, the never-worse rule (by hand and as
properties), the demo acceptance numbers, and the `eplb` CLI command."""
import json
import math
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_kernels.analysis.eplb import (
    EMPTY_SLOT,
    eplb_whatif,
    pack_copies,
    replication_order,
    skewed_expert_load,
)
from moe_kernels.analysis.gate_inputs import route_tokens
from moe_kernels.analysis.params import validate_params
from moe_kernels.analysis.routing import expert_load
from moe_kernels.analysis.skew import skew_routing
from moe_kernels.cli import main


def check_plan(load: torch.Tensor, ranks: int, redundant: int) -> None:
    """Every invariant a plan must satisfy, whatever the load."""
    plan = eplb_whatif(load, ranks, redundant)
    e = load.numel()
    lf = load.to(torch.float64)
    # the busiest rank's load never increases
    assert float(plan.load_after.max()) <= float(plan.load_before.max())
    # total load conserved, before and after
    assert float(plan.load_before.sum()) == pytest.approx(float(lf.sum()))
    assert float(plan.load_after.sum()) == pytest.approx(float(lf.sum()))
    # equal slots per rank: NL home + redundant / R spare
    assert plan.placement.shape == (ranks, e // ranks + redundant // ranks)
    # every expert keeps at least one copy; the placement agrees with the copy counts
    ids = plan.placement[plan.placement != EMPTY_SLOT]
    counts = torch.bincount(ids, minlength=e)
    assert torch.equal(counts, plan.copies) and int(plan.copies.min()) >= 1
    assert int(plan.copies.sum()) == e + len(plan.replicated)
    assert int((plan.placement == EMPTY_SLOT).sum()) == plan.unused_slots >= 0
    # never two copies of an expert on one rank
    for row in plan.placement.tolist():
        used = [g for g in row if g != EMPTY_SLOT]
        assert len(set(used)) == len(used)
    # each rank's load is the sum of load_g / copies_g over the copies it holds
    share = (lf / plan.copies).tolist()
    for r, row in enumerate(plan.placement.tolist()):
        expect = math.fsum(share[g] for g in row if g != EMPTY_SLOT)
        assert float(plan.load_after[r]) == pytest.approx(expect)


@st.composite
def cases(draw):
    ranks = draw(st.integers(1, 4))
    n_local = draw(st.integers(1, 5))
    e = ranks * n_local
    redundant = ranks * draw(st.integers(0, n_local * (ranks - 1)))
    load = draw(st.lists(st.integers(0, 1000), min_size=e, max_size=e))
    return torch.tensor(load, dtype=torch.int64), ranks, redundant


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_properties(case):
    check_plan(*case)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=8, max_size=8),
       st.sampled_from([(2, 0), (2, 4), (4, 8), (4, 24), (8, 8)]))
def test_properties_fractional_load(load, rr):
    check_plan(torch.tensor(load, dtype=torch.float64), *rr)


def test_replication_order_highest_load_per_copy():
    # 10 -> 5 per copy; then 6 is the highest; then 5; cap: at most `ranks` copies each
    assert replication_order(torch.tensor([10, 6, 1]), 3, 3) == [0, 1, 0]
    assert replication_order(torch.tensor([10, 6, 1]), 2, 3) == [0, 1, 2]


def test_packing_heaviest_first_least_loaded_rank():
    rows = pack_copies(torch.tensor([8, 6, 4, 2]), torch.tensor([1, 1, 1, 1]), 2, 2)
    assert rows == [[0, 3], [1, 2]]                       # 8+2 vs 6+4
    # two copies of expert 0 (5 each) never share a rank
    rows = pack_copies(torch.tensor([10, 0, 0, 0]), torch.tensor([2, 1, 1, 1]), 2, 3)
    assert rows == [[0, 1, 2], [0, 3]]


def test_one_hot_expert_two_ranks():
    plan = eplb_whatif(torch.tensor([10, 0, 0, 0]), ranks=2, redundant=2)
    # one copy of expert 0 on each rank halves the busiest rank; a second replica (of
    # a cold expert) would not lower it further, so its slot stays empty
    assert plan.replicated == (0,) and plan.unused_slots == 1
    assert plan.placement.tolist() == [[0, 1, 2], [0, 3, EMPTY_SLOT]]
    assert plan.copies.tolist() == [2, 1, 1, 1]
    assert plan.load_before.tolist() == [10.0, 0.0]
    assert plan.load_after.tolist() == [5.0, 5.0]
    assert plan.imbalance_before == 2.0 and plan.imbalance_after == 1.0
    assert torch.isnan(plan.per_copy[1, 2]) and plan.per_copy[0].tolist() == [5.0, 0.0, 0.0]


def test_home_placement_kept_when_packing_would_be_worse():
    # home: {3,3,0} and {2,2,2} -> [6, 6]; heaviest-first packing gives 7 with or
    # without replicas, so the plan keeps the home placement and leaves the slots empty
    load = torch.tensor([3, 3, 0, 2, 2, 2])
    for redundant in (0, 2):
        plan = eplb_whatif(load, 2, redundant)
        assert plan.load_after.tolist() == [6.0, 6.0] == plan.load_before.tolist()
        assert plan.replicated == () and plan.unused_slots == redundant
        assert plan.placement[:, :3].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_zero_redundant_repacks_without_replicas():
    load = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    plan = eplb_whatif(load, 4, 0)
    assert plan.load_before.tolist() == [4.0, 5.0, 14.0, 8.0] and plan.busiest_before == 2
    # heaviest first: 9 | 6 | 5 | 4 (experts 5, 7, 4, 2), then expert 0 (3) -> rank 3,
    # 6 (2) -> rank 2, 1 (1) -> rank 1, and 3 (1) -> rank 0, the only one with room
    assert plan.placement.tolist() == [[5, 3], [7, 1], [4, 6], [2, 0]]
    assert plan.load_after.tolist() == [10.0, 7.0, 7.0, 7.0] and plan.replicated == ()


@pytest.mark.parametrize("ranks,red", [(2, 3), (2, -2), (2, 18), (3, 3)])
def test_bad_redundant_or_ranks(ranks, red):
    with pytest.raises(ValueError, match="redundant|ranks"):
        eplb_whatif(torch.ones(16, dtype=torch.int64), ranks, red)


def test_negative_load_rejected():
    with pytest.raises(ValueError, match="load"):
        eplb_whatif(torch.tensor([1, -1]), 2, 0)


@cache
def demo_base(seed: int) -> torch.Tensor:
    """Gate routing [R,T,K] of the demo preset at 2 ranks (notebook 01's defaults)."""
    run = validate_params(preset="demo", ranks=2, batch=64, seq=2, seed=seed,
                          figures_dir=".").run
    return route_tokens(run, seed).indices(run.routing)


def demo_load(seed: int, skew: float) -> torch.Tensor:
    return expert_load(skew_routing(demo_base(seed), 16, skew, seed), 16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_busiest_rank_never_rises(seed):
    for skew in (0.5, 1.0, 2.0):
        load = demo_load(seed, skew)
        for redundant in (2, 4, 8):
            plan = eplb_whatif(load, 2, redundant)
            assert float(plan.load_after.max()) <= float(plan.load_before.max())
            assert plan.imbalance_after <= plan.imbalance_before


def test_demo_skew1_four_slots_is_balanced():
    run = validate_params(preset="demo", ranks=2, batch=64, seq=2, seed=0,
                          figures_dir=".").run
    load = skewed_expert_load(run, 1.0, 0)
    assert torch.equal(load, demo_load(0, 1.0))
    plan = eplb_whatif(load, 2, 4)
    assert plan.imbalance_before > 1.3
    assert plan.imbalance_after <= 1.05


def test_cli_json_keys(tmp_path, capsys):
    out = tmp_path / "eplb.json"
    assert main(["eplb", "--preset", "tiny", "--ranks", "2", "--skew", "1",
                 "--redundant", "4", "--seed", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max/mean" in text and "before" in text and "after" in text
    d = json.loads(out.read_text())
    assert len(d["before"]["rank_load"]) == len(d["after"]["rank_load"]) == 2
    assert max(d["after"]["rank_load"]) <= max(d["before"]["rank_load"])
    assert sum(d["after"]["rank_load"]) == pytest.approx(sum(d["before"]["rank_load"]))
    assert len(d["placement"]) == 2
    placed = sorted(g for row in d["placement"] for g in row)
    assert set(placed) == set(range(16)) and all(len(row) <= 10 for row in d["placement"])


@pytest.mark.parametrize("argv,needle", [
    (["--ranks", "3"], "--ranks 3"),
    (["--redundant", "-2"], "--redundant -2"),
    (["--redundant", "3"], "multiple of ranks (2)"),
    (["--skew", "-1"], "--skew -1.0"),
    (["--preset", "huge"], "--preset 'huge'"),
])
def test_cli_bad_input_one_line(argv, needle, capsys):
    assert main(["eplb", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "allowed" in err and err.count("\n") == 1
