"""Figures for review: Agg canvas, Okabe-Ito palette, titles, axis units, legends, and
byte-reproducible PNGs.

Figures are built as `matplotlib.figure.Figure` objects with an explicit Agg canvas, so
nothing here touches pyplot's global backend or figure registry (importing this module
has no side effect on an interactive session). `save_figure` writes PNGs with a fixed
dpi and without the date/Software stamps, so the same run writes the same bytes.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import PlaceHolderLayoutEngine
from matplotlib.patches import Patch

from ..atomic import write_atomic
from .style import FIG_DPI, colour, legend_outside, readable
from .whatif import near_overflow

#: Expert-load plots draw grouped bars up to this many experts, step lines beyond.
BARS_MAX = 64
#: Near-overflow labels drawn per series in expert-load plots (the fullest first).
NEAR_MARKS = 3
#: Slot maps print expert ids in cells only up to this many cells.
SLOT_LABELS_MAX = 400
#: PNG metadata: matplotlib writes a "Software" key by default; None drops it.
PNG_METADATA: dict[str, str | None] = {"Software": None}



def new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1, nrows: int = 1
               ) -> tuple[Figure, list]:
    """A Figure with an Agg canvas and its axes (flat list), constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
    return fig, axes


def figure_png(fig: Figure, dpi: int = FIG_DPI) -> bytes:
    """The figure's PNG bytes (fixed dpi, no date or Software metadata), after
    `style.readable` (no text under MIN_FONT_PT, log axes named).

    Constrained layout moves axes a little on every draw until it settles, so a second
    save of the same figure would differ from the first; the layout is therefore run
    once and then frozen (layout engine 'none') before rendering."""
    readable(fig)
    engine = fig.get_layout_engine()
    if engine is not None and not isinstance(engine, PlaceHolderLayoutEngine):
        fig.set_dpi(dpi)
        engine.execute(fig)
        fig.set_layout_engine("none")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=PNG_METADATA)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = FIG_DPI) -> Path:
    """Write `fig` as a deterministic PNG to `path` (parents created, atomic replace)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, figure_png(fig, dpi))


def _legend(ax) -> None:
    """Legend outside the axes on the right, so it never hides data."""
    legend_outside(ax)


def _headroom(ax, frac: float = 0.12) -> None:
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + (hi - lo) * frac)


def _rank_spans(ax, n_experts: int, n_local: int) -> None:
    for r in range(n_experts // n_local):
        if r % 2:
            ax.axvspan(r * n_local - 0.5, (r + 1) * n_local - 0.5, color="0.92", zorder=0)
        ax.text((r + 0.5) * n_local - 0.5, 0.98, f"rank {r}", ha="center", va="top",
                transform=ax.get_xaxis_transform(), fontsize=8)


def plot_gate_scores(score: torch.Tensor, indices: torch.Tensor, title: str,
                     max_tokens: int = 32) -> Figure:
    """Heatmap of scores [T,E] (first max_tokens tokens) with each token's selected
    experts indices [T,K] marked."""
    s = score[:max_tokens].to(torch.float32)
    idx = indices[:max_tokens].to(torch.int64)
    fig, (ax,) = new_figure(7.5, 4.2)
    im = ax.imshow(s.t().numpy(), aspect="auto", cmap="cividis", interpolation="nearest")
    t = torch.arange(idx.shape[0]).repeat_interleave(idx.shape[1])
    ax.scatter(t.numpy(), idx.reshape(-1).numpy(), marker="o", s=18, facecolors="none",
               edgecolors=colour(5), linewidths=1.2, label="selected expert")
    ax.grid(False)
    ax.set(title=title, xlabel=f"token t (first {s.shape[0]})",
           ylabel="global expert id")
    fig.colorbar(im, ax=ax, label="score = sqrt(softplus(logit)) (unitless)")
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    return fig


def plot_weight_hist(series: Mapping[str, torch.Tensor], title: str, bins: int = 30
                     ) -> Figure:
    """Histograms of routing weights, one series per label."""
    fig, (ax,) = new_figure(6.5, 3.8)
    for i, (label, w) in enumerate(series.items()):
        ax.hist(w.reshape(-1).to(torch.float64).numpy(), bins=bins, alpha=0.6,
                color=colour(i), label=label)
    ax.set(title=title, xlabel="routing weight (unitless, sums to routed_scaling_factor "
                               "per token)", ylabel="routes (count)")
    _legend(ax)
    return fig


def _mark_near_overflow(ax, loads: Mapping[str, torch.Tensor], capacity: int,
                        width: float) -> None:
    """Label the fullest experts within NEAR_OVERFLOW of `capacity` (or over it):
    'e7 127/128' above the bar, at most NEAR_MARKS per series."""
    for i, load in enumerate(loads.values()):
        for n in near_overflow(load, capacity)[:NEAR_MARKS]:
            x = n.expert - 0.4 + width * (i + 0.5) if load.numel() <= BARS_MAX else n.expert
            ax.annotate(f"e{n.expert} {n.load}/{capacity}", (x, n.load), xytext=(0, 4),
                        textcoords="offset points", ha="center", va="bottom", fontsize=9,
                        color=colour(5) if n.headroom < 0 else "black")


def plot_expert_load(loads: Mapping[str, torch.Tensor], n_local: int, title: str,
                     capacity: int | None = None) -> Figure:
    """Grouped bars of routes per global expert, one series per label, rank blocks
    shaded; an optional per-expert receive capacity line."""
    fig, (ax,) = new_figure(8.0, 4.0)
    n = len(loads)
    width = 0.8 / max(n, 1)
    n_experts = 0
    for i, (label, load) in enumerate(loads.items()):
        n_experts = load.numel()
        y = load.to(torch.float64).numpy()
        if n_experts > BARS_MAX:  # sub-pixel bars vanish: draw steps instead
            ax.step(range(n_experts), y, where="mid", color=colour(i), label=label,
                    linewidth=1.0)
            continue
        x = torch.arange(n_experts, dtype=torch.float64) - 0.4 + width * (i + 0.5)
        ax.bar(x.numpy(), y, width=width, color=colour(i), label=label)
    if capacity is not None:
        ax.axhline(capacity, color=colour(5), linestyle="--",
                   label=f"receive capacity C = {capacity} rows per expert")
        _mark_near_overflow(ax, loads, capacity, width)
    _headroom(ax, 0.2 if capacity is not None else 0.12)
    _rank_spans(ax, n_experts, n_local)
    ax.set(title=title, xlabel="global expert id", ylabel="routes received (rows)")
    step = 1 if n_experts <= 32 else 1 << max(0, (n_experts // 16 - 1).bit_length())
    ax.set_xticks(range(0, n_experts, step))
    ax.tick_params(axis="x", labelsize=7)
    _legend(ax)
    return fig


def plot_rank_load(loads: Mapping[str, torch.Tensor], title: str,
                   ylabel: str = "routes received (rows)") -> Figure:
    """Grouped bars of per-rank load, one series per label, with each series' mean as a
    dotted line and its busiest rank annotated with max/mean."""
    fig, (ax,) = new_figure(7.0, 4.0)
    n = len(loads)
    width = 0.8 / max(n, 1)
    for i, (label, load) in enumerate(loads.items()):
        lf = load.to(torch.float64)
        x = torch.arange(lf.numel(), dtype=torch.float64) - 0.4 + width * (i + 0.5)
        ax.bar(x.numpy(), lf.numpy(), width=width, color=colour(i), label=label)
        mean = float(lf.mean())
        ax.axhline(mean, color=colour(i), linestyle=":", linewidth=1.5)
        b = int(torch.nonzero(lf == lf.max())[0, 0])
        ax.annotate(f"max/mean {float(lf.max()) / mean if mean else 1.0:.2f}",
                    (float(x[b]), float(lf[b])), ha="center", va="bottom", fontsize=8)
    ax.set(title=title, xlabel="rank", ylabel=ylabel)
    ax.set_xticks(range(next(iter(loads.values())).numel()))
    ax.plot([], [], color="0.3", linestyle=":", label="mean (per series)")
    _headroom(ax)
    _legend(ax)
    return fig


def plot_lines(x: Sequence[float], series: Mapping[str, Sequence[float]], title: str,
               xlabel: str, ylabel: str, reference: float | None = None,
               reference_label: str = "") -> Figure:
    """Line plot of several series over x with markers, optional horizontal reference."""
    fig, (ax,) = new_figure(6.5, 4.0)
    markers = "osD^vP*X"
    for i, (label, ys) in enumerate(series.items()):
        ax.plot(list(x), list(ys), marker=markers[i % len(markers)], color=colour(i),
                label=label)
    if reference is not None:
        ax.axhline(reference, color="0.4", linestyle="--", label=reference_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    _legend(ax)
    return fig


def plot_slot_map(placement: torch.Tensor, per_copy: torch.Tensor, title: str) -> Figure:
    """Rank x slot table of an expert placement [R,S] (-1 = unused slot): each cell is
    coloured by the rows its copy serves, per_copy [R,S] (load / copies, NaN if unused),
    and labelled with the expert id (xN when the expert has N copies) and those rows."""
    r, slots = placement.shape
    fig, (ax,) = new_figure(min(13.0, max(8.0, 0.7 * slots + 3.5)),
                            min(8.0, max(3.0, 0.7 * r + 1.8)))
    cmap = matplotlib.colormaps["cividis"].with_extremes(bad="0.85")
    im = ax.imshow(per_copy.to(torch.float64).numpy(), cmap=cmap, aspect="auto",
                   vmin=0.0)
    ids = placement.to(torch.int64)
    n_copies = torch.bincount(ids[ids >= 0], minlength=1)
    if r * slots <= SLOT_LABELS_MAX:  # beyond that the labels are unreadable; colours stay
        vmax = float(torch.nan_to_num(per_copy.to(torch.float64)).max())
        for i in range(r):
            for j in range(slots):
                g = int(ids[i, j])
                if g < 0:
                    continue
                rows = float(per_copy[i, j])
                tag = f"{g}x{int(n_copies[g])}" if int(n_copies[g]) > 1 else str(g)
                ax.text(j, i, f"{tag}\n{rows:.4g}", ha="center", va="center", fontsize=7,
                        color="black" if rows > 0.5 * vmax else "white")
    ax.grid(False)
    ax.set_xticks(range(0, slots, 1 if slots <= 32 else 8))
    ax.set_yticks(range(0, r, 1 if r <= 32 else 8))
    ax.set(title=title, ylabel="rank",
           xlabel="slot on the rank (index); cell: expert id (xN = N copies) over its "
                  "rows per copy")
    fig.colorbar(im, ax=ax, label="rows per copy = load / copies")
    fig.legend(handles=[Patch(color="0.85", label="unused\nredundant slot")],
               loc="outside right upper", fontsize=9, frameon=False)
    return fig
