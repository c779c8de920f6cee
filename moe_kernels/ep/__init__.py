"""Expert-parallel MoE program: dispatch layout, window protocol, transports (spec §3).

Modules: layout (DispatchLayout, pure), transport (the interface: TRANSPORTS, EpStep,
RankComm, DispatchHandle, Transport), rank (one rank's program), program (run_ep_layer),
local (in-process window model: LocalTransport), buffer (EpBuffer: collectives over
torch.distributed), dist (RankSession, TorchrunTransport), procs (SpawnedWorld, the
gloo process manager; imported on demand), faults (test hooks).
Importing this package has no side effects and spawns nothing.
"""
from ..types import CapacityError
from .layout import DispatchLayout, compute_layout
from .local import LocalTransport
from .program import run_ep_layer
from .transport import TRANSPORTS, DispatchHandle, EpStep
from .windows import SymmetricWindows, WindowTimeoutError

__all__ = ["CapacityError", "DispatchLayout", "DispatchHandle", "EpStep", "compute_layout",
           "LocalTransport", "TRANSPORTS", "run_ep_layer", "SymmetricWindows",
           "WindowTimeoutError"]
