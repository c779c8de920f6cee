"""moe_kernels.analysis.rank_latency, latency_bars, published, latency_plots: swim parsing, per-rank
attribution (with a fake timed backend: no pypto), bar and sweep data, parameter checks,
the published-figures table, and the figures (deterministic PNG bytes)."""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from moe_kernels.analysis import latency_bars as lb
from moe_kernels.analysis import latency_plots as lp
from moe_kernels.analysis import rank_latency as rl
from moe_kernels.analysis import sources
from moe_kernels.analysis.comm import COMBINE_LINK, DISPATCH_LINK, comm_model
from moe_kernels.analysis.params import ParameterError, validate_latency_options, validate_params
from moe_kernels.analysis.plots import figure_png
from moe_kernels.analysis.published import (
    KINDS,
    PublishedFigure,
    format_published,
    published_figures,
)
from moe_kernels.backend import TorchBackend
from moe_kernels.ep import run_ep_layer
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.pto import swim
from moe_kernels.pto.runtime import LatencyRecord
from moe_kernels.stages import STAGE_NAMES

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


class FakeTimedBackend(TorchBackend):
    """Torch stages that log a LatencyRecord like PyptoBackend (us = 1 + stage index), and
    expert_routed us = rows received, so ranks differ."""

    name = "fake"

    def __init__(self, swim_path: str) -> None:
        self.latencies: list = []
        self.swim_path = swim_path

    def _rec(self, stage: str, us: float) -> None:
        self.latencies.append((stage, LatencyRecord(
            kernel=stage, aicore_cycles=int(us * 1800), aicore_us=us, clock_mhz=1800.0,
            utilization=0.5, n_tasks=2, total_cycles_incl_sched=0, swim_path=self.swim_path,
            trace_path=self.swim_path, output_dir="")))

    def __getattribute__(self, name: str):
        attr = super().__getattribute__(name)
        if name in STAGE_NAMES:
            def timed(*args, **kwargs):
                out = attr(*args, **kwargs)
                us = (float(args[3].sum()) if name == "expert_routed"
                      else 1.0 + STAGE_NAMES.index(name))
                self._rec(name, us)
                return out
            return timed
        return attr


@pytest.fixture(scope="module")
def tiny_run():
    p = validate_params(preset="tiny", ranks=2, batch=4, seq=2, seed=0, figures_dir="/tmp/x")
    run = p.run
    return run, make_inputs(run, 0), make_weights(run.model, 0)


def test_run_ep_per_rank_attributes_every_call(tiny_run, tmp_path):
    run, inputs, weights = tiny_run
    swim = str(_write_swim(tmp_path))
    per = rl.run_ep_per_rank(run, inputs, weights,
                              make_backend=lambda: FakeTimedBackend(swim))
    ref = run_ep_layer(run, inputs, weights)
    assert torch.equal(per.result.x_next, ref.x_next)     # wrapping changes no bits
    stages = [s for s in STAGE_NAMES if s != "scatter_routes"]
    for r in range(run.ranks):
        assert [c.stage for c in per.calls if c.rank == r] == stages
    for r in range(run.ranks):                                # call order on each rank
        assert [c.index for c in per.calls if c.rank == r] == list(range(len(stages)))
    recv = per.result.layout.recv_count.sum(dim=1)
    bars = lb.per_rank_stage_bars(per.calls, run.ranks)
    assert bars.categories == ("rank 0", "rank 1")
    assert list(bars.segments) == stages                   # program order, no scatter
    assert bars.segments["expert_routed"] == tuple(float(v) for v in recv)
    assert bars.segments["gate"] == (2.0, 2.0)
    assert per.swim("expert_routed", 1).lanes == ("AIC 0", "AIV 24")
    assert all(c.swim is None for c in per.calls if c.stage != "expert_routed")
    with pytest.raises(KeyError, match="no swimlane kept"):
        per.swim("gate", 0)


def test_run_ep_per_rank_keeps_the_swim_parsed_with_the_call(tiny_run, tmp_path):
    """A record that carries its parsed swimlane is used even after its file is gone."""
    run, inputs, weights = tiny_run
    path = _write_swim(tmp_path)
    table = swim.parse_swim_tasks(path, kernel="expert_routed")

    class Carrying(FakeTimedBackend):
        def _rec(self, stage, us):
            super()._rec(stage, us)
            name, rec = self.latencies[-1]
            self.latencies[-1] = (name, replace(rec, swim=table))

    path.unlink()
    per = rl.run_ep_per_rank(run, inputs, weights, make_backend=lambda: Carrying(str(path)),
                             keep_swim=None)
    assert all(c.swim is table for c in per.calls)


def test_bars_and_segments():
    calls = [rl.KernelCall(0, "gate", 0, 2.0, 1, 0.5), rl.KernelCall(1, "gate", 1, 3.0, 1, 0.5),
             rl.KernelCall(1, "hc_pre", 2, 1.0, 1, 0.5), rl.KernelCall(1, "gate", 3, 1.0, 1, .5)]
    bars = lb.per_rank_stage_bars(calls, 2)
    assert list(bars.segments) == ["hc_pre", "gate"]
    assert bars.segments["gate"] == (2.0, 4.0) and bars.totals == (2.0, 5.0)
    step = lb.add_segments(bars, {"dispatch (model)": [1.0, 2.0]})
    assert step.totals == (3.0, 7.0)
    with pytest.raises(ValueError, match="needs 2 values"):
        lb.add_segments(bars, {"x": [1.0]})
    with pytest.raises(ValueError, match="already present"):
        lb.add_segments(bars, {"gate": [1.0, 1.0]})
    with pytest.raises(ValueError, match="outside"):
        lb.per_rank_stage_bars(calls, 1)
    with pytest.raises(ValueError, match="not one of"):
        lb.per_rank_stage_bars([rl.KernelCall(0, "dispatch", 0, 1.0, 1, 1.0)], 1)


def test_sweeps_with_a_fake_report(tiny_run):
    run = tiny_run[0]
    seen = []

    def report(r, seed, stages):
        seen.append((r.batch, r.ranks, seed, stages))
        return [SimpleNamespace(stage="gate", sim_us=float(r.tokens)),
                SimpleNamespace(stage="expert_routed", sim_us=float(r.n_local))]

    runs = lb.batch_sweep_runs(run, [2, 8])
    assert [r.tokens for r in runs] == [4, 16]
    series = lb.sweep_series(lb.stage_sweep(runs, 3, report=report))
    assert series == {"gate": [4.0, 16.0], "expert_routed": [8.0, 8.0],
                      "total (sum of stages)": [12.0, 24.0]}
    assert seen == [(2, 2, 3, None), (8, 2, 3, None)]
    rr = lb.ranks_sweep_runs(run, [1, 4])
    assert [r.n_local for r in rr] == [16, 4]
    fixed = [SimpleNamespace(stage="gate", sim_us=99.0), SimpleNamespace(stage="hc_post",
                                                                         sim_us=1.0)]
    one = lb.sweep_series([[SimpleNamespace(stage="gate", sim_us=2.0)]], fixed=fixed)
    assert one == {"gate": [2.0], "total (sum of stages; 1 unchanged stages fixed)": [3.0]}
    again = lb.stage_sweep(runs, 3, report=report, known={runs[0]: ["cached"]})
    assert again[0] == ["cached"] and len(seen) == 3
    with pytest.raises(ValueError, match="different stages"):
        lb.sweep_series([[SimpleNamespace(stage="a", sim_us=1.0)],
                          [SimpleNamespace(stage="b", sim_us=1.0)]])


def _opts(**kw):
    base = dict(ranks=2, n_experts=16, swim_stage="expert_routed", swim_rank=0,
                run_sweeps=True, batch_sweep=[8, 2], ranks_sweep=[2, 1])
    return validate_latency_options(**{**base, **kw})


def test_validate_latency_options():
    o = _opts()
    assert o.batch_sweep == (2, 8) and o.ranks_sweep == (1, 2)
    assert o.dispatch_link == DISPATCH_LINK and o.combine_link == COMBINE_LINK
    o2 = _opts(dispatch_gbps=100, combine_latency_us=0)
    assert o2.dispatch_link.bandwidth_gbps == 100.0 and o2.dispatch_link.source == "parameter"
    assert o2.combine_link.latency_us == 0.0
    assert json.loads(json.dumps(o2.as_dict()))["dispatch_gbps"] == 100.0
    for kw, name in [({"swim_stage": "scatter_routes"}, "swim_stage"),
                     ({"swim_rank": 2}, "swim_rank"), ({"run_sweeps": 1}, "run_sweeps"),
                     ({"batch_sweep": []}, "batch_sweep"), ({"batch_sweep": [0]}, "batch_sweep"),
                     ({"ranks_sweep": [3]}, "ranks_sweep"),
                     ({"dispatch_gbps": -1}, "dispatch_gbps"),
                     ({"combine_latency_us": -1.0}, "combine_latency_us"),
                     ({"messages": "bulk"}, "messages")]:
        with pytest.raises(ParameterError) as err:
            _opts(**kw)
        assert err.value.name == name
    with pytest.raises(ParameterError, match=r"\[1, 2, 4, 8, 16\]"):
        _opts(ranks_sweep=[3])


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


def test_latency_figures_are_deterministic(tiny_run):
    run = tiny_run[0]
    table = swim.parse_swim_tasks(SWIM, kernel="k")
    bars = lb.StackedBars(("rank 0", "rank 1"), {"gate": (2.0, 3.0), "hc_post": (1.0, 1.0)})
    counts = torch.tensor([[[2, 1], [3, 0]], [[1, 1], [0, 2]]])
    cm = comm_model(counts, 256)
    rec = SimpleNamespace(stage="gate", sim_us=5.0, roofline_us=1.0, config_roofline_us=0.5,
                          ratio=5.0)
    figs = [lp.plot_stacked_bars(bars, f"bars, {sources.SIM_SOURCE}", notes={"rank 0": "n"}),
            lp.plot_stacked_bars(lb.add_segments(bars, {"dispatch (model)": [1, 2]}), "t",
                                 hatched=("dispatch (model)",)),
            lp.plot_swimlane(table, "swim"), lp.plot_roofline([rec], "roof"),
            lp.plot_comm_model(cm, "comm", published_figures(["communication"])[:2]),
            lp.plot_beside_published([("ours", 3.0, "SIM"), ("m", 2.0, "model")],
                                     published_figures(), "beside"),
            lp.plot_sweep([16, 64, 256], {"gate": [1, 2, 3], "total (sum)": [2, 4, 6]},
                          "sweep", xlabel="tokens")]
    for fig in figs:
        assert figure_png(fig) == figure_png(fig)
    with pytest.raises(ValueError, match="provenance"):
        lp.plot_beside_published([("x", 1.0, "guess")], [], "t")
    assert run.ranks == 2


def test_tight_capacity_whatif_sizes_each_rank_by_its_rows(tiny_run):
    run, _, weights = tiny_run
    seen = []

    def kernel(x, scale, w, count, *rest):
        seen.append((tuple(x.shape), count.tolist()))
        rec = LatencyRecord("expert_routed", 0, float(x.shape[1]), 1800.0, 0.5, 3, 0, "",
                            "", "")
        return None, rec

    counts = torch.zeros(2, run.n_local, dtype=torch.int64)
    counts[0, 1], counts[1, 0] = 5, 2
    calls = rl.tight_capacity_whatif(run, weights, counts, kernel=kernel)
    assert [c.aicore_us for c in calls] == [16.0, 16.0] and [c.rank for c in calls] == [0, 1]
    assert seen[0][0] == (run.n_local, 16, run.model.hidden_size)
    assert rl.tight_capacity(counts, 4) == [8, 4]
    assert rl.tight_capacity(torch.zeros(1, 3, dtype=torch.int64)) == [1]
    assert [c.aicore_us for c in rl.tight_capacity_whatif(
        run, weights, counts, kernel=kernel, row_multiple=1)] == [5.0, 2.0]
    with pytest.raises(ValueError, match="row_multiple"):
        rl.tight_capacity(counts, 0)
    assert seen[1][1][0] == 2
    with pytest.raises(ValueError, match="recv_count"):
        rl.tight_capacity_whatif(run, weights, counts[0], kernel=kernel)
