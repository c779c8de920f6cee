"""The EP program: every rank's layer step over a chosen transport (spec §3).

`run_ep_layer` validates its arguments, hands one `EpStep` to the transport (which runs
`rank.rank_program` on every rank), checks that all ranks saw the same count table, and
stacks the per-rank results like `layer.reference_layer` does, adding the DispatchLayout
the ranks computed.
"""
from __future__ import annotations

from ..config import RunConfig
from ..fixtures import Inputs, Weights
from ..layer import LayerResult
from .local import LocalTransport
from .rank import assemble
from .transport import TRANSPORTS, BackendSpec, EpStep, Transport, validate_step


def run_ep_layer(run: RunConfig, inputs: Inputs, weights: Weights, *,
                 transport: str | Transport = "local", backend: BackendSpec = "torch",
                 poison: bool = False, overflow: str = "error",
                 timeout: float = 60.0) -> LayerResult | None:
    """Run one MoE layer step on `run.ranks` expert-parallel ranks.

    transport: "local" (one process, window model), "gloo" (one spawned process per
    rank, torch.distributed), or a Transport object: a reused `LocalTransport` (its own
    timeout / silent_rank apply), a running `procs.SpawnedWorld`, or a
    `dist.TorchrunTransport` (then only rank 0 gets a result; other ranks get None).
    backend: a name, one StageBackend, one per rank (a sequence), or a factory
    ``rank -> StageBackend``; per-rank backends attribute kernel latencies to ranks.
    poison: fill every window / exchange buffer with garbage first; results must not
    change. overflow: "error" or "drop" (see compute_layout). timeout: seconds a rank
    may wait for a peer before the run fails.
    Returns x_next [R,B,S,hc,D] and stages with a leading rank axis, plus `layout`
    (DispatchLayout) and `dropped` [R,NL].
    """
    step = EpStep(run=run, inputs=inputs, weights=weights, backend=backend,
                  overflow=overflow, poison=poison)
    validate_step(step, timeout)
    if isinstance(transport, str):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {list(TRANSPORTS)}, "
                             f"got {transport!r}")
        if transport == "gloo":
            from .procs import SpawnedWorld  # spawns processes; imported only when asked
            with SpawnedWorld(run.ranks, timeout=timeout) as world:
                return assemble(run, world.run(step))
        transport = LocalTransport(timeout=timeout)
    outputs = transport.run(step)
    return None if outputs is None else assemble(run, outputs)
