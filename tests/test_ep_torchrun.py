"""The torchrun transport: `torchrun -m moe_kernels layer` equals the single-card
reference bit for bit (with poisoned buffers too), and a world size that does not match
--ranks is refused as bad input naming both numbers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
#: Seconds a 2-process torchrun of the tiny preset may take (2 busy cores).
RUN_S = 300

pytestmark = pytest.mark.skipif(not TORCHRUN.exists() and not shutil.which("torchrun"),
                                reason="torchrun not installed")


def _torchrun(nproc: int, *layer_args: str) -> subprocess.CompletedProcess:
    exe = str(TORCHRUN) if TORCHRUN.exists() else "torchrun"
    cmd = [exe, "--standalone", "--nproc-per-node", str(nproc), "-m", "moe_kernels",
           "layer", "--preset", "tiny", "--batch", "4", "--seq", "2", "--transport", "gloo",
           *layer_args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=RUN_S)


@pytest.mark.parametrize("poison", [False, True])
def test_torchrun_equals_reference(poison: bool) -> None:
    args = ["--ranks", "2", "--check"] + (["--poison"] if poison else [])
    p = _torchrun(2, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "equals the single-card torch reference bit for bit" in p.stdout, p.stdout


def test_torchrun_world_size_must_match_ranks() -> None:
    p = _torchrun(2, "--ranks", "4")
    assert p.returncode != 0
    assert "torchrun world size 2 must equal ranks 4" in p.stderr, p.stderr[-3000:]
