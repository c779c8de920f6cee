"""The committed SIM timings are current, and `step.refresh` re-measures stale ones.

A kernel change without a refresh would leave a fresh clone re-simulating flash and pro
shapes (minutes each) on its first `make run`: the first test catches that in CI."""
import pytest

pytestmark = pytest.mark.pypto
pytest.importorskip("moe_kernels.pto.backend")
from moe_kernels.step import cache, refresh  # noqa: E402


def test_committed_timings_match_the_current_kernels():
    stale = [e["key"]["kernel"] for e in cache.committed_entries().values()
             if refresh.is_stale(e)]
    assert not stale, (f"{len(stale)} committed SIM timings were measured with older kernel "
                       f"code ({sorted(set(stale))}): run python -m moe_kernels.step.refresh")


def test_is_stale_follows_the_source_hash():
    entry = next(iter(cache.committed_entries().values()))
    assert not refresh.is_stale(entry)
    assert refresh.is_stale(dict(entry, key=dict(entry["key"], source="0" * 16)))


def test_measure_entry_rebuilds_the_shape_and_reproduces_the_time(tmp_path, monkeypatch):
    """A tiny committed stage entry, measured again from its key alone, gives the same
    key and the same SIM time (the cost model is deterministic)."""
    tiny = [e for e in cache.committed_entries().values()
            if e["key"]["kernel"] in ("pack_routes", "reduce_routes")
            and e["key"]["shape"].get("hidden_size", 1 << 30) <= 256]
    if not tiny:
        pytest.skip("no tiny stage entry committed")
    monkeypatch.setattr(cache, "local_dir", lambda: tmp_path / "timings")
    monkeypatch.setattr(cache, "committed_entries", lambda path=None: {})
    e = tiny[0]
    new = refresh.measure_entry(dict(e["key"], source="stale-source"))
    assert new["key"] == e["key"]
    assert new["aicore_us"] == pytest.approx(e["aicore_us"], rel=1e-9)


def test_run_child_returns_what_the_child_emits_and_names_a_failure():
    from moe_kernels.step.child import run_child
    code = "from moe_kernels.step.child import emit; print('noise'); emit({'us': 1.5})"
    assert run_child(["-c", code], "probe") == {"us": 1.5}
    with pytest.raises(RuntimeError, match=r"probe: SIM child failed \(rc 3\): boom"):
        run_child(["-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"], "probe")
