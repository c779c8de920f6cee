"""Rank processes of the `gloo` transport never outlive their parent (issue 12).

The parent is a subprocess (the `layer` command, or a script whose step hangs); the test
kills it with SIGKILL or SIGTERM once its rank processes exist and checks, through /proc,
that none of its descendants (ranks, resource tracker) survives within a bounded time.
Also: bad timeouts are refused with a ConfigError naming the parameter.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from moe_kernels.config import ConfigError
from moe_kernels.ep import LocalTransport
from moe_kernels.ep.procs import TMP_PREFIX, SpawnedWorld

REPO = Path(__file__).resolve().parents[1]
#: Seconds the descendants of a killed parent may take to die (watchdog poll 0.5 s,
#: plus a child that is still importing torch on 2 busy cores).
DIE_WITHIN_S = 30.0
#: Seconds to wait for a parent to spawn its ranks (each imports torch).
SPAWN_WITHIN_S = 120.0


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every live, non-zombie process (from /proc)."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            out.setdefault(int(fields[1]), []).append(int(d.name))
    return out


def _descendants(pid: int) -> set[int]:
    kids, todo, seen = _children(), [pid], set()
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _alive(pids: set[int]) -> set[int]:
    live = set()
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].split()[0] != "Z":
            live.add(p)
    return live


def _start_and_kill(cmd: list[str], sig: int, ranks: int, group: bool = False
                    ) -> tuple[set[int], set[int], str]:
    """Start `cmd`, wait until it has `ranks` rank processes, send `sig` to it (to its
    whole process group, like a terminal's Ctrl-C, if `group`); return (its descendants
    before the kill, those still alive DIE_WITHIN_S later, its stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pymp_before = set(Path(tempfile.gettempdir()).glob("pymp-*"))
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=group)
    try:
        deadline = time.monotonic() + SPAWN_WITHIN_S
        desc: set[int] = set()
        while time.monotonic() < deadline and proc.poll() is None:
            desc = _descendants(proc.pid)
            names = [_cmdline(p) for p in desc]
            if sum("spawn_main" in n for n in names) >= ranks:
                break
            time.sleep(0.2)
        assert proc.poll() is None, _read(err)
        time.sleep(1.0)                       # let the ranks get into their program
        desc = _descendants(proc.pid)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=DIE_WITHIN_S)
        deadline = time.monotonic() + DIE_WITHIN_S
        while _alive(desc) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)                       # let the last writer flush its stderr
        return desc, _alive(desc), _read(err)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _alive(_descendants(proc.pid)):
            os.kill(p, signal.SIGKILL)
        if sig == signal.SIGKILL:
            _remove_dead_pymp(pymp_before)


def _remove_dead_pymp(before: set[Path]) -> None:
    """Remove pymp-* folders that appeared since `before` and whose listener socket no
    longer answers: a SIGKILLed parent cannot remove the folder multiprocessing made
    for sharing tensors with its ranks (Python's own behaviour), so the test does."""
    for d in set(Path(tempfile.gettempdir()).glob("pymp-*")) - before:
        socks = list(d.glob("listener-*"))
        if socks and all(not _listening(s) for s in socks):
            shutil.rmtree(d, ignore_errors=True)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _read(f: object) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


_HANG = textwrap.dedent("""
    from moe_kernels.config import RunConfig, get_preset
    from moe_kernels.ep import run_ep_layer
    from moe_kernels.ep.faults import FaultyBackends
    from moe_kernels.fixtures import make_inputs, make_weights
    if __name__ == "__main__":
        run = RunConfig(model=get_preset("tiny"), batch=4, seq=2, ranks=2)
        run_ep_layer(run, make_inputs(run), make_weights(run.model), transport="gloo",
                     backend=FaultyBackends(rank=1, kind="hang"), timeout=600.0)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_parent_with_hung_step_leaves_no_process(sig: int, tmp_path: Path) -> None:
    """Rank 0 blocks in a collective, rank 1 sleeps: both must die with the parent."""
    script = tmp_path / "hang.py"
    script.write_text(_HANG)
    before = set(Path(tempfile.gettempdir()).glob("pymp-*"))
    desc, alive, _ = _start_and_kill([sys.executable, str(script)], sig, ranks=2)
    assert len(desc) >= 2 and not alive, f"survivors: {[_cmdline(p) for p in alive]}"
    if sig == signal.SIGTERM:  # a clean exit removes every temp folder it made
        after = set(Path(tempfile.gettempdir()).glob("pymp-*"))
        assert not after - before
        assert not list(Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"))


def test_layer_command_killed_after_spawn_leaves_no_process() -> None:
    """The issue's reproduction: `layer --ranks 4 --transport gloo`, parent SIGKILLed."""
    cmd = [sys.executable, "-m", "moe_kernels", "layer", "--preset", "tiny", "--ranks", "4",
           "--transport", "gloo", "--batch", "64"]
    desc, alive, _ = _start_and_kill(cmd, signal.SIGKILL, ranks=4)
    assert len(desc) >= 4 and not alive, f"survivors: {[_cmdline(p) for p in alive]}"


def test_ctrl_c_prints_one_line() -> None:
    """SIGINT to the whole process group (a terminal's Ctrl-C): the ranks stay silent
    and die, and the parent prints one line."""
    cmd = [sys.executable, "-m", "moe_kernels", "layer", "--preset", "tiny", "--ranks", "4",
           "--transport", "gloo", "--batch", "64"]
    desc, alive, err = _start_and_kill(cmd, signal.SIGINT, ranks=4, group=True)
    assert len(desc) >= 4 and not alive, f"survivors: {[_cmdline(p) for p in alive]}"
    assert err.strip() == "interrupted", err


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "5", True])
def test_bad_timeouts_are_refused_naming_the_parameter(bad: object) -> None:
    for make in (lambda: SpawnedWorld(2, timeout=bad), lambda: LocalTransport(timeout=bad)):
        with pytest.raises(ConfigError, match=r"^timeout must be a finite number"):
            make()
