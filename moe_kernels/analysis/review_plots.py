"""Design-review figures, one finding each: drop rate over skew x capacity factor,
capacity headroom under skew, memory footprint per rank, INT8 against BF16 dispatch,
agreement as margin to the tolerance and the pypto error as a share of the threshold.
Same conventions as `plots` (Agg canvas, `style` palettes and footer)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from .agreement import Comparison
from .plots import new_figure
from .style import colour, legend_outside, rank_colour
from .whatif import DropGrid, Footprint, HeadroomCurve, PayloadPoint

#: Line styles per EP size in the footprint and payload figures.
_DASHES: tuple[str, ...] = ("-", "--", "-.", ":")
#: Smallest decade of the error-ratio bins (smaller non-zero errors join it).
ERROR_RATIO_LOWEST = 1e-4
_MIB = 1024.0 ** 2


def plot_drop_heatmap(grid: DropGrid, title: str,
                      marked: tuple[float, float] | None = None) -> Figure:
    """Drop rate (% of routes) per skew (rows) and capacity factor (columns), values
    printed; `marked` = (skew, factor) of the notebook's own run outlined."""
    rate = grid.rate_pct
    fig, (ax,) = new_figure(8.5, 4.8)
    vmax = max(1.0, float(rate.max()))
    im = ax.imshow(rate.numpy(), cmap="cividis", aspect="auto", vmin=0.0, vmax=vmax,
                   interpolation="nearest", origin="lower")
    ax.grid(False)
    for i in range(rate.shape[0]):
        for j in range(rate.shape[1]):
            v = float(rate[i, j])
            text = "0" if v == 0 else f"{v:.1f}" if v >= 0.1 else "<0.1"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="black" if v > 0.55 * vmax else "white")
    ax.set_xticks(range(len(grid.factors)),
                  [f"{f:g}\nC={c}" for f, c in zip(grid.factors, grid.capacities,
                                                    strict=True)])
    ax.set_yticks(range(len(grid.skews)), [f"{s:g}" for s in grid.skews])
    if marked is not None and marked[0] in grid.skews and marked[1] in grid.factors:
        i, j = grid.skews.index(marked[0]), grid.factors.index(marked[1])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                                  edgecolor=colour(5), linewidth=2.5))
        ax.plot([], [], color=colour(5), linewidth=2.5, label="this run's skew and factor")
        legend_outside(ax)
    ax.set(title=title, xlabel="capacity factor (x mean rows per expert) and C (rows)",
           ylabel="skew (Zipf exponent)")
    fig.colorbar(im, ax=ax, label="routes dropped (% of all routes)")
    return fig


def plot_headroom(curves: Sequence[HeadroomCurve], title: str) -> Figure:
    """Busiest expert's rows as % of capacity over skew, one line per routing; the 100 %
    line is the overflow; the first overflowing skew of each curve is marked."""
    fig, (ax,) = new_figure(8.0, 4.4)
    for i, c in enumerate(curves):
        ax.plot(c.skews, c.utilisation_pct, marker="os^D"[i % 4], color=colour(i),
                label=f"{c.label} (C = {c.capacity})")
        s = c.first_overflow()
        if s is not None:
            k = c.skews.index(s)
            ax.annotate(f"overflows at skew {s:g}", (s, c.utilisation_pct[k]),
                        xytext=(6, -14), textcoords="offset points", fontsize=9,
                        color=colour(i))
    ax.axhline(100.0, color="0.2", linestyle="--", label="capacity (100 %): beyond, "
                                                          "routes are dropped")
    ax.set(title=title, xlabel="skew (Zipf exponent)",
           ylabel="busiest expert's rows (% of capacity)")
    ax.set_ylim(0, max(110.0, 1.08 * max(max(c.utilisation_pct) for c in curves)))
    ax.legend(loc="lower right", fontsize=9, frameon=True)
    return fig


def plot_footprint(window: dict[tuple[str, int], list[Footprint]],
                   factors: Sequence[float], title: str) -> Figure:
    """Left: receive-window MiB per rank over the capacity factor, a colour per preset,
    a dash per EP size. Right: count-table KiB per rank over the EP size."""
    fig, (ax0, ax1) = new_figure(12.5, 4.6, ncols=2)
    presets = list(dict.fromkeys(p for p, _ in window))
    ranks = sorted({r for _, r in window})
    for (preset, r), fps in window.items():
        ax0.plot(list(factors), [f.window_bytes / _MIB for f in fps],
                 color=colour(presets.index(preset)), linestyle=_DASHES[ranks.index(r) % 4],
                 marker="o", markersize=3)
    for i, preset in enumerate(presets):
        ax1.plot(ranks, [window[(preset, r)][0].count_bytes / 1024 for r in ranks],
                 color=colour(i), marker="o", label=preset)
    ax0.set(title="receive window per rank (x_i8 + 3 side tiles)",
            xlabel="capacity factor (x mean rows per expert)", ylabel="MiB per rank")
    handles = [Line2D([], [], color=colour(i), label=p) for i, p in enumerate(presets)]
    handles += [Line2D([], [], color="0.3", linestyle=_DASHES[j % 4], label=f"R = {r}")
                for j, r in enumerate(ranks)]
    ax0.legend(handles=handles, fontsize=9, frameon=False, loc="upper left",
               title="lines of one preset overlap:\nNL·C = T·K·factor for any R",
               title_fontsize=9)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(ranks, [str(r) for r in ranks])
    ax1.set(title="count table pub_counts per rank (INT32)",
            xlabel="EP ranks R (log2 scale)", ylabel="KiB per rank (= R·E·4 B)")
    legend_outside(ax1)
    fig.suptitle(title)
    return fig


def plot_payload(points: Sequence[PayloadPoint], title: str) -> Figure:
    """Left: dispatch link bytes of the busiest rank, INT8 + scale (solid) against BF16
    (dashed), per preset over R. Right: the modelled dispatch phase time, same lines."""
    fig, (ax0, ax1) = new_figure(12.5, 4.6, ncols=2)
    presets = list(dict.fromkeys(p.preset for p in points))
    for i, preset in enumerate(presets):
        pts = [p for p in points if p.preset == preset]
        rs = [p.ranks for p in pts]
        ax0.plot(rs, [p.int8_bytes / _MIB for p in pts], color=colour(i), marker="o")
        ax0.plot(rs, [p.bf16_bytes / _MIB for p in pts], color=colour(i), marker="s",
                 linestyle="--")
        ax1.plot(rs, [p.int8_us for p in pts], color=colour(i), marker="o")
        ax1.plot(rs, [p.bf16_us for p in pts], color=colour(i), marker="s", linestyle="--")
    over = points[0].overhead_us
    ax1.axhline(over, color="0.4", linestyle=":", label=f"fixed cost per call {over:.0f} us")
    for ax in (ax0, ax1):
        ax.set_xscale("log", base=2)
        rs = sorted({p.ranks for p in points})
        ax.set_xticks(rs, [str(r) for r in rs])
        ax.set_xlabel("EP ranks R (log2 scale)")
    ax0.set(title="dispatch bytes the busiest rank sends over links",
            ylabel="MiB per step")
    ax1.set(title="modelled dispatch phase time", ylabel="us per step (model)")
    handles = [Line2D([], [], color=colour(i), label=p) for i, p in enumerate(presets)]
    handles += [Line2D([], [], color="0.3", marker="o", label="INT8 row + FP32 scale"),
                Line2D([], [], color="0.3", marker="s", linestyle="--", label="BF16 row"),
                Line2D([], [], color="0.4", linestyle=":", label=f"fixed cost per call "
                                                                 f"({over:.0f} us)")]
    ax1.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
               frameon=False)
    fig.suptitle(title)
    return fig


def plot_agreement_margin(comparisons: Sequence[Comparison], title: str) -> Figure:
    """One row per comparison, one dot per rank (rank colours): the worst element's
    error as a share of ratio_reldiff's threshold (log x; 1 = threshold). Bit-identical
    runs have no error and sit in a band at the left, labelled."""
    if not comparisons:
        raise ValueError("plot_agreement_margin needs at least one comparison")
    fig, (ax,) = new_figure(10.0, 1.4 + 0.85 * len(comparisons))
    ratios = [a.worst_ratio for c in comparisons for a in c.per_rank
              if not a.bit_identical and a.worst_ratio > 0 and math.isfinite(a.worst_ratio)]
    lo = 10 ** math.floor(math.log10(min(ratios + [1e-3]))) / 10
    hi = max(10.0, 3 * max(ratios + [1.0]))
    n_ranks = max(len(c.per_rank) for c in comparisons)
    for y, c in enumerate(comparisons):
        for a in c.per_rank:
            x = lo if a.bit_identical or a.worst_ratio <= 0 else min(a.worst_ratio, hi)
            dy = (a.rank - (len(c.per_rank) - 1) / 2) * 0.12
            ax.plot([x], [y + dy], marker="o", markersize=8, color=rank_colour(a.rank),
                    linestyle="none")
        if c.bit_identical:
            note = "bit-identical on every rank (0 differing bits)"
        else:
            note = (f"worst {c.worst_ratio:.2g}x the threshold; bad points use "
                    f"{100 * c.bad_share_of_allowance:.0f} % of the {100 * c.pct_thd:g} % "
                    f"allowed")
        ax.annotate(note, (lo, y - 0.3), xytext=(14, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.axvline(1.0, color=colour(5), linestyle="--", label="threshold (error ratio 1)")
    ax.set_xscale("log")
    ax.set_xlim(lo / 1.5, hi)
    decades = range(round(math.log10(lo)) + 1, math.ceil(math.log10(hi)) + 1)
    ax.set_xticks([lo] + [10.0 ** k for k in decades],
                  ["exact"] + [f"$10^{{{k}}}$" for k in decades])
    ax.set_ylim(-0.6, len(comparisons) - 0.4)
    ax.set_yticks(range(len(comparisons)), [c.label for c in comparisons])
    ax.invert_yaxis()
    handles = [Line2D([], [], marker="o", color=rank_colour(r), linestyle="none",
                      label=f"rank {r}") for r in range(n_ranks)]
    handles.append(Line2D([], [], color=colour(5), linestyle="--",
                          label="threshold: error ratio 1"))
    legend_outside(ax, handles)
    ax.set(title=title, xlabel="worst element's error / ratio_reldiff threshold "
                               "(log scale; 'exact': no error)")
    return fig


def error_ratio_bins(ratio: torch.Tensor, lowest: float = ERROR_RATIO_LOWEST
                     ) -> list[tuple[str, int]]:
    """Counts of elements by error / threshold: 'exact' (0), one bin per decade from
    `lowest` up to 1, and '> 1' (bad points); the first decade also holds anything
    smaller than `lowest`."""
    r = ratio.reshape(-1).to(torch.float64)
    out = [("exact", int((r == 0).sum()))]
    k0 = round(math.log10(lowest))
    for k in range(k0, 0):
        lo_, hi_ = (0.0 if k == k0 else 10.0 ** k), 10.0 ** (k + 1)
        out.append((f"≤ 1e{k + 1}" if k + 1 < 0 else "≤ 1",
                    int(((r > lo_) & (r <= hi_)).sum())))
    out.append(("> 1 (bad)", int((r > 1).sum())))
    return out


def plot_error_ratio_hist(ratio: torch.Tensor, title: str, pct_thd: float) -> Figure:
    """Bars of elements by error / threshold (exact, per decade up to 1, over it), on a
    log count axis with each count printed; the allowed number of bad points marked."""
    bins = error_ratio_bins(ratio)
    n = ratio.numel()
    fig, (ax,) = new_figure(8.5, 4.2)
    xs = list(range(len(bins)))
    counts = [c for _, c in bins]
    colours = [colour(2)] + [colour(4)] * (len(bins) - 2) + [colour(5)]
    ax.bar(xs, [max(c, 0.5) if c else 0 for c in counts], color=colours, width=0.7)
    for x, c in zip(xs, counts, strict=True):
        ax.annotate(f"{c:,}", (x, max(c, 1)), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=9)
    allowed = round(pct_thd * n)
    ax.axhline(max(allowed, 1), color=colour(5), linestyle="--",
               label=f"bad points allowed: {pct_thd:.0%} of {n:,} = {allowed:,}")
    ax.set_yscale("log")
    ax.set_ylim(0.5, 3 * n)
    ax.set_xticks(xs, [b for b, _ in bins])
    ax.set(title=title, xlabel="element's |error| / ratio_reldiff threshold (bins by "
                               "decade; 1 = the threshold)", ylabel="elements (log scale)")
    legend_outside(ax)
    return fig
