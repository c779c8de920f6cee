"""The transport interface of the EP program: what one step is, who moves its bytes.

Two levels, both strategies the program does not look inside (spec §3):

* `Transport.run(step)`: runs every rank's program of one `EpStep` and hands back the
  per-rank outputs. `local` (ep.local: all ranks in this process), `gloo` (ep.procs:
  one spawned process per rank) and torchrun (ep.dist: this process is one rank) all
  implement this one method, so `run_ep_layer` treats them alike.
* `RankComm`: one rank's end of the exchange, shaped like DeepEP's `Buffer`: publish and
  collect the count table, `dispatch` returns the received rows plus a `DispatchHandle`,
  and `combine(recv_y, handle)` needs only that handle.

`TRANSPORTS` is defined here and only here (the CLI and the notebook parameters import it).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..backend import BACKENDS, StageBackend, get_backend
from ..config import ConfigError, RunConfig
from ..fixtures import Inputs, Weights
from ..types import PackedRoutes, RecvBuffers
from .layout import RankPlan, check_overflow_mode
from .windows import Wait, WindowShape

#: Transports selectable by name.
TRANSPORTS: tuple[str, ...] = ("local", "gloo")
#: torch.distributed backends the collective exchange accepts (only gloo is tested here;
#: nccl needs CUDA, hccl needs torch_npu on an Ascend node).
DIST_BACKENDS: tuple[str, ...] = ("gloo", "nccl", "hccl")

#: Who computes the stages: a backend name, one backend for every rank, one per rank (a
#: sequence), or a factory ``rank -> StageBackend`` (must be picklable for `gloo`).
BackendSpec = (str | StageBackend | Sequence[str | StageBackend]
               | Callable[[int], StageBackend])


@dataclass(frozen=True)
class EpStep:
    """One EP layer step: everything a transport needs to run every rank's program.

    Picklable (a spawned world sends it to its ranks) when `backend` is.
    """

    run: RunConfig
    inputs: Inputs
    weights: Weights
    backend: BackendSpec = "torch"
    overflow: str = "error"
    poison: bool = False


@dataclass(frozen=True)
class DispatchHandle:
    """What `combine` needs to send a dispatch's rows back (DeepEP's handle).

    plan: this rank's layout. recv_route [NL, C]: origin route id of every received row,
    for transports that push rows back keyed by r_route (the window model). return_index
    [T·K]: row of the combine's receive buffer that holds each of my routes, for
    transports whose rows come back in arrival order (collectives); dropped routes
    point at a zero row.
    """

    plan: RankPlan
    recv_route: torch.Tensor | None = None
    return_index: torch.Tensor | None = None


class RankComm(Protocol):
    """One rank's end of a transport: the exchanges of the EP step.

    Methods that wait for peers are generators (``yield from comm.op(...)``) returning
    their result: the in-process transport suspends on a `Wait`; blocking ones never yield.
    """

    rank: int
    ranks: int

    def publish_counts(self, hist: torch.Tensor) -> None:
        """Start publishing my full histogram [R(dst),NL] (zeros included) to every
        rank; does not wait, so the caller can pack its rows meanwhile."""
        ...

    def pack(self, backend: StageBackend, x_norm_i8: torch.Tensor,
             x_norm_scale: torch.Tensor, weights: torch.Tensor,
             route_ids: torch.Tensor) -> PackedRoutes:
        """The four channels of `route_ids` (spec §2.5), written where this transport
        sends them from (the collectives gather straight into their wire rows)."""
        ...

    def collect_counts(self) -> Generator[Wait, None, torch.Tensor]:
        """Wait for every rank's histogram; return the count table [R(src),R(dst),NL]."""
        ...

    def dispatch(self, plan: RankPlan, packed: PackedRoutes
                 ) -> Generator[Wait, None, tuple[RecvBuffers, DispatchHandle]]:
        """Send my placed routes (packed in `plan.order`) to their slots; return my
        receive buffers [NL, C, ...] (rows beyond `plan.recv_count` unspecified) and
        the handle combine needs."""
        ...

    def combine(self, recv_y: torch.Tensor, handle: DispatchHandle
                ) -> Generator[Wait, None, torch.Tensor]:
        """Return every received row [NL, C, D] BF16 to its origin; return my
        routed_y_buf [T·K, D] BF16 (rows of dropped routes zero)."""
        ...


class Transport(Protocol):
    """Runs one EP step on every rank; the program does not know who moves the bytes."""

    name: str

    def run(self, step: EpStep) -> list[object] | None:
        """Every rank's `RankOutput` in rank order, or None on a process that is not
        the reporting rank (torchrun ranks other than 0)."""
        ...


def window_shape(run: RunConfig) -> WindowShape:
    """The per-rank window / exchange-buffer sizes of `run`."""
    return WindowShape(ranks=run.ranks, n_local=run.n_local, capacity=run.recv_max,
                       routes=run.tokens * run.model.num_experts_per_tok,
                       d_model=run.model.hidden_size)


def check_timeout(timeout: object, name: str = "timeout") -> float:
    """A finite positive number of seconds, or ConfigError naming the parameter."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"{name} must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


def backend_for(spec: BackendSpec, rank: int, ranks: int) -> StageBackend:
    """Rank `rank`'s stage backend from a `BackendSpec` (names build a fresh backend)."""
    if isinstance(spec, str):
        return get_backend(spec)
    if isinstance(spec, Sequence):
        if len(spec) != ranks:
            raise ValueError(f"backend: a sequence needs one backend per rank ({ranks}), "
                             f"got {len(spec)}")
        item = spec[rank]
        return get_backend(item) if isinstance(item, str) else item
    if callable(spec) and not isinstance(spec, type):
        return spec(rank)
    return spec


def resolve_backends(spec: BackendSpec, ranks: int) -> list[StageBackend]:
    """Every rank's backend, for transports running all ranks in one process; a name
    builds one backend shared by all ranks."""
    if isinstance(spec, str):
        return [get_backend(spec)] * ranks
    return [backend_for(spec, r, ranks) for r in range(ranks)]


def check_backend_spec(spec: BackendSpec, ranks: int) -> None:
    """Fail fast on an unknown backend name or a sequence of the wrong length."""
    seq = isinstance(spec, Sequence) and not isinstance(spec, str)
    if seq and len(spec) != ranks:
        raise ValueError(f"backend: a sequence needs one backend per rank ({ranks}), "
                         f"got {len(spec)}")
    for name in ([spec] if isinstance(spec, str) else list(spec) if seq else []):
        if isinstance(name, str) and name not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")


def validate_step(step: EpStep, timeout: object) -> None:
    """Cheap argument checks, raised before any heavy work."""
    run, inputs, weights = step.run, step.inputs, step.weights
    if not isinstance(run, RunConfig):
        raise TypeError(f"run must be a RunConfig, got {type(run).__name__}")
    check_overflow_mode(step.overflow)
    check_timeout(timeout)
    check_backend_spec(step.backend, run.ranks)
    cfg = run.model
    want = (run.ranks, run.batch, run.seq, cfg.hc_mult, cfg.hidden_size)
    if tuple(inputs.x_hc.shape) != want:
        raise ValueError(f"inputs.x_hc must have shape [R,B,S,hc,D] = {list(want)}, got "
                         f"{list(inputs.x_hc.shape)}")
    if tuple(inputs.input_ids.shape) != want[:3]:
        raise ValueError(f"inputs.input_ids must have shape [R,B,S] = {list(want[:3])}, "
                         f"got {list(inputs.input_ids.shape)}")
    if inputs.layer_id != run.layer_id:
        raise ValueError(f"inputs.layer_id {inputs.layer_id} does not match run routing "
                         f"{run.routing!r} (layer_id {run.layer_id})")
    if weights.routed_w1.shape[0] != cfg.n_routed_experts:
        raise ValueError(f"weights.routed_w1 must hold all {cfg.n_routed_experts} global "
                         f"experts, got {weights.routed_w1.shape[0]}")
