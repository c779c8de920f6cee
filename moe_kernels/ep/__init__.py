"""Expert-parallel MoE program: dispatch layout, window protocol, transports (spec §3).

Public entry points: `compute_layout` / `DispatchLayout` (ep.layout), `run_ep_layer`
and `TRANSPORTS` (ep.program), `LocalTransport` (ep.local), `SymmetricWindows`
(ep.windows), and `run_under_torchrun` / `SpawnedWorld` (ep.dist, imported on demand).
Importing this package has no side effects and spawns nothing.
"""
from ..types import CapacityError
from .layout import DispatchLayout, compute_layout
from .local import LocalTransport
from .program import TRANSPORTS, run_ep_layer
from .windows import SymmetricWindows, WindowTimeoutError

__all__ = ["CapacityError", "DispatchLayout", "compute_layout", "LocalTransport",
           "TRANSPORTS", "run_ep_layer", "SymmetricWindows", "WindowTimeoutError"]
