"""Per-rank SIM latency of an EP layer step: every kernel call attributed to its rank.

`run_ep_per_rank` runs the EP program with one stage backend per rank (a fresh
`PyptoBackend` each, by default: `run_ep_layer` takes one backend per rank) and records
(rank, stage, SIM µs, swimlane) of every kernel call. The swimlane comes parsed with the
call's LatencyRecord: pypto prunes run folders as new calls arrive.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..pto.swim import SwimTable, parse_swim_tasks


@dataclass(frozen=True)
class KernelCall:
    """One stage kernel call of one rank: its SIM latency and (if kept) its swimlane."""

    rank: int
    stage: str
    index: int                  # call order on its rank
    aicore_us: float
    n_tasks: int
    utilization: float
    swim: SwimTable | None = None


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
                    transport: Any = "local") -> PerRankRun:
    """Run one EP layer step with one backend per rank (a fresh `PyptoBackend` each
    unless `make_backend` says otherwise) and attribute every kernel call to its rank.

    Backends log (stage, LatencyRecord | None) in `latencies`; `keep_swim` names the
    stages whose swimlane is kept (all if None). `index` is the call's order on its rank.
    """
    from ..ep import run_ep_layer
    if make_backend is None:
        from ..pto.backend import PyptoBackend
        make_backend = PyptoBackend
    keep = None if keep_swim is None else frozenset(keep_swim)
    backends = [make_backend() for _ in range(run.ranks)]
    result = run_ep_layer(run, inputs, weights, transport=transport, backend=backends)
    calls = []
    for rank, be in enumerate(backends):
        for index, (stage, lat) in enumerate(be.latencies):
            if lat is None:  # NPU run or empty kernel: no cost-model record
                continue
            swim = None
            if keep is None or stage in keep:
                swim = lat.swim
                if swim is None and Path(lat.swim_path).exists():
                    swim = parse_swim_tasks(lat.swim_path, kernel=stage,
                                            clock_mhz=lat.clock_mhz)
            calls.append(KernelCall(rank=rank, stage=stage, index=index,
                                    aicore_us=lat.aicore_us, n_tasks=lat.n_tasks,
                                    utilization=lat.utilization, swim=swim))
    return PerRankRun(result=result, calls=calls)


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
