"""Latency figures of notebook 04, built on the EP step model: a per-rank Gantt chart of
the whole step, sweeps of the step (skew, ranks, tokens per rank), SIM stages against their
rooflines, and like-for-like comparisons with published figures. Same conventions as
`plots` (Agg canvas, units on axes, legends outside); stages and communication phases take
`style.stage_colour`, ranks `style.rank_colour`, and modelled communication is hatched.
Source and shape go in the footer (`manifest.FigureWriter`), not here."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..step.model import StepResult
from .comm import ComparisonRow
from .plots import new_figure
from .step_sweeps import COMM_KEYS, StageBound, StepPoint, StepVsPublished, idle_gaps
from .style import colour, legend_outside, stage_colour

#: Hatch pattern that marks modelled (not simulated) time.
MODEL_HATCH = "//"
#: Colour of compute (SIM) in breakdown bars (Paul Tol's blue: no rank or stage has it);
#: communication and waiting use stage_colour.
COMPUTE_COLOUR = "#4477AA"
#: Colour of published figures.
PUBLISHED_COLOUR = colour(7)


def _comm_style(name: str) -> dict:
    return {"facecolor": stage_colour(name), "hatch": MODEL_HATCH, "edgecolor": "0.2",
            "linewidth": 0.3}


def _overlaps(iv: tuple[str, float, float], timeline: Sequence[tuple[str, float, float]]
              ) -> bool:
    return any(o is not iv and o[1] < iv[2] - 1e-9 and iv[1] < o[2] - 1e-9
               for o in timeline)


def _gantt_panel(ax: Axes, res: StepResult, label: str) -> set[str]:
    """Draw one step's timelines (one lane per rank); returns the names drawn. Intervals
    that run beside another (overlap) take the lane's upper (communication) or lower
    (compute) half."""
    seen: set[str] = set()
    for rk in res.ranks:
        y = rk.rank
        for iv in rk.timeline:
            what, a, b = iv
            comm = what in COMM_KEYS
            lo, h = y - 0.4, 0.8
            if _overlaps(iv, rk.timeline):
                lo, h = (y - 0.4, 0.4) if comm else (y, 0.4)
            style = _comm_style(what) if comm else {"facecolor": stage_colour(what),
                                                    "edgecolor": "white", "linewidth": 0.3}
            ax.broken_barh([(a, b - a)], (lo, h), **style)
            seen.add(what)
        for a, b in idle_gaps(rk.timeline):
            ax.broken_barh([(a, b - a)], (y - 0.15, 0.3), facecolor=stage_colour("wait"))
            seen.add("wait")
    ax.axvline(res.step_us, color="0.2", linestyle="--", linewidth=1)
    ax.annotate(f"step {res.step_us:.1f} us ", (res.step_us, -0.55), ha="right",
                va="bottom", fontsize=9)
    n = len(res.ranks)
    ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
    ax.set_ylim(n - 0.5, -1.1)
    ax.set(title=label, ylabel="rank", xlabel="time in the step (us)")
    return seen


def plot_step_gantt(panels: Mapping[str, StepResult], title: str) -> Figure:
    """One panel per schedule (e.g. serial, overlapped) of the same step: every rank's
    stages (SIM), count exchange / dispatch / combine (MODEL, hatched) and waits (thin
    dark bars) on a shared time axis, the step time dashed."""
    ranks = len(next(iter(panels.values())).ranks)
    fig, axes = new_figure(10.0, len(panels) * (0.32 * ranks + 1.3) + 1.0, nrows=len(panels))
    seen: set[str] = set()
    for ax, (label, res) in zip(axes, panels.items(), strict=True):
        seen |= _gantt_panel(ax, res, label)
    hi = max(r.step_us for r in panels.values()) * 1.02
    for ax in axes:
        ax.set_xlim(0, hi)
    order = [s for s in next(iter(panels.values())).ranks[0].stages_us] + list(COMM_KEYS)
    handles = [Patch(**(_comm_style(s) if s in COMM_KEYS else {"facecolor": stage_colour(s)}),
                     label=f"{s} (model)" if s in COMM_KEYS else s)
               for s in order if s in seen]
    if "wait" in seen:
        handles.append(Patch(facecolor=stage_colour("wait"), label="waiting at a barrier"))
    legend_outside(axes[0], handles=handles)
    fig.suptitle(title)
    return fig


def _breakdown(ax: Axes, xs: Sequence[float], pts: Sequence[StepPoint], width: float = 0.6,
               totals: bool = True) -> None:
    """Stacked bars of the slowest rank: compute (SIM), communication (MODEL), waiting."""
    bottom = [0.0] * len(pts)
    parts = (("compute: SIM stages", [p.compute_us for p in pts],
              {"facecolor": COMPUTE_COLOUR}),
             ("communication (model)", [p.comm_us for p in pts], _comm_style("dispatch")),
             ("waiting", [p.wait_us for p in pts], {"facecolor": stage_colour("wait")}))
    for label, vals, style in parts:
        ax.bar(list(xs), vals, bottom=bottom, width=width, label=label, **style)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    if totals:
        for x, p in zip(xs, pts, strict=True):
            ax.annotate(f"{p.step_us:.0f}", (x, p.step_us), ha="center", va="bottom",
                        fontsize=9)


def plot_step_sweep(points: Sequence[StepPoint], title: str, xlabel: str) -> Figure:
    """Left: the slowest rank's step split into compute, communication and waiting per
    sweep value; right: communication's share of the step."""
    fig, (a1, a2) = new_figure(11.0, 4.4, ncols=2)
    xs = list(range(len(points)))
    labels = [f"{p.x:g}" for p in points]
    _breakdown(a1, xs, points)
    lo, hi = a1.get_ylim()
    a1.set_ylim(lo, hi * 1.1)
    a1.set_xticks(xs, labels)
    a1.set(xlabel=xlabel, ylabel="step time, slowest rank (us)", title="step time")
    share = [100 * p.comm_share for p in points]
    a2.plot(xs, share, marker="o", color=stage_colour("combine"))
    for x, s in zip(xs, share, strict=True):
        a2.annotate(f"{s:.0f} %", (x, s), xytext=(0, 5), textcoords="offset points",
                    ha="center", fontsize=9)
    a2.set_xticks(xs, labels)
    a2.set_ylim(0, max(share + [1.0]) * 1.25)
    a2.set(xlabel=xlabel, ylabel="communication / step (%)",
           title="communication's share of the step")
    legend_outside(a1, loc="upper left", bbox_to_anchor=(0.0, -0.18), ncols=3)
    fig.suptitle(title)
    return fig


def plot_skew_sweep(series: Mapping[str, Sequence[StepPoint]], title: str) -> Figure:
    """Left: step time against skew, one line per series (e.g. home placement, EPLB);
    right: rows received by the busiest rank over the mean."""
    fig, (a1, a2) = new_figure(11.0, 4.4, ncols=2)
    markers = "osD^"
    for i, (label, pts) in enumerate(series.items()):
        xs = [p.x for p in pts]
        a1.plot(xs, [p.step_us for p in pts], marker=markers[i % 4], color=colour(i),
                label=label)
        a2.plot(xs, [p.rows_imbalance for p in pts], marker=markers[i % 4],
                color=colour(i), label=label)
        last = pts[-1]
        a1.annotate(f"{last.step_us:.0f} us", (last.x, last.step_us), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=9)
    a2.axhline(1.0, color="0.5", linestyle=":", linewidth=1)
    a1.set(xlabel="synthetic skew (Zipf exponent)", ylabel="step time, slowest rank (us)",
           title="step time")
    a2.set(xlabel="synthetic skew (Zipf exponent)",
           ylabel="busiest rank's rows / mean (ratio)", title="load imbalance")
    legend_outside(a2)
    fig.suptitle(title)
    return fig


def plot_stage_bounds(bounds: Sequence[StageBound], title: str) -> Figure:
    """Per stage: SIM time beside its roofline (log scale), SIM / roofline above each."""
    fig, (ax,) = new_figure(9.0, 4.6)
    names = [b.stage for b in bounds]
    w = 0.4
    for i, (label, vals) in enumerate((("SIM time", [b.sim_us for b in bounds]),
                                       ("roofline at A2A3.ini limits",
                                        [b.roofline_us for b in bounds]))):
        ax.bar([j - w / 2 + i * w for j in range(len(names))], [max(v, 1e-3) for v in vals],
               width=w, color=COMPUTE_COLOUR if i == 0 else colour(1), label=label)
    ax.set_yscale("log")
    for j, b in enumerate(bounds):
        ax.annotate(f"x{b.ratio:.1f}", (j, max(b.sim_us, b.roofline_us)), ha="center",
                    va="bottom", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(title=title, ylabel="time (us, log scale)", xlabel="stage")
    ax.plot([], [], " ", label="xN: SIM / roofline")
    legend_outside(ax)
    return fig


def plot_comm_vs_published(rows: Sequence[ComparisonRow], title: str) -> Figure:
    """Our modelled dispatch and combine at the published shape beside the published
    latency, per EP size; the model's error above each pair, the fitted point marked."""
    fig, (ax,) = new_figure(9.0, 4.4)
    w = 0.38
    labelled: set[str] = set()
    for j, r in enumerate(rows):
        ax.bar(j - w / 2, r.model_us, width=w, label=None if r.phase in labelled
               else f"ours, model: {r.phase}", **_comm_style(r.phase))
        labelled.add(r.phase)
        ax.bar(j + w / 2, r.published_us, width=w, color=PUBLISHED_COLOUR,
               label="published: DeepEP-Ascend" if not j else None)
        tag = "fitted" if r.fitted else f"{r.error_pct:+.0f} %"
        ax.annotate(tag, (j, max(r.model_us, r.published_us)), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)
    lo, hi = ax.get_ylim()
    ax.set_ylim(0, hi * 1.12)
    ax.set_xticks(range(len(rows)), [f"EP{r.ep}\n{r.phase}" for r in rows])
    ax.set(title=title, ylabel="latency per call (us)", xlabel="EP size and phase")
    legend_outside(ax)
    return fig


def plot_step_vs_published(cmp: StepVsPublished, title: str) -> Figure:
    """Horizontal bars: our step (serial, split into compute / communication / waiting;
    and overlapped) beside the published step figure, labelled with its source."""
    fig, (ax,) = new_figure(10.0, 3.6)
    p = cmp.serial
    left = 0.0
    for label, v, style in (("compute: SIM stages", p.compute_us,
                             {"facecolor": COMPUTE_COLOUR}),
                            ("communication (model)", p.comm_us, _comm_style("dispatch")),
                            ("waiting", p.wait_us, {"facecolor": stage_colour("wait")})):
        ax.barh(0, v, left=left, height=0.6, label=label, **style)
        left += v
    ax.barh(1, cmp.overlapped_us, height=0.6, facecolor=COMPUTE_COLOUR, alpha=0.6,
            edgecolor="0.2", label="ours, overlapped schedule (total)")
    ax.barh(2, cmp.published.value_us, height=0.6, color=PUBLISHED_COLOUR,
            label=f"published: {cmp.published.source}")
    for y, v in ((0, p.step_us), (1, cmp.overlapped_us), (2, cmp.published.value_us)):
        ax.annotate(f" {v:.0f} us", (v, y), va="center", fontsize=9)
    ax.set_yticks([0, 1, 2], ["ours, serial", "ours, overlapped",
                              f"published:\n{cmp.published.quantity}"])
    ax.invert_yaxis()
    lo, hi = ax.get_xlim()
    ax.set_xlim(0, hi * 1.12)
    ax.set(title=title, xlabel="time per rank (us)")
    legend_outside(ax)
    return fig
