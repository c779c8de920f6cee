"""The `gloo` transport: one OS process per rank with torch.distributed.

The exchange is three collectives per step, each over contiguous buffers ordered by
destination (no per-route messages):

1. counts: one all_gather of every rank's full [R(dst),NL] histogram (zeros included),
   so every rank holds the same count table [R(src),R(dst),NL] and plans its slots;
2. dispatch: one all_to_all_single of packed byte rows [x_i8 | scale | weight | r_route]
   (wire.pack_dispatch), sent in (dst, e, slot) order; the receiver writes them into
   its receive buffers at rows e·C + slot (plan.recv_rows);
3. combine: one all_to_all_single back of [y BF16 | r_route], and the origin scatters
   the rows into routed_y_buf keyed by r_route (backend.scatter_routes).

Two launchers: `SpawnedWorld` (from Python: R spawned processes on loopback with a free
port, reusable for many steps, results gathered back to the caller) and
`run_under_torchrun` (under ``torchrun --nproc-per-node R``). Peers that die or never
arrive fail the run within the process-group timeout; children are always joined or
killed in `finally`. Only the gloo backend is exercised here; "nccl" / "hccl" take the
same code path with device tensors (UNTESTED on this machine: no GPU/NPU).
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..backend import PackedRoutes, StageBackend
from ..config import RunConfig
from ..fixtures import Inputs, Weights
from ..layer import LayerResult
from ..reference.dispatch_combine import RecvBuffers
from .layout import CapacityOverflowError, RankPlan
from .rank import RankOutput, run_to_end
from .windows import Wait, WindowShape
from .wire import ROUTE_TAG_COLS, pack_dispatch, unpack_combine, unpack_dispatch

#: torch.distributed backends this code accepts (only gloo is tested here).
DIST_BACKENDS: tuple[str, ...] = ("gloo", "nccl", "hccl")
#: Fault kinds a test can inject into one rank of a SpawnedWorld job.
FAULT_KINDS: tuple[str, ...] = ("hang", "exit")
#: Seconds a spawned child may take to start Python and import torch, on top of the
#: rendezvous timeout (2 slow cores shared by several engineers).
STARTUP_GRACE_S = 60.0
#: Seconds to wait for the other ranks' error reports once one rank has failed (healthy
#: peers hit the same process-group timeout at about the same moment).
ERROR_GRACE_S = 2.0
#: Seconds a child gets to exit cleanly before it is terminated, then killed.
JOIN_S = 3.0


class DistError(RuntimeError):
    """A rank of a torch.distributed EP run failed; the message names the rank(s)."""


class DistTimeoutError(DistError, TimeoutError):
    """A peer died or never arrived within the process-group timeout."""


class DistComm:
    """One rank's end of the torch.distributed exchange (implements `RankComm`)."""

    def __init__(self, rank: int, shape: WindowShape, backend: StageBackend,
                 poison: bool = False, device: str | torch.device = "cpu") -> None:
        self.rank = rank
        self.ranks = shape.ranks
        self.shape = shape
        self.backend = backend
        self.poison = poison
        self.device = torch.device(device)
        self._parts: list[torch.Tensor] = []
        self._counts_work: Any = None

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device.type == "cpu" else t.to(self.device)  # nccl/hccl: untested

    def _a2a(self, send: torch.Tensor, out_rows: int, in_split: list[int],
             out_split: list[int]) -> torch.Tensor:
        recv = self._dev(torch.empty(out_rows, *send.shape[1:], dtype=send.dtype))
        dist.all_to_all_single(recv, self._dev(send.contiguous()), out_split, in_split)
        return recv.cpu()

    def publish_counts(self, hist: torch.Tensor) -> None:
        self._parts = [self._dev(torch.empty_like(hist)) for _ in range(self.ranks)]
        self._counts_work = dist.all_gather(self._parts, self._dev(hist.contiguous()),
                                            async_op=True)

    def collect_counts(self) -> Generator[Wait, None, torch.Tensor]:
        if self._counts_work is None:
            raise RuntimeError("collect_counts called before publish_counts")
        self._counts_work.wait()
        self._counts_work = None
        return torch.stack([p.cpu() for p in self._parts])
        yield  # pragma: no cover  (a generator that never suspends)

    def dispatch(self, plan: RankPlan, packed: PackedRoutes
                 ) -> Generator[Wait, None, RecvBuffers]:
        s = self.shape
        recv = self._a2a(pack_dispatch(packed), int(plan.recv_split.sum()),
                         plan.send_split.tolist(), plan.recv_split.tolist())
        _, scale, weight, route = unpack_dispatch(recv[:, s.d_model:], 0)
        buf = _recv_buffers(s.n_local, s.capacity, s.d_model, self.poison)
        x_bytes = buf.x.view(torch.uint8)
        for pos, e, off, n in plan.recv_segments():   # one block copy per (src, e)
            x_bytes[e, off:off + n].copy_(recv[pos:pos + n, :s.d_model])
        rows = plan.recv_rows                           # flat e·C + slot, arrival order
        buf.scale.view(-1)[rows] = scale
        buf.weight.view(-1)[rows] = weight
        buf.route.view(-1)[rows] = route
        return buf._replace(count=plan.recv_count.clone())
        yield  # pragma: no cover

    def combine(self, plan: RankPlan, recv_y: torch.Tensor, recv_route: torch.Tensor
                ) -> Generator[Wait, None, torch.Tensor]:
        d = recv_y.shape[-1]
        wire = torch.empty(int(plan.recv_split.sum()), d + ROUTE_TAG_COLS,
                           dtype=torch.bfloat16)
        for pos, e, off, n in plan.recv_segments():   # rows back in arrival order
            wire[pos:pos + n, :d].copy_(recv_y[e, off:off + n])
        rr = recv_route.reshape(-1)[plan.recv_rows].to(torch.int32)
        wire[:, d:] = rr.reshape(-1, 1).view(torch.bfloat16)
        back = self._a2a(wire, int(plan.send_split.sum()), plan.recv_split.tolist(),
                         plan.send_split.tolist())
        rows, routes = unpack_combine(back)
        if plan.dropped_routes.numel():  # dropped routes contribute zero
            rows = torch.cat([rows, torch.zeros(plan.dropped_routes.numel(), d,
                                                dtype=rows.dtype)])
            routes = torch.cat([routes, plan.dropped_routes])
        return scatter_by_route(rows, routes, self.shape.routes)
        yield  # pragma: no cover


def scatter_by_route(rows: torch.Tensor, routes: torch.Tensor, n_routes: int) -> torch.Tensor:
    """routed_y_buf [n_routes, D]: row r <- the returned row tagged r. Every route must
    come back exactly once (checked); done as one gather by the inverse permutation,
    which is several times faster on CPU than an indexed scatter."""
    seen = torch.bincount(routes, minlength=n_routes) if routes.numel() else \
        torch.zeros(n_routes, dtype=torch.int64)
    if routes.numel() != n_routes or not bool((seen == 1).all()):
        bad = torch.nonzero(seen != 1).flatten()[:5].tolist()
        raise RuntimeError(f"combine: routes {bad} came back {seen[bad].tolist()} times; "
                           f"every route must be returned exactly once")
    return torch.index_select(rows, 0, torch.argsort(routes))


def _recv_buffers(n_local: int, capacity: int, d: int, poison: bool) -> RecvBuffers:
    """Receive buffers [NL, C, ...]; slots beyond the counts are never read, so they are
    left uninitialised, or filled with garbage when poisoned."""
    if not poison:
        return RecvBuffers(x=torch.empty(n_local, capacity, d, dtype=torch.int8),
                           scale=torch.empty(n_local, capacity),
                           weight=torch.empty(n_local, capacity),
                           route=torch.empty(n_local, capacity, dtype=torch.int32),
                           count=torch.zeros(n_local, dtype=torch.int64))
    g = torch.Generator().manual_seed(0xBAD)
    shape = (n_local, capacity)
    return RecvBuffers(
        x=torch.randint(-128, 128, (*shape, d), generator=g, dtype=torch.int8),
        scale=torch.full(shape, float("nan")), weight=torch.full(shape, 3e38),
        route=torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int32),
        count=torch.zeros(n_local, dtype=torch.int64))


def run_rank(rank: int, run: RunConfig, inputs: Inputs, weights: Weights,
             backend: str | StageBackend, poison: bool, overflow: str,
             device: str | torch.device = "cpu") -> RankOutput:
    """This process's rank of one EP step; the process group must be initialised."""
    from .program import make_rank_program, resolve_backend, window_shape
    be = resolve_backend(backend)
    comm = DistComm(rank, window_shape(run), be, poison=poison, device=device)
    return run_to_end(make_rank_program(run, inputs, weights, be, overflow, rank, comm))


# ----------------------------------------------------------------------------- torchrun
def run_under_torchrun(run: RunConfig, inputs: Inputs, weights: Weights, *,
                       backend: str | StageBackend = "torch", poison: bool = False,
                       overflow: str = "error", timeout: float = 60.0,
                       dist_backend: str = "gloo") -> LayerResult | None:
    """One rank of an EP step under torchrun (RANK / WORLD_SIZE / MASTER_* set).

    Every rank passes the same run, inputs and weights (deterministic fixtures). Returns
    the gathered LayerResult on rank 0 and None elsewhere. A peer that dies or never
    arrives raises within `timeout` seconds (process-group timeout).
    """
    from .program import assemble, validate
    validate(run, inputs, weights, overflow, timeout)
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise RuntimeError(f"run_under_torchrun needs the torchrun environment; missing "
                           f"{missing}. Launch with: torchrun --nproc-per-node "
                           f"{run.ranks} -m moe_kernels layer --transport gloo ...")
    if dist_backend not in DIST_BACKENDS:
        raise ValueError(f"dist_backend must be one of {list(DIST_BACKENDS)}, "
                         f"got {dist_backend!r}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != run.ranks:
        raise ValueError(f"torchrun world size {world} must equal ranks {run.ranks}; "
                         f"use --nproc-per-node {run.ranks}")
    device = _device_for(dist_backend)
    dist.init_process_group(dist_backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        out = run_rank(rank, run, inputs, weights, backend, poison, overflow, device)
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(out, gathered, dst=0)
        return assemble(run, gathered) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _device_for(dist_backend: str) -> str:
    """The tensor device a backend needs (nccl -> cuda:LOCAL_RANK, hccl -> npu; untested)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist_backend == "nccl":
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    if dist_backend == "hccl":
        import torch_npu  # noqa: F401  (registers the npu device; untested here)
        torch.npu.set_device(local)
        return f"npu:{local}"
    return "cpu"


# ------------------------------------------------------------------------ spawned world
def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class _Job:
    job_id: int
    run: RunConfig
    inputs: Inputs
    weights: Weights
    backend: Any
    poison: bool
    overflow: str
    fault: tuple[int, str] | None


@dataclass(frozen=True)
class _Call:
    job_id: int
    fn: Any        # a module-level function fn(rank, *args), importable in the child
    args: tuple


def _worker(rank: int, ranks: int, port: int, timeout: float, dist_backend: str,
            threads: int, jobs: Any, results: Any) -> None:
    """Child process: join the group, then run jobs until told to stop."""
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=ranks,
                                timeout=datetime.timedelta(seconds=timeout))
    except BaseException as exc:  # noqa: BLE001  (reported to the parent)
        results.put((rank, -1, "error", _describe(exc)))
        return
    results.put((rank, -1, "ready", None))
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            if isinstance(job, _Call):
                try:
                    results.put((rank, job.job_id, "ok", job.fn(rank, *job.args)))
                except BaseException as exc:  # noqa: BLE001
                    results.put((rank, job.job_id, "error", _describe(exc)))
                continue
            try:
                if job.fault is not None and job.fault[0] == rank:
                    if job.fault[1] == "exit":
                        os._exit(3)
                    time.sleep(10 ** 6)  # "hang": never arrive (the parent kills us)
                out = run_rank(rank, job.run, job.inputs, job.weights, job.backend,
                               job.poison, job.overflow)
                results.put((rank, job.job_id, "ok", out))
            except BaseException as exc:  # noqa: BLE001
                results.put((rank, job.job_id, "error", _describe(exc)))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  (a broken group may not tear down cleanly)
            pass


def _portable_backend(backend: str | StageBackend) -> str | StageBackend:
    """A named backend travels to the children as its name (they build their own);
    other objects must be picklable."""
    from ..backend import BACKENDS
    name = backend if isinstance(backend, str) else getattr(backend, "name", None)
    return name if name in BACKENDS else backend


def _describe(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback) of an exception, always picklable."""
    return (type(exc).__name__, str(exc),
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class SpawnedWorld:
    """R worker processes on loopback forming one gloo group, reusable for many steps.

    Use as a context manager; children are joined (or terminated, then killed) on exit,
    and the world closes itself after any failed step (its group is then broken).
    """

    def __init__(self, ranks: int, *, timeout: float = 60.0,
                 dist_backend: str = "gloo", threads: int | None = None) -> None:
        """`threads`: torch intra-op threads per child (default: the caller's)."""
        if not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if dist_backend != "gloo":
            raise ValueError(f"SpawnedWorld runs CPU processes: dist_backend must be "
                             f"'gloo', got {dist_backend!r} (use torchrun for "
                             f"{[b for b in DIST_BACKENDS if b != 'gloo']})")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.ranks = ranks
        self.timeout = float(timeout)
        # Default: the caller's intra-op thread count. The torch reference stages are
        # not bit-identical across thread counts at demo sizes (hc_pre's FP32 matmul
        # changes its summation order), so children match the caller's process.
        # Benchmarks pass threads = cores // ranks: oversubscribed threads on shared
        # cores make small copies orders of magnitude slower.
        self.threads = threads or torch.get_num_threads()
        self.dist_backend = dist_backend
        self.procs: list[Any] = []
        self._jobs: list[Any] = []
        self._results: Any = None
        self._next_job = 0

    @property
    def pids(self) -> list[int]:
        """Process ids of the children (for leak checks)."""
        return [p.pid for p in self.procs]

    def __enter__(self) -> SpawnedWorld:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Spawn the children and wait until every rank joined the group."""
        import torch.multiprocessing as tmp
        ctx = tmp.get_context("spawn")
        self._results = ctx.Queue()
        port = free_port()
        try:
            for r in range(self.ranks):
                jq = ctx.Queue()
                p = ctx.Process(target=_worker, name=f"moe-ep-rank{r}", daemon=True,
                                args=(r, self.ranks, port, self.timeout, self.dist_backend,
                                      self.threads, jq, self._results))
                p.start()
                self.procs.append(p)
                self._jobs.append(jq)
            self._collect(-1, deadline=time.monotonic() + self.timeout + STARTUP_GRACE_S)
        except BaseException:
            self.close(polite=False)
            raise

    def run_layer(self, run: RunConfig, inputs: Inputs, weights: Weights, *,
                  backend: str | StageBackend = "torch", poison: bool = False,
                  overflow: str = "error", fault: tuple[int, str] | None = None
                  ) -> LayerResult:
        """One EP step on the children; `fault=(rank, "hang"|"exit")` injects a fault."""
        from .program import assemble, validate
        validate(run, inputs, weights, overflow, self.timeout)
        if not self.procs:
            raise RuntimeError("SpawnedWorld is not running (closed after a failure?); "
                               "create a new one")
        if run.ranks != self.ranks:
            raise ValueError(f"run.ranks {run.ranks} must equal the world's ranks "
                             f"{self.ranks}")
        if fault is not None and (fault[1] not in FAULT_KINDS
                                  or not 0 <= fault[0] < self.ranks):
            raise ValueError(f"fault must be (rank in [0,{self.ranks}), one of "
                             f"{list(FAULT_KINDS)}), got {fault!r}")
        job = _Job(self._next_job, run, inputs, weights, _portable_backend(backend), poison,
                   overflow, fault)
        self._next_job += 1
        try:
            for jq in self._jobs:
                jq.put(job)
            outs = self._collect(job.job_id, deadline=None)
        except CapacityOverflowError:
            raise  # every rank raised it from the same count table: the group is intact
        except BaseException:
            self.close(polite=False)
            raise
        return assemble(run, [outs[r] for r in range(self.ranks)])

    def call(self, fn: Any, *args: Any) -> list[Any]:
        """Run ``fn(rank, *args)`` on every rank (inside the process group, e.g. for
        benchmarks); return the per-rank results in rank order."""
        if not self.procs:
            raise RuntimeError("SpawnedWorld is not running; create a new one")
        job = _Call(self._next_job, fn, args)
        self._next_job += 1
        try:
            for jq in self._jobs:
                jq.put(job)
            got = self._collect(job.job_id, deadline=None)
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
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs)
                        if p.exitcode is not None and r not in got and r not in errors]
                for r, code in dead:
                    errors[r] = ("ProcessDied", f"rank {r} process exited with code "
                                 f"{code}", "")
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
        then kill; always join, so no process outlives the world."""
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


def _combined_error(errors: dict[int, tuple[str, str, str]], silent: set[int],
                    timeout: float) -> Exception:
    """One exception for a failed step: the capacity error as itself, else DistError."""
    for name, msg, _ in errors.values():
        if name == CapacityOverflowError.__name__:
            return CapacityOverflowError(msg)
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


__all__ = ["DIST_BACKENDS", "DistComm", "DistError", "DistTimeoutError", "SpawnedWorld",
           "free_port", "run_rank", "run_under_torchrun"]
