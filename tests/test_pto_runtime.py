"""The pypto runtime: SIM latency records, determinism, output hygiene, the cached
interpreter across processes, the version guard, and the stage report's shape."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_kernels.config import RunConfig, get_preset

pytestmark = pytest.mark.pypto
rt = pytest.importorskip("moe_kernels.pto.runtime")
from moe_kernels.pto import hc, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _post_inputs(t=8, d=256):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(t, 1, d, generator=g).to(torch.bfloat16)
    x = torch.randn(t, 1, 4, d, generator=g).to(torch.bfloat16)
    return f, x, torch.rand(t, 1, 4, generator=g), torch.rand(t, 1, 4, 4, generator=g)


def test_latency_record_parsed_positive_and_deterministic():
    out1, lat1 = hc.hc_post(*_post_inputs())
    out2, lat2 = hc.hc_post(*_post_inputs())
    assert torch.equal(out1, out2)
    assert lat1.aicore_cycles > 0 and lat1.aicore_us > 0 and lat1.n_tasks > 0
    assert lat1.clock_mhz == rt.CLOCK_MHZ == 1800.0
    assert lat1.aicore_us == pytest.approx(lat1.aicore_cycles / 1800.0)
    assert 0 < lat1.utilization <= 1
    assert lat1.total_cycles_incl_sched >= lat1.aicore_cycles
    assert lat2.aicore_cycles == lat1.aicore_cycles          # the cost model is deterministic
    assert lat1.output_dir != lat2.output_dir
    assert Path(lat2.swim_path).exists() and Path(lat2.trace_path).exists()
    assert json.loads(Path(lat2.swim_path).read_text())      # valid JSON for notebooks


def test_output_folders_stay_bounded_and_inside_cache():
    for _ in range(rt.KEEP_OUTPUT_DIRS + 2):
        hc.hc_post(*_post_inputs())
    dirs = list(rt.output_root().glob("output_*"))
    assert 0 < len(dirs) <= rt.KEEP_OUTPUT_DIRS
    assert not list(ROOT.glob("output_*")) and not (ROOT / "output").exists()


def test_second_process_reuses_cached_interpreter():
    rt.ensure_ready()
    marker = rt.calculator_dir() / rt._BUILD_MARKER
    assert rt.calculator_is_built()
    before = marker.stat().st_mtime_ns
    code = ("import time; t = time.time(); from moe_kernels.pto import runtime as rt; "
            "built = rt.calculator_is_built(); rt.ensure_ready(); "
            "from pypto._utils import BuildOnlineManager as M; "
            "print(built, M().calculator_loaded, round(time.time() - t, 1))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=str(ROOT), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    built, loaded, secs = res.stdout.split()[-3:]
    assert built == "True" and loaded == "True"
    assert float(secs) < 30, "the interpreter was rebuilt instead of loaded from the cache"
    assert marker.stat().st_mtime_ns == before


def test_wrong_pypto_version_fails_loudly(monkeypatch):
    monkeypatch.setattr(rt, "installed_pypto_version", lambda: "0.3.0")
    with pytest.raises(rt.PyptoVersionError, match=r"0\.2\.0.*got '0\.3\.0'"):
        rt.ensure_ready()
    with pytest.raises(rt.PyptoVersionError):
        rt.patch_verify_inputs()


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(rt.CACHE_ENV, str(tmp_path))
    assert rt.cache_dir() == tmp_path.resolve()
    monkeypatch.delenv(rt.CACHE_ENV)
    assert rt.cache_dir() == ROOT / ".cache" / "pypto"


def test_stage_report_records_and_table(monkeypatch):
    # calibrated limits replaced by the configured ones: the calibration run is a benchmark
    monkeypatch.setattr(report, "calibrated_limits", report.configured_limits)
    monkeypatch.setattr(report, "calibrated_vector_ops_per_s", lambda: 2.4e12)
    run = RunConfig(get_preset("tiny"), batch=4, seq=2, ranks=2)
    recs = report.stage_report(run, stages=("pack_routes", "reduce_routes", "hc_post"))
    assert [r.stage for r in recs] == ["pack_routes", "reduce_routes", "hc_post"]
    for r in recs:
        d = r.to_dict()
        assert {"stage", "sim_us", "bytes", "flops", "roofline_us", "config_roofline_us",
                "ratio"} <= set(d)
        assert d["sim_us"] > 0 and d["bytes"] > 0 and d["roofline_us"] > 0
        assert d["ratio"] == pytest.approx(d["sim_us"] / d["roofline_us"])
        # the vector bound is an extra column, not folded into roofline_us
        assert d["vec_roof_us"] == pytest.approx(d["vec_ops"] / 2.4e12 * 1e6)
        assert d["bound_ratio"] == pytest.approx(
            d["sim_us"] / max(d["roofline_us"], d["vec_roof_us"]))
    table = report.format_stage_table(recs)
    assert "hc_post" in table and "total" in table and "1800 MHz" in table
    with pytest.raises(ValueError, match="stages must be a subset"):
        report.stage_report(run, stages=("nope",))


def test_configured_limits_from_a2a3_ini():
    lim = report.configured_limits()
    # 32 B/cycle x 24 cores x 1.8 GHz; 16x16x16 (BF16) and 16x32x16 (INT8) MAC/cycle x 24 cubes
    assert lim.hbm_bytes_per_s == pytest.approx(32 * 24 * 1.8e9)
    assert lim.bf16_flops_per_s == pytest.approx(2 * 4096 * 24 * 1.8e9)
    assert lim.int8_ops_per_s == pytest.approx(2 * 8192 * 24 * 1.8e9)
