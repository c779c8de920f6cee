"""Latency figures for notebook 04: stacked per-rank bars, swimlane, SIM vs roofline, the
communication model, and ours beside published figures. Same conventions as `plots`
(Agg canvas, Okabe-Ito, units on axes, legends outside); every figure's title or legend
names where its numbers come from (SIM cost model, modelled communication, published)."""
from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..pto.swim import SwimTable
from .comm import CommModel
from .latency_bars import StackedBars
from .plots import _legend, colour, new_figure
from .published import PublishedFigure

#: Hatch pattern that marks modelled (not simulated) segments.
MODEL_HATCH = "//"
#: Face colours of modelled (hatched) segments in stacked bars.
MODEL_GREYS: tuple[str, ...] = ("#DDDDDD", "#999999", "#666666")
#: Swimlanes drawn at most (busy lanes beyond are summarised in the title).
SWIM_LANES_MAX = 48
#: Wrap width of long titles and labels (characters).
WRAP = 70
#: Colour per provenance in the beside-published figure.
PROVENANCE_COLOURS: dict[str, int] = {"SIM": 4, "model": 0, "published": 7}


def wrap_title(text: str, width: int = WRAP) -> str:
    """`text` wrapped at `width` characters (long titles and labels)."""
    return "\n".join(textwrap.wrap(text, width)) or text


def plot_stacked_bars(bars: StackedBars, title: str, ylabel: str = "latency (us)",
                      hatched: Sequence[str] = (), notes: Mapping[str, str] | None = None
                      ) -> Figure:
    """One stacked bar per category (rank), one segment per stage in program order;
    segments named in `hatched` are drawn hatched (modelled). Totals on top; optional
    per-category `notes` under the total (e.g. rows received)."""
    n = len(bars.categories)
    fig, (ax,) = new_figure(max(6.0, 1.2 * n + 4.5), 4.6)
    bottom = [0.0] * n
    x = list(range(n))
    plain = [s for s in bars.segments if s not in hatched]
    for stage, vals in bars.segments.items():
        if stage in hatched:  # modelled: greys with black hatching, never a stage colour
            j = list(hatched).index(stage)
            style = {"color": MODEL_GREYS[j % len(MODEL_GREYS)], "hatch": MODEL_HATCH,
                     "edgecolor": "black"}
        else:
            style = {"color": colour(plain.index(stage)), "edgecolor": "white"}
        ax.bar(x, vals, bottom=bottom, width=0.6, label=stage, linewidth=0.5, **style)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for xi, tot, cat in zip(x, bars.totals, bars.categories, strict=True):
        note = f"\n{notes[cat]}" if notes and cat in notes else ""
        ax.annotate(f"{tot:.1f} us{note}", (xi, tot), ha="center", va="bottom", fontsize=8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 1.18)
    ax.set_xticks(x, list(bars.categories))
    ax.set(title=wrap_title(title), ylabel=ylabel, xlabel="rank")
    _legend(ax)
    return fig


def plot_swimlane(table: SwimTable, title: str, max_lanes: int = SWIM_LANES_MAX) -> Figure:
    """Gantt chart of one kernel's AICore tasks: lanes (AIC cube / AIV vector cores) x
    time in us; the span is pypto's AICore End-to-End Time."""
    lanes = table.lanes[:max_lanes]
    row = {lane: i for i, lane in enumerate(lanes)}
    fig, (ax,) = new_figure(8.0, min(9.0, max(3.0, 0.16 * len(lanes) + 1.8)))
    for t in table.tasks:
        if t.lane not in row:
            continue
        c = colour(4) if t.core_type == "AIC" else colour(0)
        ax.broken_barh([(t.start_us, t.duration_us)], (row[t.lane] - 0.4, 0.8),
                       facecolors=c, edgecolors="white", linewidth=0.3)
    ax.axvline(table.span_us, color="0.3", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(lanes)), list(lanes), fontsize=6)
    ax.invert_yaxis()
    more = len(table.lanes) - len(lanes)
    extra = f" (+{more} lanes not drawn)" if more > 0 else ""
    ax.set(title=wrap_title(title + extra), xlabel=f"time (us at {table.clock_mhz:.0f} MHz)",
           ylabel="core lane (type, block)")
    ax.legend(handles=[Patch(color=colour(4), label="AIC (cube) task"),
                       Patch(color=colour(0), label="AIV (vector) task"),
                       Patch(facecolor="none", edgecolor="0.3", linestyle="--",
                             label=f"span {table.span_us:.2f} us, {len(table.tasks)} "
                                   f"tasks, util {table.utilization:.0%}")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def plot_roofline(records: Sequence, title: str) -> Figure:
    """Grouped bars per stage: SIM latency, calibrated roofline, configured (A2A3.ini)
    roofline, log scale; SIM / calibrated ratio printed above each group. `records` are
    `pto.report.StageRecord`s."""
    fig, (ax,) = new_figure(8.5, 4.4)
    names = [r.stage for r in records]
    series = {"SIM latency": [r.sim_us for r in records],
              "roofline, calibrated limits": [r.roofline_us for r in records],
              "roofline, A2A3.ini limits": [r.config_roofline_us for r in records]}
    w = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        xs = [j - 0.4 + w * (i + 0.5) for j in range(len(names))]
        ax.bar(xs, [max(v, 1e-3) for v in vals], width=w, color=colour((4, 1, 2)[i]),
               label=label)
    ax.set_yscale("log")
    for j, r in enumerate(records):
        ax.annotate(f"x{r.ratio:.1f}", (j, max(r.sim_us, r.roofline_us)), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(title=wrap_title(title), ylabel="latency (us, log scale)", xlabel="stage")
    ax.plot([], [], " ", label="xN: SIM / calibrated roofline")
    _legend(ax)
    return fig


def plot_comm_model(model: CommModel, title: str,
                    published: Sequence[PublishedFigure] = ()) -> Figure:
    """Per-rank modelled dispatch and combine time (hatched: a model), with published
    figures as labelled horizontal reference lines; log scale."""
    ranks = int(model.rank_us.numel())
    fig, (ax,) = new_figure(8.5, 4.4)
    w = 0.35
    for i, phase in enumerate((model.dispatch, model.combine)):
        xs = [r - w / 2 + i * w for r in range(ranks)]
        ax.bar(xs, [max(v, 1e-3) for v in phase.rank_us.tolist()], width=w,
               color=colour(i), hatch=MODEL_HATCH,
               edgecolor="white",
               label=f"{phase.name}, modelled ({phase.link.bandwidth_gbps:g} GB/s, "
                     f"{phase.link.latency_us:g} us/msg, {phase.link.overhead_us:.0f} us/call)")
    styles = ("--", ":", "-.")
    for j, p in enumerate(published):
        ax.axhline(p.value_us, color=colour(4 + j % 4), linestyle=styles[j % 3],
                   linewidth=1.2, label=wrap_title(f"published: {p.quantity} = {p.value_us:g} "
                                              f"us ({p.source}; {p.settings})", 45))
    ax.set_yscale("log")  # published hardware figures are far above small-shape bars
    ax.set_xticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.set(title=wrap_title(title, 55), ylabel="latency (us, log scale)", xlabel="rank")
    _legend(ax)
    return fig


def plot_beside_published(ours: Sequence[tuple[str, float, str]],
                          published: Sequence[PublishedFigure], title: str) -> Figure:
    """Horizontal bars, log scale: our numbers (label, us, provenance 'SIM' or 'model')
    and published ones, coloured by provenance; each published bar names its source and
    settings."""
    rows = [(lbl, v, prov) for lbl, v, prov in ours]
    rows += [(f"{p.quantity} [{p.source}; {p.settings}]", p.value_us, "published")
             for p in published]
    fig, (ax,) = new_figure(10.0, max(3.5, 0.42 * len(rows) + 1.5))
    for i, (_label, v, prov) in enumerate(rows):
        if prov not in PROVENANCE_COLOURS:
            raise ValueError(f"provenance must be one of {list(PROVENANCE_COLOURS)}, "
                             f"got {prov!r}")
        ax.barh(i, max(v, 1e-3), color=colour(PROVENANCE_COLOURS[prov]),
                hatch=MODEL_HATCH if prov == "model" else None, edgecolor="white")
        ax.annotate(f" {v:.1f} us", (max(v, 1e-3), i), va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [wrap_title(r[0], 60) for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi * 3)
    ax.set(title=wrap_title(title, 90), xlabel="latency (us, log scale)")
    fig.legend(handles=[Patch(color=colour(PROVENANCE_COLOURS["SIM"]),
                             label="ours: SIM cost model (Ascend 910B, pypto 0.2.0)"),
                       Patch(facecolor=colour(PROVENANCE_COLOURS["model"]),
                             hatch=MODEL_HATCH, edgecolor="white",
                             label="ours: modelled communication (params)"),
                       Patch(color=colour(PROVENANCE_COLOURS["published"]),
                             label="published (source in the label)")],
               loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    return fig


def plot_sweep(x: Sequence[float], series: Mapping[str, Sequence[float]], title: str,
               xlabel: str, ylabel: str = "SIM latency (us)") -> Figure:
    """Latency per stage over a sweep, one line per stage (palette without black), and
    any 'total ...' series as a thick black dashed line; log-2 x axis."""
    fig, (ax,) = new_figure(7.5, 4.4)
    markers = "osD^vP*X"
    k = 0
    for label, ys in series.items():
        if label.startswith("total"):
            ax.plot(list(x), list(ys), color="#000000", linestyle="--", linewidth=2.2,
                    marker="o", label=label)
            continue
        ax.plot(list(x), list(ys), marker=markers[k % len(markers)], color=colour(k % 7),
                label=label)
        k += 1
    if len(x) > 1 and min(x) > 0 and max(x) / min(x) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(x), [f"{v:g}" for v in x])
    ax.set(title=wrap_title(title, 50), xlabel=xlabel, ylabel=ylabel)
    _legend(ax)
    return fig
