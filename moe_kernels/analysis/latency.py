"""Per-rank SIM latency of an EP layer step, swimlane tables, sweeps and stacked-bar data.

`run_ep_per_rank` runs the EP program with one stage backend per rank (a fresh
`PyptoBackend` each, by default) and attributes every kernel call to its rank and stage.
The `local` transport runs all ranks in one process as generators, so a single shared
backend cannot tell ranks apart; here a thin transport wrapper (`RankTaggingTransport`)
marks which rank's generator is running and a backend wrapper (`RankRoutingBackend`)
forwards each stage call to that rank's backend. Nothing in `moe_kernels.pto` changes.

Every call's `_simulate.swim.json` is parsed right after the call (`parse_swim_tasks`):
pypto's run folders are pruned as new calls arrive, so a path kept for later may be gone.

Latency provenance labels (`SIM_SOURCE`, `MODEL_SOURCE`) are data here, so every figure
says where its numbers come from.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pto.runtime import CLOCK_MHZ, SUPPORTED_PYPTO_VERSION

#: Provenance of every cost-model number (figure titles and legends).
SIM_SOURCE = f"SIM cost model (Ascend 910B, pypto {SUPPORTED_PYPTO_VERSION})"
#: Provenance of the communication numbers (an alpha-beta model, not a measurement).
MODEL_SOURCE = "modelled communication"
#: Core lanes whose tasks form pypto's "AICore End-to-End Time" (cube and vector cores).
AICORE_TYPES: tuple[str, ...] = ("AIC", "AIV")
#: The stage kernels of one EP layer step, in program order (the pypto backend's names).
EP_STAGES: tuple[str, ...] = ("hc_pre", "gate", "expert_shared", "pack_routes",
                              "expert_routed", "scatter_routes", "reduce_routes", "hc_post")


# --------------------------------------------------------------------------- swimlane
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

    @property
    def busy_us(self) -> float:
        """Sum of task durations over all lanes."""
        return sum(t.duration_us for t in self.tasks)

    @property
    def utilization(self) -> float:
        """busy / (busy lanes x span)."""
        return self.busy_us / (len(self.lanes) * self.span_us) if self.span_us else 0.0


def parse_swim_tasks(swim: str | Path | Sequence[Mapping[str, Any]], kernel: str = "",
                     clock_mhz: float = CLOCK_MHZ,
                     core_types: Sequence[str] = AICORE_TYPES) -> SwimTable:
    """A SwimTable from a `_simulate.swim.json` (path, or its already-loaded list of
    cores `{blockIdx, coreType, tasks: [{execStart, execEnd, taskId}]}` in cycles).

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
    for core in cores:
        ctype = core.get("coreType")
        if ctype not in order:
            continue
        blk = int(core["blockIdx"])
        for t in core.get("tasks", []):
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
                     clock_mhz=clock_mhz)


# --------------------------------------------------------------------------- attribution
@dataclass(frozen=True)
class KernelCall:
    """One stage kernel call of one rank: its SIM latency and (if kept) its swimlane."""

    rank: int
    stage: str
    index: int                  # call order over the whole step (all ranks)
    aicore_us: float
    n_tasks: int
    utilization: float
    swim: SwimTable | None = None


class RankTaggingTransport:
    """Wraps a transport so `recorder.rank` names the rank whose program is running.

    The wrapped transport runs rank programs as generators; every resume of rank r's
    generator first sets `recorder.rank = r`. Blocking transports (one process per rank)
    cannot share a recorder and are not supported here.
    """

    def __init__(self, inner: Any, recorder: RankRoutingBackend) -> None:
        if hasattr(inner, "run_layer"):
            raise ValueError("RankTaggingTransport needs an in-process transport (e.g. "
                             "LocalTransport), not one that runs its own processes")
        self.inner = inner
        self.recorder = recorder
        self.name = f"{getattr(inner, 'name', 'transport')}+rank-tags"

    def run(self, shape: Any, make_program: Callable[[int, Any], Generator]) -> list:
        """Run the inner transport with every rank program tagged by its rank."""
        def tagged(rank: int, comm: Any) -> Generator:
            return _tag_generator(make_program(rank, comm), rank, self.recorder)
        return self.inner.run(shape, tagged)


def _tag_generator(gen: Generator, rank: int, recorder: RankRoutingBackend) -> Generator:
    """Delegate to `gen`, setting `recorder.rank = rank` before every resume."""
    value: Any = None
    try:
        while True:
            recorder.rank = rank
            try:
                item = gen.send(value)
            except StopIteration as stop:
                return stop.value
            value = yield item
    finally:
        gen.close()


class RankRoutingBackend:
    """A StageBackend forwarding each call to the current rank's own backend, and
    recording (rank, stage, latency, swimlane) of every call in `calls`.

    make_backend: builds one backend per rank (objects with a `latencies` list of
    (stage, LatencyRecord | None), like `PyptoBackend`). keep_swim: stages whose
    swimlane is parsed and kept (all stages if None).
    """

    def __init__(self, ranks: int, make_backend: Callable[[], Any],
                 keep_swim: Iterable[str] | None = ("expert_routed",)) -> None:
        if not isinstance(ranks, int) or ranks <= 0:
            raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
        self.backends = [make_backend() for _ in range(ranks)]
        self.name = f"per-rank {getattr(self.backends[0], 'name', 'backend')}"
        self.keep_swim = None if keep_swim is None else frozenset(keep_swim)
        self.rank: int | None = None
        self.calls: list[KernelCall] = []

    def __getattr__(self, stage: str) -> Callable[..., Any]:
        if stage.startswith("_") or stage not in EP_STAGES:
            raise AttributeError(stage)
        return lambda *args, **kwargs: self._call(stage, *args, **kwargs)

    def _call(self, stage: str, *args: Any, **kwargs: Any) -> Any:
        rank = self.rank
        if rank is None:
            raise RuntimeError("RankRoutingBackend called outside a rank program: run it "
                               "through RankTaggingTransport")
        be = self.backends[rank]
        before = len(be.latencies)
        out = getattr(be, stage)(*args, **kwargs)
        for name, lat in be.latencies[before:]:
            if lat is None:  # NPU run or empty kernel: no cost-model record
                continue
            keep = self.keep_swim is None or name in self.keep_swim
            swim = parse_swim_tasks(lat.swim_path, kernel=name, clock_mhz=lat.clock_mhz) \
                if keep and Path(lat.swim_path).exists() else None
            self.calls.append(KernelCall(rank=rank, stage=name, index=len(self.calls),
                                         aicore_us=lat.aicore_us, n_tasks=lat.n_tasks,
                                         utilization=lat.utilization, swim=swim))
        return out


@dataclass
class PerRankRun:
    """An EP step run with per-rank attribution: the layer result and every call."""

    result: Any                       # LayerResult (x_next, stages, extra["layout"])
    calls: list[KernelCall] = field(default_factory=list)

    @property
    def ranks(self) -> int:
        return int(self.result.run.ranks)

    def swim(self, stage: str, rank: int = 0) -> SwimTable:
        """The swimlane of `stage` on `rank` (first call), if it was kept."""
        for c in self.calls:
            if c.stage == stage and c.rank == rank and c.swim is not None:
                return c.swim
        raise KeyError(f"no swimlane kept for stage {stage!r} on rank {rank}; kept: "
                       f"{sorted({(c.stage, c.rank) for c in self.calls if c.swim})}")


def run_ep_per_rank(run: Any, inputs: Any, weights: Any,
                    make_backend: Callable[[], Any] | None = None,
                    keep_swim: Iterable[str] | None = ("expert_routed",),
                    transport: Any = None) -> PerRankRun:
    """Run one EP layer step (local transport) with one backend per rank (a fresh
    `PyptoBackend` each unless `make_backend` says otherwise) and attribute every kernel
    call to its rank and stage."""
    from ..ep import LocalTransport, run_ep_layer
    if make_backend is None:
        from ..pto.backend import PyptoBackend
        make_backend = PyptoBackend
    recorder = RankRoutingBackend(run.ranks, make_backend, keep_swim)
    tagged = RankTaggingTransport(transport or LocalTransport(), recorder)
    result = run_ep_layer(run, inputs, weights, transport=tagged, backend=recorder)
    return PerRankRun(result=result, calls=list(recorder.calls))


#: Row multiple of the tight what-if capacity: 16 is the cube unit's fractal height, and a
#: multiple of 16 is divisible by every row tile the kernels pick (pto.ffn.ROW_TILE = 4).
TIGHT_ROW_MULTIPLE = 16


def tight_capacity(recv_count: Any, row_multiple: int = TIGHT_ROW_MULTIPLE) -> list[int]:
    """Per rank: max_e recv_count[r, e] rounded up to a multiple of row_multiple (>= 1)."""
    if not isinstance(row_multiple, int) or row_multiple <= 0:
        raise ValueError(f"row_multiple must be a positive integer, got {row_multiple!r}")
    top = recv_count.max(dim=1).values.tolist()
    return [max(1, -(-int(m) // row_multiple) * row_multiple) for m in top]


def tight_capacity_whatif(run: Any, weights: Any, recv_count: Any, seed: int = 0,
                          kernel: Callable[..., tuple] | None = None,
                          row_multiple: int = TIGHT_ROW_MULTIPLE) -> list[KernelCall]:
    """What-if: expert_routed of every rank with its capacity cut to the rows it actually
    received at most (C_r = max_e recv_count[r, e], rounded up), one SIM call per rank.

    C_r is rounded up to a multiple of `row_multiple` (default TIGHT_ROW_MULTIPLE): the
    kernels tile rows by divisors of C, so an awkward (e.g. prime) count would force
    1-row tiles and measure the tiling, not the rows.

    The EP kernel computes all C = RECV_MAX rows per expert on every rank; a kernel sized
    by the received rows would make ranks differ. Inputs are seeded INT8 rows and the
    rank's real weight shard (SIM latency depends on shapes, not values). `kernel`
    defaults to `pto.ffn.expert_routed` (returns (recv_y, LatencyRecord | None)).
    """
    import torch

    from ..fixtures import generator
    if kernel is None:
        from ..pto.ffn import expert_routed as kernel
    counts = recv_count.to(torch.int64)
    if counts.dim() != 2 or counts.shape[0] != run.ranks:
        raise ValueError(f"recv_count must be [R={run.ranks}, NL], got {tuple(counts.shape)}")
    nl, d = counts.shape[1], run.model.hidden_size
    calls = []
    for r, c in enumerate(tight_capacity(counts, row_multiple)):
        x = torch.randint(-127, 128, (nl, c, d), generator=generator(seed, f"tight{r}"),
                          dtype=torch.int8)
        scale = torch.full((nl, c), 0.01)
        w = torch.full((nl, c), 1.0 / run.model.num_experts_per_tok)
        shard = weights.routed_shard(r, nl)
        _, rec = kernel(x, scale, w, counts[r].clamp(max=c), shard,
                        run.model.swiglu_limit)
        if rec is not None:
            calls.append(KernelCall(rank=r, stage="expert_routed", index=r,
                                    aicore_us=rec.aicore_us, n_tasks=rec.n_tasks,
                                    utilization=rec.utilization))
    return calls


# --------------------------------------------------------------------------- bar data
@dataclass(frozen=True)
class StackedBars:
    """Stacked-bar data: one bar per category, one segment per stage (us)."""

    categories: tuple[str, ...]
    segments: dict[str, tuple[float, ...]]   # stage -> value per category (program order)

    @property
    def totals(self) -> tuple[float, ...]:
        return tuple(sum(v[i] for v in self.segments.values())
                     for i in range(len(self.categories)))


def per_rank_stage_bars(calls: Sequence[KernelCall], ranks: int,
                        stages: Sequence[str] = EP_STAGES) -> StackedBars:
    """Sum of SIM us per (stage, rank); stages no rank called are left out."""
    if not isinstance(ranks, int) or ranks <= 0:
        raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
    seg: dict[str, list[float]] = {s: [0.0] * ranks for s in stages}
    seen: set[str] = set()
    for c in calls:
        if c.stage not in seg:
            raise ValueError(f"call stage {c.stage!r} is not one of {list(stages)}")
        if not 0 <= c.rank < ranks:
            raise ValueError(f"call rank {c.rank} outside [0, {ranks})")
        seg[c.stage][c.rank] += c.aicore_us
        seen.add(c.stage)
    return StackedBars(categories=tuple(f"rank {r}" for r in range(ranks)),
                       segments={s: tuple(v) for s, v in seg.items() if s in seen})


def add_segments(bars: StackedBars, extra: Mapping[str, Sequence[float]]) -> StackedBars:
    """`bars` with more segments (e.g. modelled dispatch / combine) appended."""
    n = len(bars.categories)
    for name, vals in extra.items():
        if len(vals) != n:
            raise ValueError(f"segment {name!r} needs {n} values, got {len(vals)}")
        if name in bars.segments:
            raise ValueError(f"segment {name!r} already present")
    return StackedBars(bars.categories, {**bars.segments,
                                         **{k: tuple(float(x) for x in v)
                                            for k, v in extra.items()}})


# --------------------------------------------------------------------------- sweeps
def stage_sweep(runs: Sequence[Any], seed: int = 0, stages: Sequence[str] | None = None,
                report: Callable[..., list] | None = None,
                known: Mapping[Any, list] | None = None) -> list[list]:
    """`report(run, seed, stages)` (default `pto.report.stage_report`) for every run;
    runs found in `known` (run -> records, e.g. a report already made) are reused."""
    if report is None:
        from ..pto.report import stage_report
        report = stage_report
    known = known or {}
    return [known[r] if r in known else report(r, seed, None if stages is None
                                               else tuple(stages)) for r in runs]


def sweep_series(reports: Sequence[Sequence[Any]], total: bool = True,
                 fixed: Sequence[Any] = ()) -> dict[str, list[float]]:
    """stage -> [sim_us per sweep point] from stage_report outputs (records with .stage,
    .sim_us), plus 'total (sum of stages)' when `total`. `fixed`: records of stages the
    sweep does not change (not re-run), added to every point's total."""
    if not reports:
        raise ValueError("need at least one sweep point")
    names = [r.stage for r in reports[0]]
    out: dict[str, list[float]] = {n: [] for n in names}
    for recs in reports:
        by = {r.stage: r.sim_us for r in recs}
        if set(by) != set(names):
            raise ValueError(f"sweep points report different stages: {sorted(by)} vs "
                             f"{sorted(names)}")
        for n in names:
            out[n].append(float(by[n]))
    extra = [r for r in fixed if r.stage not in out]
    if total and len(names) + len(extra) > 1:
        base = float(sum(r.sim_us for r in extra))
        label = "total (sum of stages)" if not extra else (
            f"total (sum of stages; {len(extra)} unchanged stages fixed)")
        out[label] = [base + float(sum(r.sim_us for r in recs)) for recs in reports]
    return out


def batch_sweep_runs(run: Any, batches: Sequence[int]) -> list:
    """`run` at every batch per rank of `batches` (the receive capacity follows T)."""
    from dataclasses import replace
    return [replace(run, batch=int(b), recv_capacity=None) for b in batches]


def ranks_sweep_runs(run: Any, ranks: Sequence[int]) -> list:
    """`run` at every rank count of `ranks` (tokens per rank fixed, NL = E / ranks)."""
    from dataclasses import replace
    return [replace(run, ranks=int(r), recv_capacity=None) for r in ranks]


# --------------------------------------------------------------------------- parameters
#: Allowed values of the notebook's `messages` parameter (comm_model's `per`).
MESSAGE_MODES: tuple[str, ...] = ("peer", "route")
#: Stages the EP step runs (scatter_routes belongs to the single-card path only).
SWIM_STAGES: tuple[str, ...] = tuple(s for s in EP_STAGES if s != "scatter_routes")


@dataclass(frozen=True)
class LatencyOptions:
    """Notebook 04's own parameters, validated."""

    swim_stage: str
    swim_rank: int
    run_sweeps: bool
    batch_sweep: tuple[int, ...]
    ranks_sweep: tuple[int, ...]
    dispatch_link: Any   # comm.LinkParams
    combine_link: Any    # comm.LinkParams
    messages: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe values for the figures manifest."""
        return {"swim_stage": self.swim_stage, "swim_rank": self.swim_rank,
                "run_sweeps": self.run_sweeps,
                "batch_sweep": list(self.batch_sweep), "ranks_sweep": list(self.ranks_sweep),
                "dispatch_gbps": self.dispatch_link.bandwidth_gbps,
                "dispatch_latency_us": self.dispatch_link.latency_us,
                "combine_gbps": self.combine_link.bandwidth_gbps,
                "combine_latency_us": self.combine_link.latency_us,
                "messages": self.messages}


def _int_list(name: str, value: Any, ok: Callable[[int], bool], allowed: str
              ) -> tuple[int, ...]:
    from .params import ParameterError
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and ok(v)
                       for v in value) or len(set(value)) != len(value)):
        raise ParameterError(name, value, f"a non-empty list of distinct {allowed}")
    return tuple(sorted(int(v) for v in value))


def _link(prefix: str, gbps: Any, latency_us: Any, default: Any) -> Any:
    from dataclasses import replace

    from .extra_params import validate_factor
    from .params import ParameterError
    link = default
    if gbps is not None:
        link = replace(link, bandwidth_gbps=validate_factor(f"{prefix}_gbps", gbps),
                       source="parameter")
    if latency_us is not None:
        if (isinstance(latency_us, bool) or not isinstance(latency_us, (int, float))
                or not latency_us >= 0 or latency_us == float("inf")):
            raise ParameterError(f"{prefix}_latency_us", latency_us,
                                 "None (published default) or a finite number >= 0")
        link = replace(link, latency_us=float(latency_us), source="parameter")
    return link


def validate_latency_options(*, ranks: int, n_experts: int, swim_stage: str,
                             swim_rank: int, run_sweeps: bool, batch_sweep: Any,
                             ranks_sweep: Any, dispatch_gbps: Any = None,
                             dispatch_latency_us: Any = None, combine_gbps: Any = None,
                             combine_latency_us: Any = None, messages: str = "peer"
                             ) -> LatencyOptions:
    """Check notebook 04's own parameters (after `validate_params`); a ParameterError
    names the parameter, its value and the allowed values. `n_experts`: routed experts of
    the SIM runs' preset (ranks_sweep must divide it). Link overrides left None keep
    `comm`'s defaults (hardware figures; overheads fitted on DeepEP-Ascend EP8)."""
    from .comm import COMBINE_LINK, DISPATCH_LINK
    from .extra_params import validate_flag
    from .params import ParameterError
    if swim_stage not in SWIM_STAGES:
        raise ParameterError("swim_stage", swim_stage, f"one of {list(SWIM_STAGES)}")
    if not isinstance(swim_rank, int) or isinstance(swim_rank, bool) \
            or not 0 <= swim_rank < ranks:
        raise ParameterError("swim_rank", swim_rank, f"an integer in [0, {ranks})")
    run_sweeps = validate_flag("run_sweeps", run_sweeps)
    b = _int_list("batch_sweep", batch_sweep, lambda v: v > 0, "positive integers")
    divisors = [r for r in range(1, n_experts + 1) if n_experts % r == 0]
    rk = _int_list("ranks_sweep", ranks_sweep, lambda v: v in divisors,
                   f"divisors of n_routed_experts ({n_experts}): {divisors}")
    if messages not in MESSAGE_MODES:
        raise ParameterError("messages", messages, f"one of {list(MESSAGE_MODES)}")
    return LatencyOptions(
        swim_stage=swim_stage, swim_rank=swim_rank, run_sweeps=run_sweeps,
        batch_sweep=b, ranks_sweep=rk,
        dispatch_link=_link("dispatch", dispatch_gbps, dispatch_latency_us, DISPATCH_LINK),
        combine_link=_link("combine", combine_gbps, combine_latency_us, COMBINE_LINK),
        messages=messages)
