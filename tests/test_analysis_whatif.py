"""What-ifs from shapes and counts (drop rate, headroom, footprint, payload), their
figures, and the "What we saw" text written from a run's numbers."""
from __future__ import annotations

import pytest
import torch

from moe_kernels.analysis import narrative, review_plots, whatif
from moe_kernels.analysis import routing as rt
from moe_kernels.analysis.eplb import eplb_whatif
from moe_kernels.analysis.plots import figure_png
from moe_kernels.analysis.skew import skew_routing, uniform_routing
from moe_kernels.config import get_preset
from moe_kernels.ep.layout import compute_layout


@pytest.fixture(scope="module")
def base() -> torch.Tensor:
    return uniform_routing(2, 64, 2, 16, seed=0).to(torch.int64)


def test_drops_match_the_layout_in_drop_mode(base) -> None:
    skewed = skew_routing(base, 16, 1.5, 0).to(torch.int64)
    load = rt.expert_load(skewed, 16)
    for cap in (8, 16, 24, 40):
        lay = compute_layout(skewed, 8, cap, overflow="drop")
        assert whatif.dropped_routes(load, cap) == int(lay.dropped.sum())


def test_drop_grid_monotone_and_marked(base) -> None:
    g = whatif.drop_rate_grid(base, 16, 2, (0.0, 1.0, 3.0), (1.0, 2.0, 8.0), seed=0)
    assert g.capacities == (16, 32, 128)         # T·K/NL = 16 rows per expert; R·T = 128
    rate = g.rate_pct
    assert bool((rate[:, :-1] >= rate[:, 1:]).all())            # more capacity, fewer drops
    assert bool((rate[1:] >= rate[:-1]).all())                  # more skew, more drops
    assert float(rate[0, -1]) == 0.0 and g.min_safe_factor(0) is not None
    assert g.peak_load[0] < g.peak_load[-1] <= 128
    fig = review_plots.plot_drop_heatmap(g, "drops", marked=(1.0, 2.0))
    assert figure_png(fig)[:4] == b"\x89PNG"


def test_near_overflow_and_sentence() -> None:
    load = torch.tensor([10, 127, 128, 131, 50])
    near = whatif.near_overflow(load, 128)
    assert [(n.expert, n.headroom) for n in near] == [(3, -3), (2, 0), (1, 1)]
    assert near[2].label() == "expert 1: 127/128 rows, 1 slot left"
    assert near[0].label() == "expert 3: 131/128 rows, 3 over"
    text = narrative.near_overflow_sentence(whatif.near_overflow(load[:2], 128), "skew 1")
    assert text == "skew 1: expert 1 gets 127 rows for 128 slots, 1 short of overflow."
    assert "no expert" in narrative.near_overflow_sentence([], "x")


def test_headroom_curve(base) -> None:
    c = whatif.headroom_curve("hash route", base, 16, 24, (0.0, 1.0, 3.0), seed=0)
    assert c.utilisation_pct[0] == pytest.approx(100 * c.peak_load[0] / 24)
    assert c.first_overflow() in (1.0, 3.0)
    assert figure_png(review_plots.plot_headroom([c], "headroom"))[:4] == b"\x89PNG"


def test_footprint_from_shapes() -> None:
    demo = get_preset("demo")
    f = whatif.footprint(demo, 2, 128, 4.0)
    assert f.window_bytes == 8 * 128 * (4096 + 96)          # NL·C rows of D + 3 tiles
    assert f.count_bytes == 2 * 2 * 8 * 4 and f.combine_bytes == 256 * 4096 * 2
    # NL·C = T·K·factor: the window does not depend on R until C hits R·T
    assert whatif.footprint(demo, 8, 128, 4.0).window_bytes == f.window_bytes
    assert whatif.footprint(demo, 2, 128, 16.0).window_bytes == 8 * 256 * (4096 + 96)
    with pytest.raises(ValueError, match="divide"):
        whatif.footprint(demo, 3, 128, 4.0)
    foot = {("demo", r): [whatif.footprint(demo, r, 128, x) for x in (1.0, 4.0)]
            for r in (2, 4)}
    assert figure_png(review_plots.plot_footprint(foot, (1.0, 4.0), "fp"))[:4] == b"\x89PNG"


def test_payload_int8_against_bf16() -> None:
    pts = [whatif.payload_point(get_preset("flash"), r, 128) for r in (2, 8)]
    for p in pts:
        assert p.bf16_bytes > p.int8_bytes > 0
        assert 45 < p.bytes_saved_pct < 50                  # D + 32 vs 2·D per route
        assert p.bf16_us > p.int8_us > p.overhead_us
        assert 0 < p.time_saved_pct < p.bytes_saved_pct     # fixed cost per call
    assert figure_png(review_plots.plot_payload(pts, "payload"))[:4] == b"\x89PNG"


def test_routing_findings_follow_the_numbers(base) -> None:
    stats = {"hash": rt.routing_stats(base, 16, 2), "sort": rt.routing_stats(base, 16, 2)}
    skewed = rt.routing_stats(skew_routing(base, 16, 1.0, 0), 16, 2)
    grid = whatif.drop_rate_grid(base, 16, 2, (0.0, 1.0), (1.0, 4.0), seed=0)
    plan = eplb_whatif(skewed.expert_load, 2, 2)
    near = whatif.near_overflow(skewed.expert_load, 32)
    text = narrative.routing_findings("tiny", stats, "hash", 1.0, skewed, 32, near, grid,
                                      4.0, plan)
    assert text.startswith("## What we saw\n")
    assert f"{skewed.rank_imbalance:.2f}x the mean" in text
    assert f"{float(grid.rate_pct[1, 1]):.1f} %" in text or "< 0.1 %" in text
    assert f"{plan.imbalance_after:.2f}x" in text and "Next:" in text
