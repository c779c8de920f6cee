"""Process management for the `gloo` transport: R spawned rank processes on loopback.

`SpawnedWorld` starts R worker processes that form one gloo group and run `EpStep`s (it
implements `Transport.run`) or plain functions (`call`, for benchmarks) until closed.
Workers never outlive their parent, whatever kills it:

* each worker asks Linux for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), and
  a watchdog thread checks the parent pid (also covers the start-up window and other
  OSes); the worker's job queue `get` is bounded, so it notices too. (Linux sends the
  signal when the parent *thread* that started the world exits: start a world from a
  thread that outlives it, e.g. the main thread);
* workers ignore SIGINT (Ctrl-C reaches the whole process group; the parent handles it
  and stops them, so one interrupt gives one message, not one traceback per rank);
* while a world is open, SIGTERM to the parent raises SystemExit in it (main thread
  only), so the world closes normally;
* each world gives its workers a private temp folder (multiprocessing's `pymp-*` folders
  go there) and removes it on close, as well as folders left by dead parents.

Fault injection is not part of the worker loop: tests pass a faulty backend factory
(ep.faults) like any other per-rank backend.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..backend import BACKENDS
from ..types import CapacityError
from .dist import DistError, DistTimeoutError, RankSession
from .rank import RankOutput
from .transport import EpStep, check_timeout, validate_step

#: Seconds a spawned child may take to start Python and import torch, on top of the
#: rendezvous timeout (2 slow cores shared by several engineers).
STARTUP_GRACE_S = 60.0
#: Seconds to wait for the other ranks' error reports once one rank has failed (healthy
#: peers hit the same process-group timeout at about the same moment).
ERROR_GRACE_S = 2.0
#: Seconds a child gets to exit cleanly before it is terminated, then killed.
JOIN_S = 3.0
#: Seconds between a worker's checks that its parent is alive (queue get and watchdog).
PARENT_POLL_S = 0.5
#: Prefix of a world's private temp folder: moe-ep-world-<parent pid>-<random>.
TMP_PREFIX = "moe-ep-world-"
#: prctl option number of PR_SET_PDEATHSIG (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class _Job:
    job_id: int
    step: EpStep | None = None
    fn: Any = None        # or a module-level function fn(rank, *args), importable
    args: tuple = ()


def _die_with_parent(parent_pid: int) -> None:
    """Exit this process as soon as `parent_pid` is gone: PDEATHSIG on Linux, plus a
    watchdog thread (the parent may have died before prctl ran)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl: the watchdog still works
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(PARENT_POLL_S)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker(rank: int, ranks: int, port: int, timeout: float, threads: int,
            parent_pid: int, tmpdir: str, jobs: Any, results: Any) -> None:
    """Child process: join the group, then run jobs until told to stop."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tempfile.tempdir = tmpdir   # this process's pymp-* folder goes in the world's folder
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=ranks,
                                timeout=datetime.timedelta(seconds=timeout))
    except BaseException as exc:  # noqa: BLE001  (reported to the parent)
        results.put((rank, -1, "error", _describe(exc)))
        return
    results.put((rank, -1, "ready", None))
    session = RankSession(rank)
    try:
        while True:
            try:
                job = jobs.get(timeout=PARENT_POLL_S)
            except queue.Empty:
                continue        # (the watchdog ends us if the parent is gone)
            if job is None:
                break
            try:
                out = session.run(job.step) if job.step is not None else \
                    job.fn(rank, *job.args)
                results.put((rank, job.job_id, "ok", out))
            except BaseException as exc:  # noqa: BLE001
                results.put((rank, job.job_id, "error", _describe(exc)))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (a broken group may not tear down cleanly)
            pass


def _portable(step: EpStep) -> EpStep:
    """A single named backend object travels as its name (each rank builds its own);
    other specs (names, sequences, factories) travel as they are and must pickle."""
    b = step.backend
    if isinstance(b, (str, Sequence)) or callable(b):
        return step
    name = getattr(b, "name", None)
    return replace(step, backend=name) if name in BACKENDS else step


def _describe(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback) of an exception, always picklable."""
    return (type(exc).__name__, str(exc),
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def _prune_stale_tmp() -> None:
    """Remove world temp folders whose parent process is gone (killed before close)."""
    for p in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        try:
            pid = int(p.name[len(TMP_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class SpawnedWorld:
    """R worker processes on loopback forming one gloo group, reusable for many steps.

    Use as a context manager; children are joined (or terminated, then killed) on exit,
    and the world closes itself after any failed step (its group is then broken).
    `threads`: torch intra-op threads per child (default: the caller's count, because
    the reference stages are not bit-identical across thread counts at demo sizes;
    benchmarks pass cores // ranks).
    """

    name = "gloo"

    def __init__(self, ranks: int, *, timeout: float = 60.0,
                 threads: int | None = None) -> None:
        if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
            raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.ranks = ranks
        self.timeout = check_timeout(timeout)
        self.threads = threads or torch.get_num_threads()
        self.procs: list[Any] = []
        self._jobs: list[Any] = []
        self._results: Any = None
        self._next_job = 0
        self._tmpdir: str | None = None
        self._old_sigterm: Any = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the children (for leak checks)."""
        return [p.pid for p in self.procs]

    @property
    def tmpdir(self) -> str | None:
        """The world's private temp folder (removed by `close`)."""
        return self._tmpdir

    def __enter__(self) -> SpawnedWorld:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Spawn the children and wait until every rank joined the group."""
        import torch.multiprocessing as tmp
        _prune_stale_tmp()
        self._tmpdir = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
        ctx = tmp.get_context("spawn")
        self._results = ctx.Queue()
        port = free_port()
        try:
            # children start with SIGINT ignored (inherited through exec), so a Ctrl-C
            # while they import torch prints nothing there
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                for r in range(self.ranks):
                    jq = ctx.Queue()
                    p = ctx.Process(target=_worker, name=f"moe-ep-rank{r}", daemon=True,
                                    args=(r, self.ranks, port, self.timeout, self.threads,
                                          os.getpid(), self._tmpdir, jq, self._results))
                    p.start()
                    self.procs.append(p)
                    self._jobs.append(jq)
            finally:
                if main:
                    signal.signal(signal.SIGINT, old_int)
            self._collect(-1, deadline=time.monotonic() + self.timeout + STARTUP_GRACE_S)
        except BaseException:
            self.close(polite=False)
            raise

    def run(self, step: EpStep) -> list[RankOutput]:
        """One EP step on the children; every rank's output in rank order."""
        validate_step(step, self.timeout)
        if step.run.ranks != self.ranks:
            raise ValueError(f"run.ranks {step.run.ranks} must equal the world's ranks "
                             f"{self.ranks}")
        return self._submit(_Job(self._next_job, step=_portable(step)), keep_on_capacity=True)

    def call(self, fn: Any, *args: Any) -> list[Any]:
        """Run ``fn(rank, *args)`` on every rank (inside the process group, e.g. for
        benchmarks); return the per-rank results in rank order."""
        return self._submit(_Job(self._next_job, fn=fn, args=args))

    def _submit(self, job: _Job, keep_on_capacity: bool = False) -> list[Any]:
        if not self.procs:
            raise RuntimeError("SpawnedWorld is not running (closed after a failure?); "
                               "create a new one")
        self._next_job += 1
        try:
            for jq in self._jobs:
                jq.put(job)
            got = self._collect(job.job_id, deadline=None)
        except CapacityError:
            if not keep_on_capacity:
                self.close(polite=False)
            raise  # every rank raised it from the same count table: the group is intact
        except BaseException:
            self.close(polite=False)
            raise
        return [got[r] for r in range(self.ranks)]

    def _collect(self, job_id: int, deadline: float | None) -> dict[int, Any]:
        """Wait for one message per rank about `job_id`; raise on the first failure
        (after a short grace to gather the other ranks' reports)."""
        got: dict[int, Any] = {}
        errors: dict[int, tuple[str, str, str]] = {}
        error_deadline: float | None = None
        while len(got) + len(errors) < self.ranks:
            now = time.monotonic()
            if error_deadline is not None and now > error_deadline:
                break
            if deadline is not None and now > deadline:
                late = sorted(set(range(self.ranks)) - set(got))
                errors.setdefault(-1, ("TimeoutError", f"ranks {late} did not report in time",
                                       ""))
                break
            try:
                rank, jid, kind, payload = self._results.get(timeout=0.1)
            except queue.Empty:
                for r, p in enumerate(self.procs):
                    if p.exitcode is not None and r not in got and r not in errors:
                        errors[r] = ("ProcessDied", f"rank {r} process exited with code "
                                     f"{p.exitcode}", "")
                if errors and error_deadline is None:
                    error_deadline = time.monotonic() + ERROR_GRACE_S
                continue
            if jid != job_id:
                continue
            if kind == "error":
                errors[rank] = payload
                if error_deadline is None:
                    error_deadline = time.monotonic() + ERROR_GRACE_S
            else:
                got[rank] = payload
        if errors:
            raise _combined_error(errors, set(range(self.ranks)) - set(got) - set(errors),
                                  self.timeout)
        return got

    def close(self, polite: bool = True) -> None:
        """Stop every child: ask politely (unless the group is broken), then terminate,
        then kill; always join, so no process outlives the world; remove the temp folder."""
        if polite:
            for jq in self._jobs:
                try:
                    jq.put(None)
                except Exception:  # noqa: BLE001
                    pass
            deadline = time.monotonic() + JOIN_S
            for p in self.procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=JOIN_S)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs, self._jobs = [], []
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None


def _combined_error(errors: dict[int, tuple[str, str, str]], silent: set[int],
                    timeout: float) -> Exception:
    """One exception for a failed step: the capacity error as itself, else DistError."""
    for name, msg, _ in errors.values():
        if name == CapacityError.__name__:
            return CapacityError(msg)
    lines = [f"rank {r}: {name}: {msg.strip().splitlines()[0] if msg.strip() else ''}"
             for r, (name, msg, _) in sorted(errors.items())]
    if silent:
        lines.append(f"ranks {sorted(silent)} never reported (hung or killed)")
    text = "; ".join(lines)
    is_timeout = any(("timed out" in m.lower() or "timeout" in m.lower()
                      or n in ("ProcessDied", "TimeoutError")) for n, m, _ in errors.values())
    detail = next((tb for _, _, tb in errors.values() if tb), "")
    cls = DistTimeoutError if is_timeout or silent else DistError
    head = (f"EP run over torch.distributed failed (process-group timeout {timeout:g} s): "
            if cls is DistTimeoutError else "EP run over torch.distributed failed: ")
    return cls(head + text + (f"\nfirst traceback:\n{detail}" if detail else ""))


__all__ = ["SpawnedWorld", "free_port"]
