"""The rank side of the torch.distributed transports, and the torchrun transport.

`RankSession` is what one rank process does in a process group: it owns its `EpBuffer`
(sized from the run's shape, re-made only when the shape changes) and runs `EpStep`s
through the rank program. Spawned worlds (ep.procs) and torchrun both use it.

`TorchrunTransport` runs this process's rank under ``torchrun --nproc-per-node R``
(RANK / WORLD_SIZE / MASTER_* set) and gathers every rank's output on rank 0. It takes
the device's collectives when a device is present (`default_dist_backend`): "nccl" with
CUDA, "hccl" with torch_npu on Ascend, through the same code path with the exchange
buffers on the device: UNTESTED on this machine (no GPU/NPU); "gloo" is tested here.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ..backend import StageBackend
from ..config import ConfigError, RunConfig
from ..fixtures import Inputs, Weights
from ..layer import LayerResult
from .buffer import EpBuffer
from .rank import RankOutput, assemble, run_to_end, step_program
from .transport import (
    DIST_BACKENDS,
    EpStep,
    backend_for,
    check_timeout,
    validate_step,
    window_shape,
)

#: Environment variables torchrun sets and this transport needs.
TORCHRUN_ENV: tuple[str, ...] = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistError(RuntimeError):
    """A rank of a torch.distributed EP run failed; the message names the rank(s)."""


class DistTimeoutError(DistError, TimeoutError):
    """A peer died or never arrived within the process-group timeout."""


class RankSession:
    """This process's rank of an initialised process group: its buffer and its steps."""

    def __init__(self, rank: int, *, device: str | torch.device = "cpu",
                 group: Any = None) -> None:
        self.rank = rank
        self.device = torch.device(device)
        self.group = group
        self.buffer: EpBuffer | None = None

    def buffer_for(self, step: EpStep) -> EpBuffer:
        """The exchange buffer of the step's shape (allocated up front, then reused)."""
        shape = window_shape(step.run)
        if self.buffer is None or self.buffer.shape != shape:
            self.buffer = None  # free the old one before allocating
            self.buffer = EpBuffer(self.rank, shape, group=self.group, device=self.device)
        return self.buffer

    def run(self, step: EpStep, backend: StageBackend | None = None) -> RankOutput:
        """One EP step of this rank (blocking collectives)."""
        buf = self.buffer_for(step)
        if step.poison:
            buf.poison()
        be = backend or backend_for(step.backend, self.rank, step.run.ranks)
        return run_to_end(step_program(step, self.rank, be, buf))


def default_dist_backend() -> str:
    """The collective backend for this machine: nccl with CUDA, hccl with an Ascend NPU
    (torch_npu importable and a device present), else gloo. Only gloo is tested here."""
    if torch.cuda.is_available():
        return "nccl"                                   # UNTESTED here
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return "gloo"
    return "hccl" if torch.npu.is_available() else "gloo"   # UNTESTED here


def device_for(dist_backend: str, local_rank: int = 0) -> str:
    """The tensor device a backend needs: nccl -> cuda:LOCAL_RANK, hccl -> npu:LOCAL_RANK
    (UNTESTED here), gloo -> cpu."""
    if dist_backend not in DIST_BACKENDS:
        raise ConfigError(f"dist_backend must be one of {list(DIST_BACKENDS)}, "
                          f"got {dist_backend!r}")
    if dist_backend == "nccl":
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    if dist_backend == "hccl":
        import torch_npu  # noqa: F401  (registers the npu device; untested here)
        torch.npu.set_device(local_rank)
        return f"npu:{local_rank}"
    return "cpu"


class TorchrunTransport:
    """This process is one rank under torchrun; rank 0 gets every rank's output.

    Every rank must pass the same step (deterministic fixtures). A peer that dies or
    never arrives fails the step within `timeout` seconds (the process-group timeout).
    """

    name = "torchrun"

    def __init__(self, *, timeout: float = 60.0, dist_backend: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        """dist_backend: "gloo", "nccl" or "hccl"; None picks `default_dist_backend()`."""
        self.timeout = check_timeout(timeout)
        dist_backend = dist_backend or default_dist_backend()
        env = os.environ if env is None else env
        missing = [k for k in TORCHRUN_ENV if k not in env]
        if missing:
            raise ConfigError(f"the torchrun transport needs the torchrun environment; "
                              f"missing {missing}. Launch with: torchrun --nproc-per-node "
                              f"R -m moe_kernels layer --ranks R --transport gloo ...")
        if dist_backend not in DIST_BACKENDS:
            raise ConfigError(f"dist_backend must be one of {list(DIST_BACKENDS)}, "
                              f"got {dist_backend!r}")
        self.dist_backend = dist_backend
        self.rank, self.world = int(env["RANK"]), int(env["WORLD_SIZE"])
        self.local_rank = int(env.get("LOCAL_RANK", "0"))

    def check_world(self, ranks: int) -> None:
        """ConfigError unless the torchrun world has exactly `ranks` processes."""
        if self.world != ranks:
            raise ConfigError(f"torchrun world size {self.world} must equal ranks "
                              f"{ranks}; use torchrun --nproc-per-node {ranks} ... "
                              f"--ranks {ranks}")

    def run(self, step: EpStep) -> list[RankOutput] | None:
        self.check_world(step.run.ranks)
        device = device_for(self.dist_backend, self.local_rank)
        dist.init_process_group(self.dist_backend, rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=self.timeout))
        try:
            out = RankSession(self.rank, device=device).run(step)
            gathered: list[Any] | None = [None] * self.world if self.rank == 0 else None
            dist.gather_object(out, gathered, dst=0)
            return gathered if self.rank == 0 else None
        finally:
            dist.destroy_process_group()


def run_under_torchrun(run: RunConfig, inputs: Inputs, weights: Weights, *,
                       backend: Any = "torch", poison: bool = False,
                       overflow: str = "error", timeout: float = 60.0,
                       dist_backend: str | None = None) -> LayerResult | None:
    """One EP step under torchrun: the LayerResult on rank 0, None on the other ranks."""
    step = EpStep(run=run, inputs=inputs, weights=weights, backend=backend,
                  overflow=overflow, poison=poison)
    validate_step(step, timeout)
    transport = TorchrunTransport(timeout=timeout, dist_backend=dist_backend)
    transport.check_world(run.ranks)
    outputs = transport.run(step)
    return None if outputs is None else assemble(run, outputs)


__all__ = ["DistError", "DistTimeoutError", "RankSession", "TorchrunTransport",
           "default_dist_backend", "device_for", "run_under_torchrun"]
