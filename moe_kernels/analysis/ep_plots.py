"""Figures of the dispatch and combine notebooks: count / offset matrices, receive
windows coloured by source rank, bytes per channel, overflow, routed_y_buf row sources
and per-rank agreement. Same conventions as `plots` (Agg canvas, Okabe-Ito palette,
titles, units, legends outside the axes; save with `plots.save_figure`)."""
from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .agreement import Comparison
from .plots import OKABE_ITO, SLOT_LABELS_MAX, colour, new_figure

#: Colour of an empty window slot / a dropped route.
EMPTY_COLOUR = "#EEEEEE"
#: Figure height cap (inches) of the per-rank panel stacks.
MAX_HEIGHT = 16.0
#: Row-source and reduce plots show at most this many tokens.
TOKENS_SHOWN = 32


#: Axes titles wrap at this many characters so they never run past the figure edge.
TITLE_WIDTH = 60


def _wrap(title: str) -> str:
    return "\n".join(textwrap.wrap(title, TITLE_WIDTH)) or title


def _text_colour(v: float, lo: float, hi: float) -> str:
    """Black on the bright end of cividis, white on the dark end."""
    return "black" if hi > lo and (v - lo) / (hi - lo) > 0.55 else "white"


def _legend_handles(ranks: int, empty_label: str) -> list[Patch]:
    return ([Patch(color=colour(r), label=f"source rank {r}") for r in range(ranks)]
            + [Patch(color=EMPTY_COLOUR, label=empty_label)])


def _rank_cmap(ranks: int) -> ListedColormap:
    """Index 0 = empty, 1 + r = rank r's palette colour."""
    return ListedColormap([EMPTY_COLOUR] + [colour(r) for r in range(ranks)])


def plot_expert_matrix(mat: torch.Tensor, title: str, cbar_label: str) -> Figure:
    """Heatmap of a [R(src), R(dst), NL] tensor: rows = source rank, columns = global
    expert dst·NL + e, destination-rank blocks separated, values printed when small."""
    if mat.dim() != 3 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"mat must be [R, R, NL], got shape {tuple(mat.shape)}")
    r, _, nl = mat.shape
    img = mat.reshape(r, r * nl).to(torch.float64)
    fig, (ax,) = new_figure(min(14.0, max(6.0, 0.32 * r * nl + 2.5)),
                            min(8.0, max(2.6, 0.45 * r + 1.8)))
    im = ax.imshow(img.numpy(), aspect="auto", cmap="cividis", interpolation="nearest")
    ax.grid(False)
    if img.numel() <= SLOT_LABELS_MAX:
        lo, hi = float(img.min()), float(img.max())
        for i in range(r):
            for j in range(r * nl):
                v = float(img[i, j])
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7,
                        color=_text_colour(v, lo, hi))
    for d in range(1, r):
        ax.axvline(d * nl - 0.5, color=OKABE_ITO[5], linewidth=1.5)
    for d in range(r):
        ax.text((d + 0.5) * nl - 0.5, -0.02, f"dst rank {d}", ha="center", va="top",
                transform=ax.get_xaxis_transform(), fontsize=8)
    ax.xaxis.set_label_coords(0.5, -0.14)
    step = 1 if r * nl <= 32 else max(1, nl // 2)
    ax.set_xticks(range(0, r * nl, step))
    ax.xaxis.tick_top()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_yticks(range(r))
    ax.set(title=_wrap(title), xlabel="global expert g = dst·NL + e (top axis), grouped by "
                               "destination rank", ylabel="source rank src")
    fig.colorbar(im, ax=ax, label=cbar_label)
    return fig


def plot_receive_windows(src_map: torch.Tensor, route_map: torch.Tensor, title: str
                         ) -> Figure:
    """Every rank's receive window [NL, C] (rows = local expert, columns = slot),
    coloured by the source rank that filled each slot; r_route printed in the cells when
    there are few of them. src_map / route_map [R, NL, C] from layout.receive_map()."""
    if src_map.shape != route_map.shape or src_map.dim() != 3:
        raise ValueError(f"src_map and route_map must both be [R, NL, C], got "
                         f"{tuple(src_map.shape)} and {tuple(route_map.shape)}")
    r, nl, c = src_map.shape
    height = min(MAX_HEIGHT, max(2.4, r * (0.28 * nl + 0.9)))
    fig, axes = new_figure(min(14.0, max(6.5, 0.35 * c + 3.0)), height, nrows=r)
    labels = src_map.numel() <= SLOT_LABELS_MAX
    cmap = _rank_cmap(r)
    for d, ax in enumerate(axes):
        ax.grid(False)
        ax.imshow((src_map[d] + 1).numpy(), cmap=cmap, vmin=0, vmax=r, aspect="auto",
                  interpolation="nearest")
        n_used = (src_map[d] >= 0).sum(dim=1).tolist()
        if labels:
            for e in range(nl):
                for s in range(c):
                    if int(src_map[d, e, s]) >= 0:
                        ax.text(s, e, str(int(route_map[d, e, s])), ha="center",
                                va="center", fontsize=7)
        ax.set_yticks(range(nl))
        ax.set_yticklabels([f"e{e} ({n})" for e, n in enumerate(n_used)], fontsize=7)
        ax.set_ylabel(f"rank {d}\nlocal expert\n(rows used)", fontsize=8)
        ax.set_xticks(range(0, c, 1 if c <= 32 else max(1, c // 16)))
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title + ("\n(cell text: r_route = t·K + k on the source rank)"
                          if labels else ""))
    axes[-1].set_xlabel(f"slot (0 .. capacity-1 = {c - 1}); window row = e·C + slot")
    axes[0].legend(handles=_legend_handles(r, "empty (never read)"), loc="upper left",
                   bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def plot_channel_bytes(per_peer: Mapping[str, torch.Tensor], title: str) -> Figure:
    """Left: dispatch bytes (all four channels) per (from, to) rank pair, in KiB.
    Right: bytes each rank sends per channel (log scale), link and self traffic."""
    chans = list(per_peer)
    first = per_peer[chans[0]]
    r = first.shape[0]
    disp = sum((per_peer[c].to(torch.int64) for c in chans if c != "combine"),
               torch.zeros_like(first, dtype=torch.int64))
    fig, (ax0, ax1) = new_figure(11.5, 4.2, ncols=2)
    kib = disp.to(torch.float64) / 1024
    im = ax0.imshow(kib.numpy(), cmap="cividis", interpolation="nearest")
    ax0.grid(False)
    if r * r <= 64:
        for i in range(r):
            for j in range(r):
                ax0.text(j, i, f"{float(kib[i, j]):.1f}", ha="center", va="center",
                         fontsize=7, color=_text_colour(float(kib[i, j]), float(kib.min()),
                                                        float(kib.max())))
    ax0.set_xticks(range(r))
    ax0.set_yticks(range(r))
    ax0.set(title="dispatch bytes per peer (all 4 channels)",
            xlabel="to rank (expert owner)", ylabel="from rank (token origin)")
    fig.colorbar(im, ax=ax0, label="KiB per step (diagonal: to itself)")
    width = 0.8 / max(len(chans), 1)
    for i, ch in enumerate(chans):
        sent = per_peer[ch].to(torch.float64).sum(dim=1)
        x = torch.arange(r, dtype=torch.float64) - 0.4 + width * (i + 0.5)
        ax1.bar(x.numpy(), sent.numpy(), width=width, color=colour(i),
                label=ch + (" (owner -> origin)" if ch == "combine" else ""))
    ax1.set_yscale("log")
    ax1.set_xticks(range(r))
    ax1.set(title="bytes sent per rank and channel", xlabel="sending rank",
            ylabel="bytes per step (log scale)")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def plot_overflow(placed: torch.Tensor, dropped: torch.Tensor, capacity: int, title: str
                  ) -> Figure:
    """Stacked bars per global expert: rows placed and routes dropped at `capacity`
    (placed / dropped [R, NL])."""
    if placed.shape != dropped.shape or placed.dim() != 2:
        raise ValueError(f"placed and dropped must both be [R, NL], got "
                         f"{tuple(placed.shape)} and {tuple(dropped.shape)}")
    r, nl = placed.shape
    p = placed.reshape(-1).to(torch.float64)
    d = dropped.reshape(-1).to(torch.float64)
    x = torch.arange(r * nl)
    fig, (ax,) = new_figure(8.0, 4.0)
    ax.bar(x.numpy(), p.numpy(), color=colour(1), label="placed (slot < capacity)")
    ax.bar(x.numpy(), d.numpy(), bottom=p.numpy(), color=colour(5),
           label="dropped (slot -1, zero contribution)")
    ax.axhline(capacity, color="0.2", linestyle="--",
               label=f"reduced capacity = {capacity} rows")
    for b in range(1, r):
        ax.axvline(b * nl - 0.5, color="0.6", linewidth=0.8)
    step = 1 if r * nl <= 32 else max(1, nl // 2)
    ax.set_xticks(range(0, r * nl, step))
    ax.tick_params(axis="x", labelsize=7)
    ax.set(title=_wrap(title), xlabel="global expert g = rank·NL + e (rank blocks split by "
                               "grey lines)", ylabel="routes to the expert (rows)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def plot_row_sources(owner: torch.Tensor, expert: torch.Tensor, title: str,
                     max_tokens: int = TOKENS_SHOWN) -> Figure:
    """Per origin rank, its routed_y_buf rows as a K x T grid (row k, column t; row id
    t·K + k) coloured by the rank whose expert computed and pushed it back; the global
    expert id printed in the cell when few. owner / expert [R, T, K]."""
    if owner.shape != expert.shape or owner.dim() != 3:
        raise ValueError(f"owner and expert must both be [R, T, K], got "
                         f"{tuple(owner.shape)} and {tuple(expert.shape)}")
    r, t, k = owner.shape
    tt = min(t, max_tokens)
    fig, axes = new_figure(min(14.0, max(6.0, 0.32 * tt + 3.0)),
                           min(MAX_HEIGHT, max(2.4, r * (0.3 * k + 1.0))), nrows=r)
    labels = r * tt * k <= SLOT_LABELS_MAX
    cmap = _rank_cmap(r)
    for o, ax in enumerate(axes):
        ax.grid(False)
        ax.imshow((owner[o, :tt].t() + 1).numpy(), cmap=cmap, vmin=0, vmax=r,
                  aspect="auto", interpolation="nearest")
        if labels:
            for j in range(k):
                for i in range(tt):
                    ax.text(i, j, str(int(expert[o, i, j])), ha="center", va="center",
                            fontsize=7)
        ax.set_yticks(range(k))
        ax.set_yticklabels([f"k={j}" for j in range(k)], fontsize=7)
        ax.set_ylabel(f"origin rank {o}", fontsize=8)
        ax.set_xticks(range(0, tt, 1 if tt <= 32 else 4))
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title + ("\n(cell text: global expert that computed the row)"
                          if labels else ""))
    axes[-1].set_xlabel(f"token t (first {tt} of {t}); routed_y_buf row = t·K + k")
    handles = [Patch(color=colour(q), label=f"computed on rank {q}") for q in range(r)]
    handles.append(Patch(color=EMPTY_COLOUR, label="dropped (zero row)"))
    axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   fontsize=8, frameon=False)
    return fig


def plot_agreement(comparisons: Sequence[Comparison], title: str) -> Figure:
    """Per rank and comparison: max |error| (left, symlog; 'bit-identical' marked) and
    the fraction of points over diff_thd against the allowed pct_thd (right)."""
    if not comparisons:
        raise ValueError("plot_agreement needs at least one comparison")
    r = len(comparisons[0].per_rank)
    fig, (ax0, ax1) = new_figure(12.0, 4.2, ncols=2)
    width = 0.8 / len(comparisons)
    for i, c in enumerate(comparisons):
        x = torch.arange(r, dtype=torch.float64) - 0.4 + width * (i + 0.5)
        err = [a.max_abs_err for a in c.per_rank]
        frac = [a.reldiff.bad_fraction for a in c.per_rank]
        ax0.bar(x.numpy(), err, width=width, color=colour(i), label=c.label)
        ax1.bar(x.numpy(), frac, width=width, color=colour(i), label=c.label)
        for xi, a in zip(x.tolist(), c.per_rank, strict=True):
            if a.bit_identical:
                ax0.text(xi, 0.0, " bit-identical", ha="center", va="bottom",
                         fontsize=7, rotation=90)
    worst = max(c.max_abs_err for c in comparisons)
    worst_frac = max(a.reldiff.bad_fraction for c in comparisons for a in c.per_rank)
    ax0.set_yscale("symlog", linthresh=1e-3)
    ax0.set_ylim(0, max(1e-2, 3 * worst))
    pct = comparisons[0].pct_thd
    ax1.set_ylim(0, max(1.3 * pct, 1.1 * worst_frac))
    ax1.axhline(pct, color="0.2", linestyle="--", label=f"allowed fraction pct_thd={pct:g}")
    for ax in (ax0, ax1):
        ax.set_xticks(range(r))
        ax.set_xlabel("rank")
    ax0.set(title="max |x_next - expected| per rank",
            ylabel="max absolute error (x_next units, symlog)")
    ax1.set(title=f"ratio_reldiff: points over diff_thd={comparisons[0].diff_thd:g}",
            ylabel="fraction of x_next elements (unitless)")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def plot_residuals(actual: torch.Tensor, expected: torch.Tensor, title: str, xlabel: str,
                   diff_thd: float, max_points: int = 20000) -> Figure:
    """Error (actual - expected) against the expected value for an evenly spaced
    subsample of elements, with ratio_reldiff's bound: a point is bad when
    |err| >= diff_thd and |err| / max(|actual|, |expected|) > diff_thd."""
    a = actual.detach().reshape(-1).to(torch.float64)
    e = expected.detach().reshape(-1).to(torch.float64)
    if a.numel() != e.numel() or a.numel() == 0:
        raise ValueError(f"actual and expected must have as many elements (> 0), got "
                         f"{a.numel()} and {e.numel()}")
    if not diff_thd > 0:
        raise ValueError(f"diff_thd must be > 0, got {diff_thd!r}")
    step = max(1, a.numel() // max_points)
    a, e = a[::step], e[::step]
    err = a - e
    bad = (err.abs() >= diff_thd) & (err.abs() / torch.maximum(a.abs(), e.abs()).clamp_min(
        1e-30) > diff_thd)
    fig, (ax,) = new_figure(7.0, 4.2)
    shown = f"all {a.numel()}" if step == 1 else f"{a.numel()} (every {step}th)"
    ax.scatter(e[~bad].numpy(), err[~bad].numpy(), s=3, color=colour(4), alpha=0.5,
               label=f"elements within tolerance ({shown} shown)")
    ax.scatter(e[bad].numpy(), err[bad].numpy(), s=6, color=colour(5),
               label=f"over diff_thd ({int(bad.sum())} shown)")
    lo, hi = float(e.min()), float(e.max())
    xs = torch.linspace(lo, hi, 201, dtype=torch.float64)
    bound = torch.maximum(xs.abs() * diff_thd, torch.full_like(xs, diff_thd))
    ax.plot(xs.numpy(), bound.numpy(), color="0.2", linestyle="--",
            label=f"max(diff_thd, diff_thd·|x|), diff_thd={diff_thd:g}")
    ax.plot(xs.numpy(), (-bound).numpy(), color="0.2", linestyle="--")
    ax.set(title=_wrap(title), xlabel=xlabel, ylabel="actual - expected (same units)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig
