"""Where a stage kernel's SIM time goes: fixed costs along its critical path, and bounds.

The byte / FLOP roofline and the vector bound are throughput bounds; the vector stages
are far above them because the 910B cost model also charges fixed costs, one after
another, along the longest chain of dependent work. This module counts that chain in a
kernel's own SIM run and prices it with costs calibrated on microkernels
(`calibrate.fixed_costs`), never with the stage's own times:

* critical path: from the task that ends last, step back to whichever of its DAG
  predecessors (`0_simulate.topo.json`) or earlier tasks on the same core
  (`_simulate.swim.json`) ended last, until the first task;
* task part: per path task the cheapest task (`task_us`), the first task's place in the
  first wave (`dispatch_us` per earlier root task), per dependent link `link_us` plus
  `fanout_us` per successor of the producer resolved before it;
* DMA part: per load on the path (MTE_IN events of the path's tasks in
  `_simulate.pefetto.trace.json`) `dma_us` plus its bytes at `load_us_per_kib`, or the
  stores (MTE_OUT, a pipe of its own) at `store_us` / `store_us_per_kib` if longer;
* chain part: per vector op on the path (VECTOR_ALU events) `op_us`: the dependent chain
  of tiny ops (Sinkhorn iterations, the top-k / softplus tail) at its per-op latency.

latency_us = task + DMA + chain is a lower bound of the path (every cost in it is a
minimum); `bound_us` = max(latency_us, HBM, cube, vector bound); `dominant` names the
largest single part. sim / bound_us near 1 means the stage's time is explained.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .swim import AICORE_TYPES

_CORE_RE = re.compile(r"(AIC|AIV)_\d+")
_TO_BYTES_RE = re.compile(r" TO .*?(\d+)B")
#: Pipes whose events are loads (GM -> UB / L1), stores and vector ops (pypto's names).
LOAD_PIPE, STORE_PIPE, VECTOR_PIPE = "MTE_IN", "MTE_OUT", "VECTOR_ALU"
_FROM_BYTES_RE = re.compile(r"(\d+)B TO ")
#: Version of the path counting: a `path_dict` of another version (e.g. in a timing cache
#: written by an older counter) is not used.
PATH_VERSION = 2
#: Names of the parts, in table order.
PARTS: tuple[str, ...] = ("task", "dma", "chain", "hbm", "cube", "vec")


@dataclass(frozen=True)
class PathCounts:
    """What lies on the critical path of one SIM run (counts only, no times)."""

    tasks: int                      # AICore tasks on the path
    first_position: int             # root tasks started before the path's first task
    links: tuple[int, ...]          # per dependent link: successors resolved before it
    loads: int                      # MTE_IN events of the path's tasks
    load_bytes: int                 # their destination bytes
    vec_ops: int                    # VECTOR_ALU events of the path's tasks
    stores: int = 0                 # MTE_OUT events of the path's tasks
    store_bytes: int = 0            # their source bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Explanation:
    """A stage's time as calibrated parts (us); see the module doc."""

    task_us: float
    dma_us: float
    chain_us: float
    hbm_us: float
    cube_us: float
    vec_us: float
    counts: PathCounts | None = None

    @property
    def latency_us(self) -> float:
        """The critical path's fixed costs: task + DMA + chain."""
        return self.task_us + self.dma_us + self.chain_us

    @property
    def bound_us(self) -> float:
        """The best (largest) bound: the path's fixed costs or a throughput bound."""
        return max(self.latency_us, self.hbm_us, self.cube_us, self.vec_us)

    @property
    def dominant(self) -> str:
        """The largest single part (one of PARTS)."""
        return max(PARTS, key=lambda p: getattr(self, f"{p}_us"))

    def ratio(self, sim_us: float) -> float:
        return sim_us / self.bound_us if self.bound_us > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = {f"{p}_us": getattr(self, f"{p}_us") for p in PARTS}
        d.update(latency_us=self.latency_us, bound_us=self.bound_us, dominant=self.dominant,
                 counts=self.counts.to_dict() if self.counts else None)
        return d


def _load_run(folder: Path) -> tuple[dict[int, dict], dict[int, list[int]],
                                     dict[int, list[int]], list[Mapping]]:
    cm = Path(folder) / "CostModelSimulationOutput"
    swim = json.loads((cm / "_simulate.swim.json").read_text())
    topo_files = sorted(cm.glob("*_simulate.topo.json"))
    topo = json.loads(topo_files[0].read_text()) if topo_files else []
    trace_path = cm / "_simulate.pefetto.trace.json"
    trace = json.loads(trace_path.read_text())["traceEvents"] if trace_path.exists() else []
    tasks: dict[int, dict] = {}
    for core in swim:
        if core.get("coreType") not in AICORE_TYPES:
            continue
        lane = f"{core['coreType']} {core['blockIdx']}"
        for t in core.get("tasks", []):
            tasks[int(t["taskId"])] = {"lane": lane, "s": int(t["execStart"]),
                                       "e": int(t["execEnd"])}
    pred = {int(n["taskId"]): [int(p) for p in n.get("predecessors", [])] for n in topo}
    succ = {int(n["taskId"]): [int(p) for p in n.get("successors", [])] for n in topo}
    return tasks, _through_virtual(pred, tasks), _through_virtual(succ, tasks), trace


def _through_virtual(edges: Mapping[int, list[int]], tasks: Mapping[int, dict]
                     ) -> dict[int, list[int]]:
    """Edges between AICore tasks, following chains through tasks that run on no AICore
    lane (the model's virtual / hub tasks join phases)."""
    out: dict[int, list[int]] = {}
    for k in tasks:
        seen, todo, found = set(), list(edges.get(k, [])), []
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in tasks:
                found.append(n)
            else:
                todo.extend(edges.get(n, []))
        out[k] = found
    return out


def critical_path(tasks: Mapping[int, dict], pred: Mapping[int, list[int]]
                  ) -> list[tuple[int, str]]:
    """[(task, how it was reached)], first task first; how: 'root', 'link' (a DAG
    predecessor ended last) or 'core' (the previous task on the same core ended last)."""
    by_lane: dict[str, list[int]] = defaultdict(list)
    for tid, t in tasks.items():
        by_lane[t["lane"]].append(tid)
    cur = max(tasks, key=lambda k: (tasks[k]["e"], k))
    path: list[tuple[int, str]] = []
    while True:
        t = tasks[cur]
        cands = [(tasks[p]["e"], "link", p) for p in pred.get(cur, []) if p in tasks]
        same = [k for k in by_lane[t["lane"]] if tasks[k]["e"] <= t["s"] and k != cur]
        if same:
            k = max(same, key=lambda k: tasks[k]["e"])
            cands.append((tasks[k]["e"], "core", k))
        if not cands:
            path.append((cur, "root"))
            break
        _, how, nxt = max(cands)
        path.append((cur, how))
        cur = nxt
    return path[::-1]


def _pipe_counts(trace: list[Mapping], tasks: Mapping[int, dict], on_path: set[int]
                 ) -> dict[str, int]:
    """loads, load bytes, vector ops, stores, store bytes of the tasks `on_path`. A pipe
    event belongs to the task running on its core at its start time (the trace's own
    TASK[] numbers are not the swim's task ids)."""
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    core_pid = {tid: name.replace("_", " ") for (pid, tid), name in names.items()
                if _CORE_RE.fullmatch(name)}
    windows: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for tid in on_path:
        windows[tasks[tid]["lane"]].append((tasks[tid]["s"], tasks[tid]["e"]))
    n: dict[str, int] = defaultdict(int)
    for e in trace:
        lane = core_pid.get(e.get("pid")) if e.get("ph") == "X" else None
        if lane not in windows or not any(s <= e["ts"] < t for s, t in windows[lane]):
            continue
        pipe = names.get((e["pid"], e["tid"]), "")
        if " TO " not in e["name"]:
            continue
        if pipe == LOAD_PIPE:
            n["loads"] += 1
            b = _TO_BYTES_RE.search(e["name"])
            n["load_bytes"] += int(b.group(1)) if b else 0
        elif pipe == STORE_PIPE:
            n["stores"] += 1
            b = _FROM_BYTES_RE.search(e["name"])
            n["store_bytes"] += int(b.group(1)) if b else 0
        elif pipe == VECTOR_PIPE:
            n["vec_ops"] += 1
    return {k: n[k] for k in ("loads", "load_bytes", "vec_ops", "stores", "store_bytes")}


def path_counts(folder: str | Path) -> PathCounts:
    """Count the critical path of the SIM run in `folder` (a LatencyRecord.output_dir)."""
    tasks, pred, succ, trace = _load_run(Path(folder))
    if not tasks:
        raise ValueError(f"{folder}: no AICore tasks in the swim json")
    path = critical_path(tasks, pred)
    roots = [k for k in tasks if not any(p in tasks for p in pred.get(k, []))]
    first = path[0][0]
    first_pos = sum(1 for k in roots if tasks[k]["s"] < tasks[first]["s"])
    links = []
    for i, (tid, how) in enumerate(path[1:], start=1):
        if how != "link":
            continue
        prev = path[i - 1][0]
        sibs = [k for k in succ.get(prev, []) if k in tasks]
        links.append(sum(1 for k in sibs if tasks[k]["s"] < tasks[tid]["s"]))
    pipes = _pipe_counts(trace, tasks, {tid for tid, _ in path})
    return PathCounts(tasks=len(path), first_position=first_pos, links=tuple(links),
                      **pipes)


def explain(counts: PathCounts | None, fixed: Any, hbm_us: float, cube_us: float,
            vec_us: float) -> Explanation:
    """Price `counts` with the calibrated fixed costs (`calibrate.FixedCosts`) and attach
    the stage's throughput bounds (us). counts None: bounds only (no SIM trace)."""
    if counts is None:
        return Explanation(0.0, 0.0, 0.0, hbm_us, cube_us, vec_us, None)
    task = (counts.tasks * fixed.task_us + counts.first_position * fixed.dispatch_us
            + sum(fixed.link_us + n * fixed.fanout_us for n in counts.links))
    # loads and stores run on two pipes of their own: the longer of the two chains
    dma = max(counts.loads * fixed.dma_us + counts.load_bytes / 1024 * fixed.load_us_per_kib,
              counts.stores * fixed.store_us
              + counts.store_bytes / 1024 * fixed.store_us_per_kib)
    return Explanation(task_us=task, dma_us=dma, chain_us=counts.vec_ops * fixed.op_us,
                       hbm_us=hbm_us, cube_us=cube_us, vec_us=vec_us, counts=counts)


def path_dict(folder: str | Path) -> dict[str, Any] | None:
    """`path_counts(folder)` as a JSON-able dict (for timing caches); None when the run
    folder lacks the simulator's topology or trace (then only the bounds are shown)."""
    try:
        return {**path_counts(folder).to_dict(), "v": PATH_VERSION}
    except (OSError, ValueError, KeyError):
        return None


def path_current(path: Mapping[str, Any] | None) -> bool:
    """True when `path` is a `path_dict` of this PATH_VERSION (priced by explain_entry)."""
    return path is not None and path.get("v") == PATH_VERSION


def explain_entry(path: Mapping[str, Any] | None, hbm_us: float, cube_us: float,
                  vec_us: float) -> Explanation:
    """The Explanation of a stage from its path counts (a `path_dict`, or None / another
    PATH_VERSION: bounds only) and its throughput bounds, priced with the cached
    fixed-cost calibration."""
    from .calibrate import fixed_costs
    counts = None
    if path_current(path):
        counts = PathCounts(**{k: v for k, v in path.items() if k != "v"}
                            | {"links": tuple(path["links"])})
    return explain(counts, fixed_costs(), hbm_us, cube_us, vec_us)
