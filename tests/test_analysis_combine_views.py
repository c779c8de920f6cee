"""Combine-notebook views and agreement summaries: row sources and the push-back walk on
the worked example, the reduce check on a real EP step, per-rank agreement and the error
as a share of the comparator's threshold."""
from __future__ import annotations

import pytest
import torch

from moe_kernels.analysis import agreement as ag
from moe_kernels.analysis import combine_views as cv
from moe_kernels.analysis import ep_plots, review_plots
from moe_kernels.analysis.plots import figure_png
from moe_kernels.config import RunConfig, get_preset
from moe_kernels.ep import LocalTransport, run_ep_layer
from moe_kernels.ep.examples import worked_example
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.layer import reference_layer


@pytest.fixture(scope="module")
def tiny_step():
    run = RunConfig(get_preset("tiny"), batch=2, seq=2, ranks=2)
    weights, inputs = make_weights(run.model, 0), make_inputs(run, 0)
    tr = LocalTransport()
    ep = run_ep_layer(run, inputs, weights, transport=tr)
    return run, inputs, weights, tr, ep


def test_row_sources_of_the_worked_example() -> None:
    lay = worked_example().layout()
    rs = cv.row_sources(lay)
    # rank 0's routes [1,5],[5,2],[1,6],[7,1]: owners 0,1 / 1,0 / 0,1 / 1,0
    assert rs.owner[0].tolist() == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert rs.expert[1].tolist() == [[5, 1], [0, 6], [5, 4], [2, 1]]
    assert rs.rows_from().tolist() == [[4, 4], [4, 4]]
    dropped = cv.row_sources(worked_example().layout(capacity=2, overflow="drop"))
    assert int((dropped.owner < 0).sum()) == 5
    assert int(dropped.rows_from().sum()) == 11


def test_pushback_walk_is_the_spec_combine_on_rank_0() -> None:
    rows = cv.pushback_rows(worked_example().layout(), 0)
    # spec §3.9 "Combine on rank 0"
    got = [(r.origin, r.e, r.slot, r.r_route) for r in rows]
    assert got == [(0, 1, 0, 0), (0, 1, 1, 4), (0, 1, 2, 7), (0, 2, 0, 3),
                   (1, 0, 0, 2), (1, 1, 3, 1), (1, 1, 4, 7), (1, 2, 1, 6)]
    rows1 = cv.pushback_rows(worked_example().layout(), 1)
    assert [(r.origin, r.r_route) for r in rows1] == [(0, 1), (0, 2), (0, 5), (0, 6),
                                                      (1, 5), (1, 0), (1, 4), (1, 3)]
    assert str(rows[4]) == "rank 0 e0 s0 -> rank 1 routed_y_buf row 2"
    with pytest.raises(ValueError, match="owner must be"):
        cv.pushback_rows(worked_example().layout(), 2)


def test_every_route_is_returned_exactly_once(tiny_step) -> None:
    run, _, _, _, ep = tiny_step
    lay = ep.layout
    seen = sorted((r.origin, r.r_route) for o in range(run.ranks)
                  for r in cv.pushback_rows(lay, o))
    k = run.model.num_experts_per_tok
    assert seen == [(o, i) for o in range(run.ranks) for i in range(run.tokens * k)]


def test_reduce_terms_and_check_on_a_real_step(tiny_step) -> None:
    run, _, _, tr, ep = tiny_step
    k = run.model.num_experts_per_tok
    buf = tr.windows.local(0, "routed_y_buf").clone()
    sh = ep.stages["sh"][0]
    terms = cv.reduce_terms(sh, buf, k)
    assert terms.shape == (run.tokens, 1 + k) and terms.dtype == torch.float64
    assert torch.allclose(terms[:, 0], sh.double().pow(2).mean(-1).sqrt())
    chk = cv.reduce_check(sh, buf, k, ep.stages["ffn_out"][0])
    assert chk.spec_order_matches and chk.numel == sh.numel()
    assert 0 <= chk.reversed_differs <= chk.bf16_accum_differs
    assert "bit-identical to ffn_out" in chk.summary()
    wrong = cv.reduce_check(sh, buf.flip(0), k, ep.stages["ffn_out"][0])
    assert not wrong.spec_order_matches
    with pytest.raises(ValueError, match="routed_y_buf must be"):
        cv.reduce_terms(sh, buf[:-1], k)
    with pytest.raises(ValueError, match="routed_y_buf must be"):
        cv.reduce_check(sh, buf[:-1], k, ep.stages["ffn_out"][0])


def test_bf16_accumulation_differs_from_fp32() -> None:
    sh = torch.full((1, 4), 256.0).to(torch.bfloat16)
    buf = torch.tensor([[0.75] * 4, [0.75] * 4]).to(torch.bfloat16)
    # BF16 spacing at 256 is 2. FP32: 256 + 0.75 + 0.75 = 257.5 -> bf16 258;
    # rounding after every add: 256.75 -> 256, 256.75 -> 256
    chk = cv.reduce_check(sh, buf, 2, torch.full((1, 4), 258.0).to(torch.bfloat16))
    assert chk.spec_order_matches and chk.reversed_differs == 0
    assert chk.bf16_accum_differs == 4


def test_agreement_per_rank_and_comparisons(tiny_step) -> None:
    run, inputs, weights, _, ep = tiny_step
    ref = reference_layer(run, inputs, weights)
    same = ag.compare("EP vs reference", ep.x_next, ref.x_next)
    assert same.bit_identical and same.passed and same.max_abs_err == 0.0
    assert [a.rank for a in same.per_rank] == [0, 1]
    assert "bit-identical" in same.summary()
    noisy = ref.x_next.clone()
    noisy[1].view(-1)[:3] += 1.0
    c = ag.compare("noisy", noisy, ref.x_next)
    assert not c.bit_identical and c.per_rank[0].bit_identical
    assert c.per_rank[1].n_diff == 3 and c.per_rank[1].max_abs_err >= 0.5
    assert c.passed and "PASS" in c.summary()          # 3 points << 5 %
    bad = ag.compare("bad", ref.x_next * 2 + 1, ref.x_next)
    assert not bad.passed and "FAIL" in bad.summary()
    table = ag.comparison_table([same, c])
    assert len(table.splitlines()) == 5 and "noisy" in table
    nan = ref.x_next.clone()
    nan.view(-1)[0] = float("nan")
    assert not ag.agreement_per_rank(nan, nan)[0].reldiff.passed   # non-finite fails
    assert ag.agreement_per_rank(nan, nan)[0].bit_identical
    with pytest.raises(ValueError, match="same"):
        ag.agreement_per_rank(ref.x_next, ref.x_next[:1])
    with pytest.raises(ValueError, match="dtype"):
        ag.agreement_per_rank(ref.x_next, ref.x_next.float())
    assert (ag.X_NEXT_DIFF_THD, ag.X_NEXT_PCT_THD) == (3e-3, 0.05)


def test_error_ratio_matches_ratio_reldiff(tiny_step) -> None:
    run, inputs, weights, _, ep = tiny_step
    ref = reference_layer(run, inputs, weights)
    noisy = ref.x_next.clone()
    noisy.view(-1)[:50] += 0.25
    ratio = ag.error_ratio(noisy, ref.x_next, ag.X_NEXT_DIFF_THD)
    c = ag.compare("noisy", noisy, ref.x_next)
    assert int((ratio > 1).sum()) == sum(a.reldiff.n_bad for a in c.per_rank) > 0
    assert c.worst_ratio == pytest.approx(float(ratio.max()))
    assert 0 < c.bad_share_of_allowance < 1 and c.passed
    exact = ag.compare("same", ref.x_next, ref.x_next)
    assert exact.worst_ratio == 0.0 and exact.bad_share_of_allowance == 0.0
    with pytest.raises(ValueError, match="diff_thd"):
        ag.error_ratio(noisy, ref.x_next, 0.0)


def test_combine_plots_render(tiny_step) -> None:
    run, inputs, weights, _, ep = tiny_step
    rs = cv.row_sources(ep.layout)
    c = ag.compare("x", ep.x_next, ep.x_next)
    noisy = ag.compare("noisy", ep.x_next + 0.01, ep.x_next)
    ratio = ag.error_ratio(ep.x_next + 0.01, ep.x_next, 3e-3)
    for fig in (ep_plots.plot_row_sources(rs.owner, rs.expert, "rows"),
                review_plots.plot_agreement_margin([c, noisy], "agreement"),
                review_plots.plot_error_ratio_hist(ratio, "ratio", 0.05)):
        assert figure_png(fig)[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one"):
        review_plots.plot_agreement_margin([], "x")
    bins = review_plots.error_ratio_bins(torch.tensor([0.0, 0.0, 2e-6, 0.16, 3.0]))
    assert bins[0] == ("exact", 2) and bins[1] == ("≤ 1e-3", 1)
    assert bins[-2] == ("≤ 1", 1) and bins[-1] == ("> 1 (bad)", 1)
    with pytest.raises(ValueError, match="owner and expert"):
        ep_plots.plot_row_sources(rs.owner, rs.expert[:1], "x")
