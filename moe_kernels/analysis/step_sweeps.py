"""What notebook 04 shows of the EP step model (`moe_kernels.step.model.ep_step`): the
slowest rank's critical path of one step, sweeps over skew (with and without the EPLB
what-if), ranks and tokens per rank, the idle gaps of a rank's timeline (the Gantt
chart's waits), our EP8 step beside the reference program's published EP8 core time, and
the "What we saw" findings written from these numbers.

Stage times are SIM (pypto's cost model of the 910B), the count exchange, dispatch and
combine the communication MODEL (`analysis.comm`); nothing here is measured. Sweeps use
the serial schedule (overlap=False), where compute + communication + waiting of the
slowest rank add up to the step time.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..config import RunConfig
from ..pto.ffn import ROUTED_ROW_QUANTUM
from ..pto.report import configured_limits, roofline_us
from ..stages import EP_STEP_STAGES, StageShape, stage_cost
from ..step.model import StepResult, capacity_for, ep_step, step_routing
from .comm import FIT_EP, ComparisonRow, held_out_max_error
from .narrative import HEADING
from .published import PublishedFigure, published_figures
from .style import shape_label

#: Communication phases of a step (the keys of RankStep.comm_us), in step order.
COMM_KEYS: tuple[str, ...] = ("count", "dispatch", "combine")
#: The published step figure our EP8 step is set beside (`published.published_figures`).
PUBLISHED_STEP = "EP8 core time per rank"

StepFn = Callable[..., StepResult]
FactorFn = Callable[[RunConfig, int], "float | None"]


@dataclass(frozen=True)
class StepPoint:
    """One step reduced to its slowest rank: SIM compute, MODEL communication and waiting
    (which add up to step_us in the serial schedule), and how uneven the load was."""

    x: float                 # the swept value (skew, ranks, tokens per rank)
    step_us: float
    rank: int                # the slowest rank
    compute_us: float
    comm_us: float
    wait_us: float
    routed_max_us: float     # slowest rank's expert_routed (SIM)
    routed_min_us: float     # fastest rank's expert_routed (SIM)
    rows_max: int            # rows received by the busiest rank
    rows_mean: float
    active_mean: float       # local experts holding rows, mean over ranks
    dropped: int

    @property
    def comm_share(self) -> float:
        """Communication's share of the step (0..1)."""
        return self.comm_us / self.step_us if self.step_us else 0.0

    @property
    def rows_imbalance(self) -> float:
        """Rows received by the busiest rank over the mean (1 = balanced)."""
        return self.rows_max / self.rows_mean if self.rows_mean else 1.0


def step_point(res: StepResult, x: float = 0.0) -> StepPoint:
    """The StepPoint of one modelled step (see StepPoint)."""
    slow = max(res.ranks, key=lambda r: r.total_us)
    routed = [r.stages_us["expert_routed"] for r in res.ranks]
    rows = [r.rows_received for r in res.ranks]
    return StepPoint(x=float(x), step_us=res.step_us, rank=slow.rank,
                     compute_us=sum(slow.stages_us.values()),
                     comm_us=sum(slow.comm_us[k] for k in COMM_KEYS), wait_us=slow.wait_us,
                     routed_max_us=max(routed), routed_min_us=min(routed),
                     rows_max=max(rows), rows_mean=sum(rows) / len(rows),
                     active_mean=sum(sum(1 for n in r.expert_rows if n)
                                     for r in res.ranks) / len(res.ranks),
                     dropped=int(res.config.get("routes_dropped", 0)))


def step_shape(res: StepResult, **extra: Any) -> str:
    """The footer shape of a step: 'flash · R=8 · T=32/rank · C=256'."""
    c = res.config
    return shape_label(c["preset"], c["ranks"], c["tokens"], c["capacity"], **extra)


def idle_gaps(timeline: Sequence[tuple[str, float, float]]) -> list[tuple[float, float]]:
    """The (start, end) spans between time 0 and the rank's last interval that no
    interval of `timeline` covers: where the rank waits at a barrier."""
    gaps, t = [], 0.0
    for _, a, b in sorted(timeline, key=lambda iv: (iv[1], iv[2])):
        if a > t + 1e-9:
            gaps.append((t, a))
        t = max(t, b)
    return gaps


@dataclass(frozen=True)
class StageBound:
    """One stage of a step: its SIM time beside its roofline max(bytes / HBM, FLOPs / peak)
    at pypto's configured A2A3.ini limits (stage cost formulas; no calibration run)."""

    stage: str
    sim_us: float
    roofline_us: float

    @property
    def ratio(self) -> float:
        """SIM time over the roofline."""
        return self.sim_us / self.roofline_us if self.roofline_us else float("inf")


def stage_bounds(res: StepResult, run: RunConfig) -> list[StageBound]:
    """Every stage of the step's busiest rank (the longest expert_routed) against its
    roofline, the cost formulas taken at the rows that rank's experts received."""
    rk = max(res.ranks, key=lambda r: r.stages_us["expert_routed"])
    shape = StageShape.from_run(run, expert_rows=tuple(rk.expert_rows))
    lim = configured_limits()
    out = []
    for s in EP_STEP_STAGES:
        c = stage_cost(s, shape)
        out.append(StageBound(s, rk.stages_us[s],
                              roofline_us(c.hbm_bytes, c.int8_ops, c.fp_flops, lim)))
    return out


# --------------------------------------------------------------------------- sweeps
def skew_sweep(run: RunConfig, skews: Sequence[float], seed: int = 0,
               eplb_slots: int | None = None, step: StepFn = ep_step) -> list[StepPoint]:
    """The step at every synthetic skew (serial; EPLB what-if with `eplb_slots`)."""
    return [step_point(step(run, skew=float(s), seed=seed, eplb_slots=eplb_slots), s)
            for s in skews]


def tight_factor(run: RunConfig, seed: int = 0) -> float:
    """The capacity_factor whose receive capacity is the busiest expert's rows (skew 0)
    rounded up to the 16-row quantum: no route is dropped, and the receive windows the
    SIM kernels are specialised to stay small (at R·T rows a flash kernel's simulation
    needs tens of GiB at R = 2 or T = 512)."""
    placed = step_routing(run, 0.0, seed, capacity_for(run, None)).placed.sum(0)
    q = ROUTED_ROW_QUANTUM
    cap = min(run.ranks * run.tokens, -(-int(placed.max()) // q) * q)
    mean = run.tokens * run.model.num_experts_per_tok / run.n_local
    return (cap - 0.5) / mean      # capacity_for: ceil(factor · mean) = cap


def _swept(run: RunConfig, x: float, seed: int, step: StepFn, factor: FactorFn
           ) -> StepPoint:
    return step_point(step(run, seed=seed, capacity_factor=factor(run, seed)), x)


def ranks_sweep(run: RunConfig, ranks: Sequence[int], seed: int = 0,
                step: StepFn = ep_step, factor: FactorFn = tight_factor) -> list[StepPoint]:
    """The step at every rank count, tokens per rank fixed (NL = E / R); capacity from
    `factor` (default: the busiest expert's rows, see tight_factor)."""
    return [_swept(replace(run, ranks=int(r), recv_capacity=None), r, seed, step, factor)
            for r in ranks]


def tokens_sweep(run: RunConfig, tokens: Sequence[int], seed: int = 0,
                 step: StepFn = ep_step, factor: FactorFn = tight_factor
                 ) -> list[StepPoint]:
    """The step at every T tokens per rank (batch = T / seq, ranks fixed); capacity as in
    ranks_sweep."""
    bad = [t for t in tokens if t % run.seq]
    if bad:
        raise ValueError(f"tokens per rank must be multiples of seq={run.seq}, got {bad}")
    return [_swept(replace(run, batch=int(t) // run.seq, recv_capacity=None), t, seed, step,
                   factor) for t in tokens]


# --------------------------------------------------------------------------- published
@dataclass(frozen=True)
class StepVsPublished:
    """Our step (serial breakdown and overlapped total) beside a published step figure."""

    serial: StepPoint
    overlapped_us: float
    shape: str               # our plotted shape
    published: PublishedFigure

    @property
    def ratio(self) -> float:
        """Our serial step over the published figure."""
        return self.serial.step_us / self.published.value_us


def step_vs_published(serial: StepResult, overlapped: StepResult) -> StepVsPublished:
    """Our step beside the reference program's published EP8 core time per rank."""
    pub = next(f for f in published_figures(["step"]) if f.quantity == PUBLISHED_STEP)
    return StepVsPublished(serial=step_point(serial), overlapped_us=overlapped.step_us,
                           shape=step_shape(serial), published=pub)


# --------------------------------------------------------------------------- findings
def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "-"


def _step_sentence(name: str, serial: StepResult, overlapped: StepResult) -> str:
    p = step_point(serial)
    slow = serial.ranks[p.rank]
    top = max(slow.stages_us, key=slow.stages_us.get)
    saved = serial.step_us - overlapped.step_us
    return (f"{name} ({step_shape(serial)}): the step takes {p.step_us:.1f} us serial, "
            f"{overlapped.step_us:.1f} us with expert_shared beside the exchange "
            f"({saved:.1f} us less); on the slowest rank {top} takes "
            f"{_share(slow.stages_us[top], p.step_us)}, communication "
            f"{_share(p.comm_us, p.step_us)} and waiting {_share(p.wait_us, p.step_us)}.")


def _moves(a: float, b: float) -> str:
    """'grows from 1.0 to 2.0 us' / 'shrinks ...' / 'stays at ...'."""
    if abs(b - a) < 0.05:
        return f"stays at {a:.1f} us"
    return f"{'grows' if b > a else 'shrinks'} from {a:.1f} to {b:.1f} us"


def _range(pts: Sequence[StepPoint], what: str, unit: str = "") -> str:
    a, b = pts[0], pts[-1]
    return (f"from {what}{a.x:g}{unit} to {b.x:g}{unit} the step goes from "
            f"{a.step_us:.1f} to {b.step_us:.1f} us and communication's share from "
            f"{100 * a.comm_share:.0f} % to {100 * b.comm_share:.0f} %")


def step_findings(main: tuple[StepResult, StepResult], scale: tuple[StepResult, StepResult],
                  skew: Sequence[StepPoint], skew_eplb: Sequence[StepPoint],
                  eplb_slots: int, ranks: Sequence[StepPoint], tokens: Sequence[StepPoint],
                  comm_rows: Sequence[ComparisonRow], vs_pub: StepVsPublished) -> str:
    """Markdown 'What we saw' of notebook 04 from its numbers: main / scale are (serial,
    overlapped) steps; skew points without and with EPLB; R and T sweeps; the comm model
    at the published shape; our step beside the published one."""
    c = scale[0].config
    cold, hot, flat = skew[0], skew[-1], skew_eplb[-1]
    bullets = [
        _step_sentence("Seed's shape", *main),
        _step_sentence("At scale", *scale),
        (f"Skew ({c['preset']}, R={c['ranks']}): from skew {cold.x:g} to {hot.x:g} the "
         f"busiest rank goes from {cold.rows_imbalance:.2f}x to {hot.rows_imbalance:.2f}x "
         f"the mean rows, and the step {_moves(cold.step_us, hot.step_us)}: "
         f"expert_routed streams the weights of every expert that holds rows, and those "
         f"go from {cold.active_mean:.1f} to {hot.active_mean:.1f} per rank (slowest "
         f"expert_routed {cold.routed_max_us:.1f} -> {hot.routed_max_us:.1f} us, "
         f"lightest {hot.routed_min_us:.1f} us at skew {hot.x:g})."),
        (f"EPLB with {eplb_slots} redundant slots at skew {flat.x:g}: the busiest rank "
         f"{hot.rows_imbalance:.2f}x -> {flat.rows_imbalance:.2f}x the mean rows, experts "
         f"holding rows {hot.active_mean:.1f} -> {flat.active_mean:.1f} per rank, and the "
         f"step {_moves(hot.step_us, flat.step_us)}."),
        f"Ranks (T={c['tokens']}/rank fixed): " + _range(ranks, "R = ") + ".",
        f"Tokens per rank (R={c['ranks']}): " + _range(tokens, "T = ") + ".",
    ]
    if comm_rows:
        fit = [r for r in comm_rows if r.fitted]
        bullets.append(
            f"Communication model at DeepEP-Ascend's own shape: fitted on EP{FIT_EP} "
            f"({', '.join(f'{r.phase} {r.model_us:.0f} us' for r in fit)}), the held-out "
            f"points within {held_out_max_error(list(comm_rows)):.1f} % of the published "
            f"latency.")
    bullets.append(
        f"Our step ({vs_pub.shape}) takes {vs_pub.serial.step_us:.0f} us serial and "
        f"{vs_pub.overlapped_us:.0f} us overlapped, {vs_pub.ratio:.1f}x the reference "
        f"program's published {vs_pub.published.quantity} "
        f"({vs_pub.published.value_us:.0f} us, {vs_pub.published.source}); of our serial "
        f"step, SIM compute is {vs_pub.serial.compute_us:.0f} us and modelled "
        f"communication {vs_pub.serial.comm_us:.0f} us.")
    lines = [HEADING, ""] + [f"* {b}" for b in bullets]
    lines.append("* Next: `python -m moe_kernels step` prints any of these steps per rank; "
                 "`--json` writes its timeline.")
    return "\n".join(lines) + "\n"
