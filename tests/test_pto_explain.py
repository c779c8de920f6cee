"""pto.explain: the critical path of a SIM run, its counts, and their pricing, on a small
hand-written run folder (no pypto needed)."""
import json
from types import SimpleNamespace

import pytest

from moe_kernels.pto import explain as ex

FIXED = SimpleNamespace(task_us=0.2, dispatch_us=0.15, link_us=2.0, fanout_us=0.25,
                        dma_us=0.8, op_us=0.02, load_us_per_kib=0.01,
                        store_us=0.2, store_us_per_kib=0.01)


def _event(pid, tid, ts, name, dur=10):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}


def _run_folder(tmp_path):
    """Tasks: 1 and 2 are roots on AIV 24 / AIV 25; 3 and 4 depend on 1 (3 starts after 4);
    3 runs on AIV 24 and ends last. Loads / ops are events on the cores' pipes."""
    cm = tmp_path / "CostModelSimulationOutput"
    cm.mkdir()
    swim = [{"coreType": "AIV", "blockIdx": 24, "tasks": [
                {"taskId": 1, "execStart": 100, "execEnd": 200},
                {"taskId": 3, "execStart": 700, "execEnd": 900}]},
            {"coreType": "AIV", "blockIdx": 25, "tasks": [
                {"taskId": 2, "execStart": 150, "execEnd": 250},
                {"taskId": 4, "execStart": 600, "execEnd": 650}]},
            {"coreType": "HUB", "blockIdx": 0, "tasks": [
                {"taskId": 0, "execStart": 0, "execEnd": 1}]}]
    topo = [{"taskId": 0, "predecessors": [], "successors": [1, 2]},
            {"taskId": 1, "predecessors": [0], "successors": [4, 3]},
            {"taskId": 2, "predecessors": [0], "successors": []},
            {"taskId": 3, "predecessors": [1], "successors": []},
            {"taskId": 4, "predecessors": [1], "successors": []}]
    meta = [{"ph": "M", "name": "thread_name", "pid": 1000, "tid": 40024,
             "args": {"name": "AIV_24"}},
            {"ph": "M", "name": "thread_name", "pid": 1000, "tid": 40025,
             "args": {"name": "AIV_25"}}]
    for pid in (40024, 40025):
        meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": 106,
                  "args": {"name": "MTE_IN"}},
                 {"ph": "M", "name": "thread_name", "pid": pid, "tid": 108,
                  "args": {"name": "VECTOR_ALU"}}]
    events = [
        _event(40024, 106, 110, "1 COPY_IN 5 DDR_[0,0][8,8] 256B TO 6 UB_[0,0][8,8] 2048B"),
        _event(40024, 108, 150, "2 MUL 6 UB_[0,0][8,8] 256B TO 7 UB_[0,0][8,8] 256B"),
        _event(40024, 106, 710, "3 COPY_IN 5 DDR_[0,0][8,8] 256B TO 8 UB_[0,0][8,8] 1024B"),
        _event(40024, 106, 750, "4 COPY_IN 5 DDR_[0,0][8,8] 256B TO 9 UB_[0,0][8,8] 1024B"),
        _event(40024, 108, 800, "5 ADD 8 UB, 9 UB TO 10 UB_[0,0][8,8] 256B"),
        _event(40024, 106, 10, "6 Pipe Init"),
        {"ph": "M", "name": "thread_name", "pid": 40024, "tid": 110, "args": {"name": "MTE_OUT"}},
        _event(40024, 110, 850, "8 COPY_OUT 10 UB_[0,0][8,8] 256B TO 12 DDR_[0,0][8,8] 4096B"),
        # on the other core: not on the path
        _event(40025, 106, 160, "7 COPY_IN 5 DDR_[0,0][8,8] 256B TO 11 UB_[0,0][8,8] 256B"),
    ]
    (cm / "_simulate.swim.json").write_text(json.dumps(swim))
    (cm / "0_simulate.topo.json").write_text(json.dumps(topo))
    (cm / "_simulate.pefetto.trace.json").write_text(json.dumps(
        {"traceEvents": meta + events}))
    return tmp_path


def test_critical_path_and_counts(tmp_path):
    folder = _run_folder(tmp_path)
    tasks, pred, _, _ = ex._load_run(folder)
    assert set(tasks) == {1, 2, 3, 4}          # the HUB lane is not an AICore lane
    assert ex.critical_path(tasks, pred) == [(1, "root"), (3, "link")]
    c = ex.path_counts(folder)
    # task 1 is the first root to start; task 3 is task 1's second successor to start
    assert c == ex.PathCounts(tasks=2, first_position=0, links=(1,), loads=3,
                              load_bytes=2048 + 1024 + 1024, vec_ops=2, stores=1,
                              store_bytes=256)


def test_explain_prices_counts_and_picks_the_dominant_part():
    c = ex.PathCounts(tasks=2, first_position=4, links=(1,), loads=3, load_bytes=4096,
                      vec_ops=10)
    e = ex.explain(c, FIXED, hbm_us=1.0, cube_us=0.5, vec_us=0.1)
    assert e.task_us == pytest.approx(2 * 0.2 + 4 * 0.15 + 2.0 + 0.25)
    assert e.dma_us == pytest.approx(3 * 0.8 + 4 * 0.01)       # loads longer than stores
    st = ex.explain(ex.PathCounts(1, 0, (), 1, 0, 0, stores=8, store_bytes=8192), FIXED,
                    0.0, 0.0, 0.0)
    assert st.dma_us == pytest.approx(8 * 0.2 + 8 * 0.01)
    assert e.chain_us == pytest.approx(0.2)
    assert e.latency_us == pytest.approx(e.task_us + e.dma_us + e.chain_us)
    assert e.bound_us == pytest.approx(e.latency_us)
    assert e.dominant == "task"
    assert e.ratio(2 * e.bound_us) == pytest.approx(2.0)
    big = ex.explain(c, FIXED, hbm_us=100.0, cube_us=0.5, vec_us=0.1)
    assert big.dominant == "hbm" and big.bound_us == 100.0
    only = ex.explain(None, FIXED, 1.0, 2.0, 3.0)
    assert only.latency_us == 0 and only.bound_us == 3.0 and only.dominant == "vec"
    d = e.to_dict()
    assert d["dominant"] == "task" and d["counts"]["links"] == (1,)


def test_path_dict_of_a_folder_without_simulator_output(tmp_path):
    assert ex.path_dict(tmp_path) is None


def test_dependencies_are_followed_through_virtual_tasks():
    # 1 -> 9 (a hub task on no AICore lane) -> 3: 3 depends on 1
    tasks = {1: {}, 3: {}}
    assert ex._through_virtual({3: [9], 9: [1, 0], 0: []}, tasks) == {1: [], 3: [1]}


def test_path_dict_round_trip_and_stale_versions(tmp_path, monkeypatch):
    d = ex.path_dict(_run_folder(tmp_path))
    assert d["v"] == ex.PATH_VERSION
    monkeypatch.setattr("moe_kernels.pto.calibrate.fixed_costs", lambda: FIXED)
    e = ex.explain_entry(d, 0.0, 0.0, 0.0)
    assert e.counts == ex.path_counts(tmp_path)
    assert ex.explain_entry({**d, "v": ex.PATH_VERSION - 1}, 0.0, 0.0, 1.0).counts is None
