"""The EP program: every rank's layer step over a chosen transport (spec §3).

`run_ep_layer` validates its arguments, runs `rank.rank_program` on every rank through the
transport, checks that all ranks saw the same count table, and stacks the per-rank
results like `layer.reference_layer` does, adding the DispatchLayout the ranks computed.
"""
from __future__ import annotations

from functools import partial
from typing import Protocol

import torch

from ..backend import StageBackend, get_backend
from ..config import RunConfig
from ..fixtures import Inputs, Weights
from ..layer import STAGE_KEYS, LayerResult
from .layout import check_overflow_mode, layout_from_plans
from .local import LocalTransport
from .rank import RankComm, RankGen, RankOutput, rank_program
from .windows import WindowShape

#: Transports selectable by name.
TRANSPORTS: tuple[str, ...] = ("local", "gloo")


class Transport(Protocol):
    """Moves the bytes of one EP step; the program does not know which one it is."""

    name: str

    def run(self, shape: WindowShape,
            make_program: partial[RankGen]) -> list[RankOutput]: ...


def window_shape(run: RunConfig) -> WindowShape:
    """The per-rank window sizes of `run`."""
    return WindowShape(ranks=run.ranks, n_local=run.n_local, capacity=run.recv_max,
                       routes=run.tokens * run.model.num_experts_per_tok,
                       d_model=run.model.hidden_size)


def validate(run: RunConfig, inputs: Inputs, weights: Weights, overflow: str,
             timeout: float) -> None:
    """Cheap argument checks, raised before any heavy work."""
    if not isinstance(run, RunConfig):
        raise TypeError(f"run must be a RunConfig, got {type(run).__name__}")
    check_overflow_mode(overflow)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
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


def resolve_backend(backend: str | StageBackend) -> StageBackend:
    """A backend object from a name or an object."""
    return get_backend(backend) if isinstance(backend, str) else backend


def make_rank_program(run: RunConfig, inputs: Inputs, weights: Weights,
                      backend: StageBackend, overflow: str, rank: int,
                      comm: RankComm) -> RankGen:
    """Rank `rank`'s program generator (partial-friendly argument order)."""
    return rank_program(rank, run, inputs.x_hc[rank], inputs.input_ids[rank], weights,
                        backend, comm, overflow)


def assemble(run: RunConfig, outputs: list[RankOutput]) -> LayerResult:
    """Stack per-rank outputs into a LayerResult with extra layout and dropped."""
    if [o.rank for o in outputs] != list(range(run.ranks)):
        raise RuntimeError(f"expected one output per rank 0..{run.ranks - 1}, got ranks "
                           f"{[o.rank for o in outputs]}")
    table = outputs[0].table
    for o in outputs[1:]:
        if not torch.equal(o.table, table):
            raise RuntimeError(f"rank {o.rank} saw a different count table than rank 0: "
                               f"the count exchange is broken")
    layout = layout_from_plans(table, [o.plan for o in outputs], run.tokens,
                               run.model.num_experts_per_tok, run.recv_max)
    stages = {k: torch.stack([o.stages[k] for o in outputs]) for k in STAGE_KEYS}
    x_next = torch.stack([o.x_next for o in outputs])
    return LayerResult(run=run, x_next=x_next, stages=stages,
                       extra={"layout": layout, "dropped": layout.dropped.clone()})


def run_ep_layer(run: RunConfig, inputs: Inputs, weights: Weights, *,
                 transport: str | Transport = "local",
                 backend: str | StageBackend = "torch", poison: bool = False,
                 overflow: str = "error", timeout: float = 60.0) -> LayerResult:
    """Run one MoE layer step on `run.ranks` expert-parallel ranks.

    transport: "local" (one process, window model), "gloo" (one spawned process per
    rank, torch.distributed), or a transport object (e.g. a reused `LocalTransport`,
    whose own poison / timeout / silent_rank settings then apply, or a running
    `dist.SpawnedWorld`). poison: fill every window / receive buffer with garbage
    first; results must not change. overflow: "error" or "drop" (see compute_layout).
    timeout: seconds a rank may wait for a peer before the run fails.
    Returns x_next [R,B,S,hc,D] and stages with a leading rank axis, plus
    extra["layout"] (DispatchLayout) and extra["dropped"] [R,NL].
    """
    validate(run, inputs, weights, overflow, timeout)
    if isinstance(transport, str) and transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {transport!r}")
    be = resolve_backend(backend)
    if transport == "gloo":
        from .dist import SpawnedWorld  # spawns processes; imported only when asked
        with SpawnedWorld(run.ranks, timeout=timeout) as world:
            return world.run_layer(run, inputs, weights, backend=backend, poison=poison,
                                   overflow=overflow)
    if transport == "local":
        transport = LocalTransport(poison=poison, timeout=timeout)
    if hasattr(transport, "run_layer"):
        return transport.run_layer(run, inputs, weights, backend=backend, poison=poison,
                                   overflow=overflow)
    outputs = transport.run(window_shape(run),
                            partial(make_rank_program, run, inputs, weights, be, overflow))
    return assemble(run, outputs)
