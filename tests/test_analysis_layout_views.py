"""Dispatch-notebook views: the spec's §3.9 worked example through the view functions,
receive-window images, bytes per channel, headroom and overflow outcomes."""
from __future__ import annotations

import pytest
import torch

from moe_kernels.analysis import ep_plots
from moe_kernels.analysis import layout_views as lv
from moe_kernels.analysis.params import (
    ParameterError,
    validate_factor,
    validate_flag,
    validate_params,
    validate_side_run,
)
from moe_kernels.analysis.plots import figure_png
from moe_kernels.ep.examples import check_against_spec, worked_example


@pytest.fixture()
def example_layout():
    return worked_example().layout()


def test_worked_example_data_is_fresh_and_matches_its_layout(example_layout) -> None:
    ex = worked_example()
    a, b = ex.indices(), ex.indices()
    a[0, 0, 0] = 7
    assert b[0, 0, 0] == 1                       # no shared mutable tensor
    assert ex.n_experts == 8 and ex.indices().shape == (2, 4, 2)
    assert check_against_spec(example_layout) == {
        "slots": True, "pub_counts": True, "recv_count": True, "receive_buffers": True}
    dropped = ex.layout(capacity=2, overflow="drop")
    assert not check_against_spec(dropped)["slots"]
    with pytest.raises(ValueError, match="worked example needs"):
        check_against_spec(lv.LayoutInputs(torch.zeros(1, 4, 2, dtype=torch.int64), 8, 8,
                                           16, "x").layout())


def test_slot_table_reproduces_the_spec(example_layout) -> None:
    rows = lv.slot_table(example_layout)
    assert len(rows) == 16
    # spec §3.9 slot table, rank 1: (t,k) -> (g, dst, e, slot)
    r1 = [(r.expert, r.dst, r.e, r.slot) for r in rows if r.src == 1]
    assert r1 == [(5, 1, 1, 2), (1, 0, 1, 3), (0, 0, 0, 0), (6, 1, 2, 1),
                  (5, 1, 1, 3), (4, 1, 0, 0), (2, 0, 2, 1), (1, 0, 1, 4)]
    assert [r.r_route for r in rows[:8]] == list(range(8))
    assert str(rows[8]).endswith("slot 2 (= 2 + 0)")
    assert lv.slot_table(example_layout, src=0) == rows[:8]
    with pytest.raises(ValueError, match="rank must be"):
        lv.slot_table(example_layout, src=2)


def test_receive_buffers_and_text(example_layout) -> None:
    bufs = lv.receive_buffers(example_layout)
    assert bufs[0][1] == [(0, 0), (0, 4), (0, 7), (1, 1), (1, 7)]
    assert bufs[0][3] == [] and bufs[1][3] == [(0, 6)]
    text = lv.format_receive_buffers(example_layout)
    assert "  e1: s0 = (0, 0), s1 = (0, 4), s2 = (0, 7), s3 = (1, 1), s4 = (1, 7)" in text
    assert "  e3: empty" in text
    assert lv.pub_counts(example_layout).tolist() == [[0, 3, 1, 0], [0, 2, 1, 1],
                                                      [1, 2, 1, 0], [1, 2, 1, 0]]
    assert lv.by_global_expert(example_layout.counts).shape == (2, 8)
    with pytest.raises(ValueError, match=r"\[R, R, NL\]"):
        lv.by_global_expert(torch.zeros(2, 3, 4))


def test_window_image(example_layout) -> None:
    src, route = lv.window_image(example_layout, 1)
    assert src.shape == route.shape == (4, 5)
    assert src[1].tolist() == [0, 0, 1, 1, -1]
    assert route[1].tolist() == [1, 2, 0, 4, -1]
    assert (src[3] >= 0).sum() == 1 and route[3, 0] == 6
    with pytest.raises(ValueError, match="rank must be"):
        lv.window_image(example_layout, -1)


def test_bytes_per_route_and_channel_totals(example_layout) -> None:
    assert lv.bytes_per_route(4096) == {"x_i8": 4096, "scale": 32, "weight": 32,
                                        "r_route": 32, "combine": 8192}
    cb = lv.channel_bytes(example_layout, 256)
    assert cb.total("x_i8") == 16 * 256 and cb.link_total("x_i8") == 8 * 256
    assert cb.total("combine") == 16 * 512
    assert cb.dispatch_total() == 16 * (256 + 96)
    assert [r["channel"] for r in cb.rows()] == list(lv.ALL_CHANNELS)
    with pytest.raises(ValueError, match="d_model"):
        lv.bytes_per_route(0)


def test_headroom_and_capacity_for_factor(example_layout) -> None:
    hr = lv.headroom(example_layout)
    assert hr.demand.tolist() == [[1, 5, 2, 0], [1, 4, 2, 1]]
    assert hr.tightest == (0, 1) and hr.peak_utilisation == 1.0
    assert hr.headroom[0, 1] == 0 and "rank 0 local expert 1 with 5 rows" in hr.summary()
    assert lv.capacity_for_factor(4, 2, 4, 1.0) == 2
    assert lv.capacity_for_factor(4, 2, 4, 0.01) == 1
    assert lv.capacity_for_factor(128, 2, 8, 4.0) == 128
    with pytest.raises(ValueError, match="factor"):
        lv.capacity_for_factor(4, 2, 4, 0.0)
    with pytest.raises(ValueError, match="tokens"):
        lv.capacity_for_factor(0, 2, 4, 1.0)


def test_overflow_outcome_error_and_drops() -> None:
    ex = worked_example()
    ov = lv.overflow_outcome(ex.indices(), ex.n_local, 2)
    assert ov.overflowed and "rank 0 local expert 1" in ov.error and "count=5" in ov.error
    assert ov.dropped.tolist() == [[0, 3, 0, 0], [0, 2, 0, 0]]
    assert ov.dropped_total == 5 and ov.routes_total == 16
    assert int(ov.placed.sum()) == 11 and "drops 5 of 16 routes" in ov.summary()
    fine = lv.overflow_outcome(ex.indices(), ex.n_local, 5)
    assert not fine.overflowed and fine.dropped_total == 0
    assert "nothing dropped" in fine.summary()


def test_layout_inputs_gate_and_worked_example() -> None:
    p = validate_params(preset="tiny", ranks=2, batch=2, seq=2, seed=0, figures_dir="x")
    li = lv.layout_inputs(p.run, 0)
    assert (li.ranks, li.tokens, li.topk, li.n_local) == (2, 4, 2, 8)
    assert li.capacity == p.run.recv_max and li.d_model == 256
    assert "hash route" in li.source
    lay = li.layout()
    assert int(lay.counts.sum()) == 2 * 4 * 2
    skewed = lv.layout_inputs(p.run, 0, skew=2.0)
    assert "skew 2" in skewed.source and skewed.indices.shape == li.indices.shape
    ex = lv.layout_inputs(p.run, 0, use_worked_example=True)
    assert torch.equal(ex.indices, worked_example().indices()) and ex.capacity == 5
    assert all(check_against_spec(ex.layout()).values())


def test_extra_params() -> None:
    assert validate_flag("worked_example", True) is True
    with pytest.raises(ParameterError, match="worked_example=1 .*True or False"):
        validate_flag("worked_example", 1)
    assert validate_factor("f", 2) == 2.0
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ParameterError, match="a finite number > 0"):
            validate_factor("f", bad)
    with pytest.raises(ParameterError, match="pypto_batch=0"):
        validate_side_run("pypto_", preset="tiny", ranks=2, batch=0, seq=2, seed=0,
                          figures_dir="x")


def test_dispatch_plots_render_deterministically(example_layout) -> None:
    src, route = example_layout.receive_map()
    figs = [ep_plots.plot_expert_matrix(example_layout.counts, "counts", "count"),
            ep_plots.plot_receive_windows(src, route, "windows"),
            ep_plots.plot_channel_bytes(example_layout.bytes_per_peer(256), "bytes"),
            ep_plots.plot_overflow(example_layout.recv_count, example_layout.dropped, 5,
                                   "overflow")]
    for f in figs:
        assert figure_png(f)[:4] == b"\x89PNG"
    assert figure_png(ep_plots.plot_receive_windows(src, route, "windows")) == \
        figure_png(ep_plots.plot_receive_windows(src, route, "windows"))
    # labels only when the windows are small
    texts = [t.get_text() for ax in figs[1].axes for t in ax.texts]
    assert "7" in texts and len(texts) == 16
    with pytest.raises(ValueError, match="src_map and route_map"):
        ep_plots.plot_receive_windows(src, route[:1], "bad")
    with pytest.raises(ValueError, match="placed and dropped"):
        ep_plots.plot_overflow(example_layout.recv_count, example_layout.dropped[:1], 5, "x")
