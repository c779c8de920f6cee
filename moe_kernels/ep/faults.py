"""Fault injection for tests: a per-rank backend factory whose chosen rank fails.

Pass `FaultyBackends(rank, kind)` as the `backend` of an EP step: every other rank gets
the torch reference; rank `rank` hangs ("hang": it never reaches the count exchange, so
its peers time out) or its process exits ("exit") in its first stage. The production
loops know nothing of it. Module-level and picklable, so spawned ranks can build it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..backend import StageBackend, TorchBackend

#: Fault kinds a test can inject.
FAULT_KINDS: tuple[str, ...] = ("hang", "exit")
#: Seconds a "hang" sleeps: longer than any test waits (its process is killed first).
HANG_S = 10 ** 6
#: Exit code of an "exit" fault.
EXIT_CODE = 3


class _FailingBackend(TorchBackend):
    """The torch reference whose first stage (hc_pre) hangs or exits the process."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def hc_pre(self, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "exit":
            os._exit(EXIT_CODE)
        time.sleep(HANG_S)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class FaultyBackends:
    """Factory ``rank -> StageBackend``: the reference, except that `rank` fails."""

    rank: int
    kind: str = "hang"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {list(FAULT_KINDS)}, got {self.kind!r}")

    def __call__(self, rank: int) -> StageBackend:
        return _FailingBackend(self.kind) if rank == self.rank else TorchBackend()
