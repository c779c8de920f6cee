"""The `gloo` transport: one OS process per rank with torch.distributed.

The exchange is three collectives per step, each over contiguous buffers ordered by
destination (no per-route messages):

1. counts: one all_gather of every rank's full [R(dst),NL] histogram (zeros included),
   so every rank holds the same count table [R(src),R(dst),NL] and plans its slots;
2. dispatch: one all_to_all_single of packed byte rows [x_i8 | scale | weight | r_route]
   (wire.pack_dispatch_into), sent in (dst, e, slot) order; the receiver copies them
   into its receive buffers at rows e·C + slot (one block copy per (src, e) for x_i8,
   one indexed write per scalar channel);
3. combine: one all_to_all_single back of bare BF16 rows in arrival order, so every
   origin gets its rows back in its own send order (plan.order) and places them into
   routed_y_buf with one gather; r_route does not travel twice.

Wire and receive buffers are preallocated once per process and shape and reused by every
step (fresh multi-MB buffers per step cost more in page faults than the copies).

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

from ..backend import StageBackend
from ..config import RunConfig
from ..fixtures import Inputs, Weights
from ..layer import LayerResult
from ..types import CapacityError, PackedRoutes, RecvBuffers
from .layout import RankPlan
from .rank import RankOutput, run_to_end
from .windows import Wait, WindowShape
from .wire import check_wire_width, dispatch_row_bytes, pack_dispatch_into, unpack_dispatch

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
#: Seed of the garbage a poisoned run writes into the receive buffers.
POISON_SEED = 0xBAD


class DistError(RuntimeError):
    """A rank of a torch.distributed EP run failed; the message names the rank(s)."""


class DistTimeoutError(DistError, TimeoutError):
    """A peer died or never arrived within the process-group timeout."""


class DistComm:
    """One rank's end of the torch.distributed exchange (implements `RankComm`).

    Buffers come from a per-process pool (`_ExchangeBuffers`): the RecvBuffers that
    `dispatch` returns are views into it, valid until this process's next dispatch of
    the same shape (the rank program consumes them within the step).
    """

    def __init__(self, rank: int, shape: WindowShape, backend: StageBackend,
                 poison: bool = False, device: str | torch.device = "cpu") -> None:
        check_wire_width(shape.d_model)
        self.rank = rank
        self.ranks = shape.ranks
        self.shape = shape
        self.backend = backend
        self.poison = poison
        self.device = torch.device(device)
        self.buf = _buffers(rank, shape)
        if poison:
            self.buf.poison(POISON_SEED)
        self._parts = [torch.empty(shape.ranks, shape.n_local, dtype=torch.int64)
                       for _ in range(shape.ranks)]
        self._counts_work: Any = None

    def _a2a(self, recv: torch.Tensor, send: torch.Tensor, out_split: list[int],
             in_split: list[int]) -> torch.Tensor:
        """all_to_all_single into `recv` (on CPU, in place: no copies)."""
        if self.device.type == "cpu":
            dist.all_to_all_single(recv, send, out_split, in_split)
            return recv
        out = recv.to(self.device)  # nccl/hccl: UNTESTED
        dist.all_to_all_single(out, send.to(self.device), out_split, in_split)
        return out.cpu()

    def publish_counts(self, hist: torch.Tensor) -> None:
        parts = self._parts if self.device.type == "cpu" else \
            [p.to(self.device) for p in self._parts]
        self._parts = parts
        self._counts_work = dist.all_gather(parts, hist.to(self.device, torch.int64)
                                            .contiguous(), async_op=True)

    def collect_counts(self) -> Generator[Wait, None, torch.Tensor]:
        if self._counts_work is None:
            raise RuntimeError("collect_counts called before publish_counts")
        self._counts_work.wait()
        self._counts_work = None
        return torch.stack([p.cpu() for p in self._parts])   # a fresh table (kept)
        yield  # pragma: no cover  (a generator that never suspends)

    def dispatch(self, plan: RankPlan, packed: PackedRoutes
                 ) -> Generator[Wait, None, RecvBuffers]:
        s, b = self.shape, self.buf
        send = pack_dispatch_into(b.send, packed)
        recv = self._a2a(b.recv[:int(plan.recv_split.sum())], send,
                         plan.recv_split.tolist(), plan.send_split.tolist())
        x, scale, weight, route = unpack_dispatch(recv, s.d_model)
        c = s.capacity
        x_rows = b.x.view(-1, s.d_model)
        for pos, e, off, n in plan.recv_segments():   # one block copy per (src, e)
            x_rows[e * c + off:e * c + off + n].copy_(x[pos:pos + n])
        rows = plan.recv_rows                           # flat e·C + slot, arrival order
        b.scale.view(-1)[rows] = scale
        b.weight.view(-1)[rows] = weight
        b.route.view(-1)[rows] = route
        return RecvBuffers(x=b.x, scale=b.scale, weight=b.weight, route=b.route,
                           count=plan.recv_count.clone())
        yield  # pragma: no cover

    def combine(self, plan: RankPlan, recv_y: torch.Tensor, recv_route: torch.Tensor
                ) -> Generator[Wait, None, torch.Tensor]:
        """Rows go back in arrival order, so each source gets its rows in the order it
        sent them, `plan.order`: that order keys routed_y_buf, and `recv_route` need
        not travel again (it is the same information)."""
        b, d = self.buf, recv_y.shape[-1]
        if recv_y.dtype != b.y_send.dtype:
            raise TypeError(f"combine sends BF16 rows, got {recv_y.dtype}")
        n_in, n_out = int(plan.recv_split.sum()), int(plan.send_split.sum())
        send = torch.index_select(recv_y.reshape(-1, d), 0, plan.recv_rows,
                                  out=b.y_send[:n_in])
        self._a2a(b.y_back[:n_out], send, plan.send_split.tolist(),
                  plan.recv_split.tolist())
        return torch.index_select(b.y_back, 0, return_index(plan, self.shape.routes))
        yield  # pragma: no cover


def return_index(plan: RankPlan, n_routes: int) -> torch.Tensor:
    """[n_routes] row of the combine's receive buffer holding each route: route
    plan.order[i] comes back in row i; dropped routes read row `n_routes` (zero)."""
    if plan.order.numel() + plan.dropped_routes.numel() != n_routes:
        raise RuntimeError(f"combine: {plan.order.numel()} placed + "
                           f"{plan.dropped_routes.numel()} dropped routes != {n_routes}")
    index = torch.full((n_routes,), n_routes, dtype=torch.int64)
    index[plan.order] = torch.arange(plan.order.numel())
    return index


class _ExchangeBuffers:
    """Wire and receive buffers one process reuses across the steps of one shape.

    Fresh multi-megabyte buffers every step cost page faults (on 2 shared cores, more
    than the copies themselves), so a DistComm takes them from a per-process pool.
    Nothing read by a step depends on what they held before it: only rows below the
    counts are read, every one of them written in the same step (poison tests check).
    """

    def __init__(self, shape: WindowShape) -> None:
        nl, c, d, routes = shape.n_local, shape.capacity, shape.d_model, shape.routes
        max_in = min(shape.ranks * routes, nl * c)      # rows one rank can receive
        width = dispatch_row_bytes(d)
        self.send = torch.zeros(routes, width, dtype=torch.uint8)   # pad words stay 0
        self.recv = torch.zeros(max_in, width, dtype=torch.uint8)
        self.x = torch.empty(nl, c, d, dtype=torch.int8)
        self.scale = torch.empty(nl, c)
        self.weight = torch.empty(nl, c)
        self.route = torch.empty(nl, c, dtype=torch.int32)
        self.y_send = torch.empty(max_in, d, dtype=torch.bfloat16)
        # rows back in send order; row `routes` stays zero (the row of a dropped route)
        self.y_back = torch.zeros(routes + 1, d, dtype=torch.bfloat16)

    def poison(self, seed: int) -> None:
        """Fill every buffer except the zero row with garbage (test support)."""
        g = torch.Generator().manual_seed(seed)
        for t in (self.recv, self.x, self.route):   # (send rows are all rewritten)
            info = torch.iinfo(t.dtype)
            t.copy_(torch.randint(info.min, info.max, t.shape, generator=g, dtype=t.dtype))
        self.scale.fill_(float("nan"))
        self.weight.fill_(3e38)
        self.y_send.copy_(torch.randn(self.y_send.shape, generator=g) * 3e38)
        self.y_back[:-1].copy_(torch.randn(self.y_back[:-1].shape, generator=g) * 3e38)


#: Per-process pool of exchange buffers, keyed by (rank, shape); bounded, since a
#: process runs one rank of one shape at a time (a few shapes in tests).
_POOL: dict[tuple[int, WindowShape], _ExchangeBuffers] = {}
_POOL_MAX = 4


def _buffers(rank: int, shape: WindowShape) -> _ExchangeBuffers:
    key = (rank, shape)
    buf = _POOL.get(key)
    if buf is None:
        if len(_POOL) >= _POOL_MAX:
            _POOL.clear()
        buf = _POOL[key] = _ExchangeBuffers(shape)
    return buf


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
        except CapacityError:
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


__all__ = ["DIST_BACKENDS", "DistComm", "DistError", "DistTimeoutError", "SpawnedWorld",
           "free_port", "run_rank", "run_under_torchrun"]
