"""Hostile inputs: size and memory limits before any work, the CLI's exit-code contract
(0 ok, 1 failed check or fault, 2 bad input; one line, no traceback), seeds, output
paths, notebook defaults and pypto's side files."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_kernels import cli, limits
from moe_kernels.analysis.params import ParameterError, validate_params
from moe_kernels.config import (
    MAX_TOKENS_PER_RANK,
    MIN_RECV_ROWS,
    ConfigError,
    RunConfig,
    get_preset,
)
from moe_kernels.fixtures import generator, make_routed_shard, make_weights
from moe_kernels.notebooks_run import list_notebooks, notebook_parameters
from moe_kernels.paths import REPO_ROOT
from moe_kernels.pto import side_files

GIB = 1024 ** 3
TINY = ["layer", "--preset", "tiny", "--batch", "2", "--seq", "1"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- limits
def test_default_capacity_is_one_tile_and_at_most_what_can_arrive():
    flash = RunConfig(get_preset("flash"), batch=2, seq=1, ranks=8)
    assert (flash.tokens * 6 // flash.n_local) * 4 == 0 and flash.recv_max == MIN_RECV_ROWS
    assert RunConfig(get_preset("tiny"), batch=2, seq=2, ranks=1).recv_max == 4   # R·T
    assert RunConfig(get_preset("demo"), batch=64, seq=2, ranks=2).recv_max == 128


def test_capacity_above_what_can_arrive_is_refused(capsys):
    with pytest.raises(ConfigError, match=r"recv_capacity\) = 9 exceeds 8 = ranks x batch"):
        RunConfig(get_preset("tiny"), batch=4, seq=1, ranks=2, recv_capacity=9)
    assert cli.main(["layer", "--preset", "tiny", "--capacity", "1000000"]) == 2
    err = _one_error_line(capsys)
    assert "capacity" in err and "1000000" in err and "give at most 128" in err


def test_tokens_per_rank_bound(capsys):
    assert cli.main(["layer", "--batch", "100000000"]) == 2
    err = _one_error_line(capsys)
    assert "batch x seq" in err and str(MAX_TOKENS_PER_RANK) in err
    RunConfig(get_preset("tiny"), batch=MAX_TOKENS_PER_RANK, seq=1)  # the bound itself is ok


def test_memory_estimate_refuses_pro_on_a_24_gib_machine(monkeypatch, capsys):
    pro = RunConfig(get_preset("pro"), batch=64, seq=2, ranks=8)
    est = limits.estimate_memory(pro, transport="local")
    assert est.parts["routed weights (INT8)"] > 23 * GIB and est.total > 24 * GIB
    with pytest.raises(ConfigError, match=r"preset=pro ranks=8 .* needs about \d+\.\d GiB"):
        limits.check_memory(pro, transport="local", available=24 * GIB)
    flash = RunConfig(get_preset("flash"), batch=16, seq=2, ranks=8)
    assert limits.check_memory(flash, transport="local", check=True,
                               available=24 * GIB).total < 10 * GIB
    monkeypatch.setattr(limits, "mem_available_bytes", lambda: 24 * GIB)
    assert cli.main(["layer", "--preset", "pro", "--ranks", "8"]) == 2
    assert "GiB available" in _one_error_line(capsys)


def test_mem_available_reads_proc_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:  100 kB\nMemAvailable:    2048 kB\n")
    assert limits.mem_available_bytes(f) == 2048 * 1024
    assert limits.mem_available_bytes(tmp_path / "none") is None


def test_notebook_capacity_factor_bounded():
    good = dict(preset="tiny", ranks=2, batch=4, seq=1, seed=0,
                figures_dir=".cache/figures-scratch")
    for factor in (1e9, 1e300):
        with pytest.raises(ParameterError, match=r"capacity_factor=.*\(0, 8\]"):
            validate_params(**good, capacity_factor=factor)
    assert validate_params(**good, capacity_factor=8.0).run.recv_max <= 8


# --------------------------------------------------------------------------- fixtures
def test_rank_shard_equals_the_slice_of_the_full_weights():
    cfg = get_preset("tiny")
    full = make_weights(cfg, 4)
    shard = make_routed_shard(cfg, 4, rank=3, n_local=4)
    for a, b in zip(shard, full.routed_shard(3, 4), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [2 ** 63, 2 ** 64, -1])
def test_seeds_outside_the_range_are_refused(seed, capsys):
    with pytest.raises(ConfigError, match=r"\[0, 2\^63\)"):
        generator(seed, "x")
    assert cli.main([*TINY, "--seed", str(seed)]) == 2
    assert "--seed must be an integer in [0, 2^63)" in _one_error_line(capsys)


def test_largest_seed_differs_from_seed_zero():
    a = torch.randn(4, generator=generator(2 ** 63 - 1, "x"))
    assert not torch.equal(a, torch.randn(4, generator=generator(0, "x")))


# --------------------------------------------------------------------------- exit codes
def test_failed_check_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(cli, "compare_x_next", lambda a, b: False)
    assert cli.main([*TINY, "--ranks", "2", "--check"]) == 1
    assert "check: FAIL" in capsys.readouterr().out
    monkeypatch.undo()
    assert cli.main([*TINY, "--ranks", "2", "--check"]) == 0
    assert "bit for bit" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    ([*TINY, "--dump", "/proc/run.pt"], "--dump /proc/run.pt: cannot write"),
    ([*TINY, "--dump", "."], "is a directory"),
    ([*TINY, "--dump", "README.md/x.pt"], "is a file, not a folder"),
    ([*TINY, "--timeout", "5"], "--timeout apply to the EP program"),
    (["sweep", "99_none", "-p", "skew", "1"], "notebook '99_none' not found"),
    (["sweep", "01_routing", "-p", "bogus", "1"], "no sweepable parameter 'bogus'"),
    (["sweep", "01_routing", "-p", "ranks", "1.5"], "expected an integer"),
    (["sweep", "01_routing", "-p", "skew", "1", "--figures-dir", "README.md"],
     "is a file, not a folder"),
    (["figures", "--figures-dir", "/proc/figs"], "cannot write"),
])
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    assert cli.main(args) == 2
    assert needle in _one_error_line(capsys)


def test_json_path_checked_before_the_kernels_run(tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("stage_report ran before the --json path was checked")
    monkeypatch.setattr("moe_kernels.pto.report.stage_report", never, raising=False)
    assert cli.main(["stages", "--preset", "tiny", "--json", str(tmp_path)]) == 2
    assert "is a directory" in _one_error_line(capsys)


def test_pypto_cache_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    f = tmp_path / "cache"
    f.write_text("x")
    monkeypatch.setenv("MOE_KERNELS_PYPTO_CACHE", str(f))
    assert cli.main(["stages", "--preset", "tiny"]) == 2
    assert "MOE_KERNELS_PYPTO_CACHE" in _one_error_line(capsys)


def test_runtime_fault_exits_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("injected fault")
    monkeypatch.setattr(cli, "reference_layer", boom)
    assert cli.main(TINY) == 1
    assert "RuntimeError: injected fault" in _one_error_line(capsys)
    with pytest.raises(RuntimeError, match="injected fault"):
        cli.main([*TINY, "--debug"])


def test_usage_errors_exit_2_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["layer", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in _one_error_line(capsys)


# --------------------------------------------------------------------------- notebooks
@pytest.mark.parametrize("nb", list_notebooks(), ids=lambda p: p.stem)
def test_notebook_defaults_write_to_git_ignored_scratch(nb):
    fdir = (REPO_ROOT / notebook_parameters(nb)["figures_dir"]).resolve()
    committed = (REPO_ROOT / "figures").resolve()
    assert fdir != committed and committed not in fdir.parents
    ignored = subprocess.run(["git", "check-ignore", "-q", str(fdir / "x.png")],
                             cwd=REPO_ROOT, timeout=30)
    assert ignored.returncode == 0, f"{fdir} is not ignored by git"


def test_figures_dir_that_is_a_file_fails_in_validation(tmp_path):
    f = tmp_path / "figs"
    f.write_text("x")
    with pytest.raises(ParameterError, match="figures_dir.*is a file, not a folder"):
        validate_params(preset="tiny", ranks=2, batch=4, seq=1, seed=0, figures_dir=str(f))


# --------------------------------------------------------------------------- pypto files
def test_side_files_go_into_the_cache_and_stay_bounded(tmp_path, monkeypatch):
    for var in side_files.SIDE_FILE_ENV:
        monkeypatch.delenv(var, raising=False)
    side_files.redirect_side_files(tmp_path)
    import os
    assert os.environ["PYPTO_HOME"] == str(tmp_path / "pypto-home")
    assert os.environ["ASCEND_PROCESS_LOG_PATH"] == str(tmp_path / "ascend-log")
    run = tmp_path / "pypto-home" / "run"
    plog = tmp_path / "ascend-log" / "debug" / "plog"
    plog.mkdir(parents=True)
    for i in range(40):
        (run / f"rundata_{i:03d}").mkdir(parents=True)
        (plog / f"pypto-log-{i}.log").write_text("x")
        os.utime(run / f"rundata_{i:03d}", (i, i))
        os.utime(plog / f"pypto-log-{i}.log", (i, i))
    assert side_files.prune_side_files(tmp_path, keep=8, min_age_s=0) == 64
    assert sorted(p.name for p in run.iterdir())[0] == "rundata_032"
    assert len(list(plog.iterdir())) == 8


def test_cache_folder_that_is_a_file_is_a_config_error(tmp_path):
    f = tmp_path / "cache"
    f.write_text("x")
    with pytest.raises(ConfigError, match="MOE_KERNELS_PYPTO_CACHE.*not a writable folder"):
        side_files.check_cache_folder(f, "MOE_KERNELS_PYPTO_CACHE")
    assert side_files.check_cache_folder(tmp_path / "new", "X") == tmp_path / "new"
    assert Path(tmp_path / "new").is_dir()


def test_routed_weights_are_built_without_a_second_copy():
    """Peak RSS growth while generating routed weights stays near their INT8 size (the
    old per-expert list + torch.stack held two copies of every expert)."""
    code = (
        "import resource, torch\n"
        "from moe_kernels.config import get_preset\n"
        "from moe_kernels.fixtures import make_routed_weights\n"
        "cfg = get_preset('tiny', n_routed_experts=64, hidden_size=1024, "
        "moe_intermediate_size=1024)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "w = make_routed_weights(cfg, 0)\n"
        "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024\n"
        "print(grew, sum(t.numel() * t.element_size() for t in w))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=300, check=True).stdout.split()
    grew, size = int(out[0]), int(out[1])
    assert size > 190 * 1024 ** 2
    assert grew < 1.4 * size, f"RSS grew {grew / 2**20:.0f} MiB for {size / 2**20:.0f} MiB"
