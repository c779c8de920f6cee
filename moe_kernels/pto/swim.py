"""The one reader of pypto's `_simulate.swim.json`: per-core task times of a SIM run.

The cost model writes, per core, `{blockIdx, coreType, tasks: [{taskId, execStart,
execEnd}]}` in cycles. `parse_swim_tasks` turns the AICore lanes (cube AIC, vector AIV)
into a plot-ready `SwimTable`; `runtime.parse_swim` reads its span and busy cycles into a
LatencyRecord, so both views come from the same parse.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Clock used to turn simulated cycles into microseconds. pypto's draw_swim_lane.py is
#: called by the simulator with --time_convert_denominator=1800 ("default 1.8GHz");
#: A2A3.ini says cube_freq=1850, we keep 1800 so our numbers match pypto's own print.
CLOCK_MHZ = 1800.0
#: Core lanes whose tasks form pypto's "AICore End-to-End Time" (cube and vector cores).
AICORE_TYPES: tuple[str, ...] = ("AIC", "AIV")


@dataclass(frozen=True)
class SwimTask:
    """One AICore task of a SIM run: its lane and its [start, end) in microseconds,
    relative to the first AICore task's start."""

    lane: str          # e.g. "AIV 24": core type and block index
    core_type: str
    block_idx: int
    task_id: int
    start_us: float
    end_us: float

    @property
    def duration_us(self) -> float:
        return self.end_us - self.start_us


@dataclass(frozen=True)
class SwimTable:
    """Plot-ready swimlane of one kernel call: tasks and lanes (lanes with tasks only)."""

    kernel: str
    tasks: tuple[SwimTask, ...]
    lanes: tuple[str, ...]      # busy lanes, AIC first, then AIV, by block index
    span_us: float              # max end - min start: pypto's AICore End-to-End Time
    clock_mhz: float
    span_cycles: int = 0
    busy_cycles: int = 0        # sum of task durations over the AICore lanes
    last_end_cycles: int = 0    # latest task end on any core, incl. AICPU scheduling

    @property
    def busy_us(self) -> float:
        """Sum of task durations over all lanes."""
        return sum(t.duration_us for t in self.tasks)

    @property
    def utilization(self) -> float:
        """busy / (busy lanes x span), from the cycle counts."""
        return (self.busy_cycles / (len(self.lanes) * self.span_cycles)
                if self.span_cycles else 0.0)


def parse_swim_tasks(swim: str | Path | Sequence[Mapping[str, Any]], kernel: str = "",
                     clock_mhz: float = CLOCK_MHZ,
                     core_types: Sequence[str] = AICORE_TYPES) -> SwimTable:
    """A SwimTable from a `_simulate.swim.json` (path, or its already-loaded list of cores).

    Cycles become microseconds at `clock_mhz` (pypto's 1.8 GHz); times are shifted so
    the first task of the kept core types starts at 0.
    """
    if not clock_mhz > 0:
        raise ValueError(f"clock_mhz must be > 0, got {clock_mhz!r}")
    cores = json.loads(Path(swim).read_text()) if isinstance(swim, (str, Path)) else swim
    if not isinstance(cores, Sequence):
        raise ValueError(f"swim json must be a list of cores, got {type(cores).__name__}")
    order = {c: i for i, c in enumerate(core_types)}
    raw: list[tuple[int, int, str, int, int, int]] = []
    last_end = 0
    for core in cores:
        tasks = core.get("tasks", [])
        for t in tasks:
            last_end = max(last_end, int(t["execEnd"]))
        ctype = core.get("coreType")
        if ctype not in order:
            continue
        blk = int(core["blockIdx"])
        for t in tasks:
            raw.append((order[ctype], blk, ctype, int(t.get("taskId", -1)),
                        int(t["execStart"]), int(t["execEnd"])))
    if not raw:
        raise ValueError(f"swim json has no tasks on core types {list(core_types)}")
    t0 = min(r[4] for r in raw)
    span = max(r[5] for r in raw) - t0
    raw.sort(key=lambda r: (r[0], r[1], r[4]))
    tasks = tuple(SwimTask(lane=f"{ct} {blk}", core_type=ct, block_idx=blk, task_id=tid,
                           start_us=(s - t0) / clock_mhz, end_us=(e - t0) / clock_mhz)
                  for _, blk, ct, tid, s, e in raw)
    lanes = tuple(dict.fromkeys(t.lane for t in tasks))
    return SwimTable(kernel=kernel, tasks=tasks, lanes=lanes, span_us=span / clock_mhz,
                     clock_mhz=clock_mhz, span_cycles=span,
                     busy_cycles=sum(e - s for *_, s, e in raw), last_end_cycles=last_end)
