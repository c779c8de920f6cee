"""Per-rank SIM latency of an EP layer step: every kernel call attributed to its rank.

`run_ep_per_rank` runs the EP program with one stage backend per rank (a fresh
`PyptoBackend` each, by default) and records (rank, stage, SIM µs, swimlane) of every
kernel call. Every call's `_simulate.swim.json` is parsed right after the call: pypto's
run folders are pruned as new calls arrive, so a path kept for later may be gone.
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pto.swim import SwimTable, parse_swim_tasks
from ..stages import STAGE_NAMES


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
        if stage.startswith("_") or stage not in STAGE_NAMES:
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
    # one backend per rank (run_ep_layer's per-rank backends): each tags its own calls
    backends = [_RankBackend(recorder, r) for r in range(run.ranks)]
    result = run_ep_layer(run, inputs, weights, transport=transport or LocalTransport(),
                          backend=backends)
    return PerRankRun(result=result, calls=list(recorder.calls))


class _RankBackend:
    """Rank `rank`'s backend: forwards each stage call to `recorder` tagged with rank."""

    def __init__(self, recorder: RankRoutingBackend, rank: int) -> None:
        self.recorder, self.rank, self.name = recorder, rank, recorder.name

    def __getattr__(self, stage: str) -> Callable[..., Any]:
        if stage.startswith("_") or stage not in STAGE_NAMES:
            raise AttributeError(stage)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.recorder.rank = self.rank
            return self.recorder._call(stage, *args, **kwargs)
        return call


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
