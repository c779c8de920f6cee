"""moe_kernels.analysis.step_sweeps and latency_plots (with a fake step model: no pypto),
notebook 04's parameter checks, the published figures, and pto.swim's trace parsing."""
from __future__ import annotations

import json

import pytest

from moe_kernels.analysis import latency_plots as lp
from moe_kernels.analysis import step_sweeps as ss
from moe_kernels.analysis.comm import published_comparison
from moe_kernels.analysis.params import ParameterError, validate_latency_options
from moe_kernels.analysis.plots import figure_png
from moe_kernels.analysis.published import (
    KINDS,
    PublishedFigure,
    format_published,
    published_figures,
)
from moe_kernels.config import RunConfig, get_preset
from moe_kernels.pto import swim
from moe_kernels.stages import EP_STEP_STAGES
from moe_kernels.step.model import RankStep, StepResult, _schedule

SWIM = [
    {"blockIdx": 0, "coreType": "AIC", "tasks": [
        {"execStart": 1800, "execEnd": 5400, "taskId": 3}]},
    {"blockIdx": 1, "coreType": "AIC", "tasks": []},
    {"blockIdx": 24, "coreType": "AIV", "tasks": [
        {"execStart": 3600, "execEnd": 4500, "taskId": 1},
        {"execStart": 900, "execEnd": 1800, "taskId": 0}]},
    {"blockIdx": 72, "coreType": "HUB", "tasks": [
        {"execStart": 0, "execEnd": 900, "taskId": 9}]},
]


def _write_swim(tmp_path, cores=SWIM):
    path = tmp_path / "CostModelSimulationOutput" / "_simulate.swim.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cores))
    return path


def test_parse_swim_tasks_on_a_small_file(tmp_path):
    table = swim.parse_swim_tasks(_write_swim(tmp_path), kernel="k", clock_mhz=1800.0)
    assert table.lanes == ("AIC 0", "AIV 24")         # HUB and empty lanes left out
    assert [t.task_id for t in table.tasks] == [3, 0, 1]
    assert table.tasks[0].start_us == pytest.approx(0.5)   # shifted: first AICore at 900
    assert table.tasks[0].end_us == pytest.approx(2.5)
    assert table.tasks[1].start_us == 0.0
    assert table.span_us == pytest.approx((5400 - 900) / 1800)
    assert table.busy_us == pytest.approx((3600 + 900 + 900) / 1800)
    assert table.utilization == pytest.approx(table.busy_us / (2 * table.span_us))
    same = swim.parse_swim_tasks(SWIM, kernel="k")            # already-loaded list
    assert same == table


def test_parse_swim_tasks_errors(tmp_path):
    with pytest.raises(ValueError, match="no tasks on core types"):
        swim.parse_swim_tasks([{"blockIdx": 0, "coreType": "HUB", "tasks": []}])
    with pytest.raises(ValueError, match="clock_mhz"):
        swim.parse_swim_tasks(SWIM, clock_mhz=0)
    with pytest.raises(ValueError, match="list of cores"):
        swim.parse_swim_tasks({"not": "a list"})



def fake_step(run, skew=0.0, seed=0, eplb_slots=None, overlap=False, **_):
    """A StepResult without routing or SIM: stage us 1 each, expert_routed = rows
    received (rank r gets T·K·(1 + skew·r/R) rows, EPLB halves the skew), comm from
    ranks and tokens; scheduled by the step model's own barrier schedule."""
    r_, t = run.ranks, run.tokens
    s = skew / 2 if eplb_slots else skew
    ranks = []
    for r in range(r_):
        rows = int(t * run.model.num_experts_per_tok * (1 + s * r / r_))
        stages = {n: (float(rows) if n == "expert_routed" else 1.0) for n in EP_STEP_STAGES}
        q, rem = divmod(rows, run.n_local)
        split = [q + (i < rem) for i in range(run.n_local)]
        ranks.append(RankStep(rank=r, rows_received=rows, expert_rows=split, dropped=0,
                              stages_us=stages, comm_us={"count": 1.0, "dispatch": 2.0 * r_,
                                                         "combine": float(t)}))
    _schedule(ranks, overlap)
    cfg = dict(run.to_dict(), skew=skew, seed=seed, capacity=r_ * t, overlap=overlap,
               eplb_slots=eplb_slots, routes_dropped=0)
    return StepResult(config=cfg, ranks=ranks)


@pytest.fixture(scope="module")
def tiny():
    return RunConfig(model=get_preset("tiny"), batch=2, seq=2, ranks=4)


def test_step_point_splits_the_slowest_rank(tiny):
    res = fake_step(tiny, skew=1.0)
    p = ss.step_point(res, 1.0)
    slow = res.ranks[p.rank]
    assert p.step_us == res.step_us == slow.total_us
    assert p.compute_us + p.comm_us + p.wait_us == pytest.approx(p.step_us)  # serial
    assert p.routed_max_us == 14.0 and p.routed_min_us == 8.0
    assert p.rows_max == 14 and p.rows_mean == pytest.approx(11.0)
    assert p.rows_imbalance == pytest.approx(14 / 11)
    assert 0 < p.comm_share < 1 and p.dropped == 0
    assert ss.step_shape(res) == "tiny · R=4 · T=4/rank · C=16"
    assert ss.step_shape(res, skew=1) == "tiny · R=4 · T=4/rank · C=16 · skew=1"


def test_stage_bounds_use_the_busiest_rank(tiny):
    res = fake_step(tiny, skew=1.0)
    bounds = ss.stage_bounds(res, tiny)
    assert [b.stage for b in bounds] == list(EP_STEP_STAGES)
    routed = next(b for b in bounds if b.stage == "expert_routed")
    assert routed.sim_us == max(r.stages_us["expert_routed"] for r in res.ranks)
    assert all(b.roofline_us > 0 and b.ratio == b.sim_us / b.roofline_us for b in bounds)


def test_idle_gaps_are_the_barrier_waits(tiny):
    assert ss.idle_gaps([("a", 0.0, 1.0), ("b", 2.0, 3.0), ("c", 2.5, 4.0)]) == [(1.0, 2.0)]
    assert ss.idle_gaps([("a", 0.5, 1.0)]) == [(0.0, 0.5)]
    for ov in (False, True):
        res = fake_step(tiny, skew=1.0, overlap=ov)
        for rk in res.ranks:
            assert sum(b - a for a, b in ss.idle_gaps(rk.timeline)) == pytest.approx(
                rk.wait_us)


def test_sweeps(tiny):
    skew = ss.skew_sweep(tiny, [0.0, 2.0], step=fake_step)
    eplb = ss.skew_sweep(tiny, [0.0, 2.0], eplb_slots=4, step=fake_step)
    assert [p.x for p in skew] == [0.0, 2.0]
    assert skew[1].step_us > skew[0].step_us == eplb[0].step_us
    assert eplb[1].step_us < skew[1].step_us
    by_r = ss.ranks_sweep(tiny, [2, 8], step=fake_step)
    assert [p.x for p in by_r] == [2.0, 8.0] and by_r[1].comm_us > by_r[0].comm_us
    by_t = ss.tokens_sweep(tiny, [4, 16], step=fake_step)
    assert [p.rows_mean for p in by_t] == [8.0, 32.0]
    with pytest.raises(ValueError, match="multiples of seq=2"):
        ss.tokens_sweep(tiny, [3], step=fake_step)


def test_step_vs_published_and_findings(tiny):
    steps = (fake_step(tiny), fake_step(tiny, overlap=True))
    cmp = ss.step_vs_published(*steps)
    assert cmp.published.value_us == 281.0 and cmp.published.quantity == ss.PUBLISHED_STEP
    assert cmp.ratio == pytest.approx(steps[0].step_us / 281.0)
    assert cmp.overlapped_us == steps[1].step_us <= steps[0].step_us
    pts = ss.skew_sweep(tiny, [0.0, 2.0], step=fake_step)
    md = ss.step_findings(steps, steps, pts, pts, 4, pts, pts, published_comparison(), cmp)
    assert md.startswith("## What we saw\n")
    assert "Skew (tiny, R=4)" in md and "EPLB with 4 redundant slots" in md
    assert "fitted on EP8" in md and "281 us" in md
    assert f"{steps[0].step_us:.1f} us serial" in md


def test_latency_figures_are_deterministic(tiny):
    steps = (fake_step(tiny, skew=1.0), fake_step(tiny, skew=1.0, overlap=True))
    pts = ss.skew_sweep(tiny, [0.0, 1.0, 2.0], step=fake_step)
    figs = [lp.plot_step_gantt({"serial": steps[0], "overlapped": steps[1]}, "gantt"),
            lp.plot_skew_sweep({"home": pts, "eplb": pts}, "skew"),
            lp.plot_step_sweep(pts, "sweep", xlabel="x"),
            lp.plot_stage_bounds(ss.stage_bounds(steps[0], tiny), "bounds"),
            lp.plot_comm_vs_published(published_comparison(), "comm"),
            lp.plot_step_vs_published(ss.step_vs_published(*steps), "pub")]
    for fig in figs:
        assert figure_png(fig) == figure_png(fig)
    labels = [t.get_text() for t in figs[0].legends[0].get_texts()] if figs[0].legends else [
        t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert "dispatch (model)" in labels and "waiting at a barrier" in labels


def _opts(**kw):
    base = dict(scale_preset="tiny", scale_ranks=4, scale_batch=2, scale_seq=2,
                routing="hash", seed=0, skew_sweep=[2, 0],
                eplb_per_rank=1, ranks_sweep=[8, 2], tokens_sweep=[8, 4])
    return validate_latency_options(**{**base, **kw})


def test_validate_latency_options():
    o = _opts()
    assert o.skew_sweep == (0.0, 2.0) and o.ranks_sweep == (2, 8)
    assert o.tokens_sweep == (4, 8) and o.eplb_slots == 4
    assert o.scale.run.ranks == 4 and o.scale.run.tokens == 4
    d = json.loads(json.dumps(o.as_dict()))
    assert d["scale_preset"] == "tiny" and d["tokens_sweep"] == [4, 8]
    for kw, name in [({"scale_ranks": 3}, "scale_ranks"), ({"scale_batch": 0}, "scale_batch"),
                     ({"skew_sweep": []}, "skew_sweep"), ({"skew_sweep": [-1]}, "skew_sweep"),
                     ({"eplb_per_rank": 0}, "eplb_per_rank"),
                     ({"eplb_per_rank": 13}, "eplb_per_rank"),
                     ({"ranks_sweep": [3]}, "ranks_sweep"),
                     ({"tokens_sweep": [3]}, "tokens_sweep"),
                     ({"tokens_sweep": [0]}, "tokens_sweep")]:
        with pytest.raises(ParameterError) as err:
            _opts(**kw)
        assert err.value.name == name
    with pytest.raises(ParameterError, match="scale_ranks >= 2"):
        _opts(scale_ranks=1)


def test_published_figures_have_sources_and_settings():
    rows = published_figures()
    assert rows and all(r.source.strip() and r.settings.strip() for r in rows)
    assert all(r.kind in KINDS and r.value_us > 0 for r in rows)
    q = {r.quantity: r.value_us for r in rows}
    assert q["DeepEP-Ascend dispatch (EP8)"] == 132.0
    assert q["DeepEP-Ascend combine (EP32)"] == 151.0
    assert q["single-card MoE step (FLASH)"] == 1028.0
    assert q["expert_routed per task"] == pytest.approx(26.25)
    assert {r.kind for r in published_figures(["stage"])} == {"stage"}
    assert "published (" in rows[0].label
    assert "1028.00" in format_published(rows)
    with pytest.raises(ValueError, match="kinds"):
        published_figures(["rumour"])
    with pytest.raises(ValueError, match="source"):
        PublishedFigure("x", 1.0, "stage", " ", "s")


def test_fit_levels_stop_at_the_rows_received(monkeypatch):
    """step.timing.fit_routed(max_rows=...): no fit kernel above the first 16·2^j >= the
    most rows an expert received (the capacity R·T can be far larger)."""
    from moe_kernels.step import timing
    seen = []

    def sim(rows, capacity, *a):
        seen.append(max(rows))
        return 10.0 + sum(1.0 + m / 16 for m in rows if m), True
    monkeypatch.setattr(timing, "routed_sim_us", sim)
    fit = timing.fit_routed(32, 4096, 64, 64, 0.0, max_rows=40)
    assert fit.levels == (16, 32, 64) and max(seen) == 64
    assert fit.predict([16, 48]) == pytest.approx(10.0 + 2.0 + 1.0 + 3.0)
    assert timing.fit_routed(32, 48, 64, 64, 0.0, max_rows=40).levels == (16, 32, 48)
    assert timing.fit_routed(32, 256, 64, 64, 0.0).levels[-1] == 256
