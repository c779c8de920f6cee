"""Figures of the dispatch and combine notebooks: count / offset matrices, receive
windows coloured by source rank, link bytes per peer and channel, overflow and
routed_y_buf row sources. Same conventions as `plots` (Agg canvas, `style` palettes:
a rank has the same colour in every figure; legends outside the axes). Agreement
figures live in `review_plots`."""
from __future__ import annotations

import textwrap
from collections.abc import Mapping

import matplotlib
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .plots import SLOT_LABELS_MAX, new_figure
from .style import OKABE_ITO, colour, legend_outside, rank_colour

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
    return ([Patch(color=rank_colour(r), label=f"source rank {r}") for r in range(ranks)]
            + [Patch(color=EMPTY_COLOUR, label=empty_label)])


def _rank_cmap(ranks: int) -> ListedColormap:
    """Index 0 = empty, 1 + r = rank r's palette colour."""
    return ListedColormap([EMPTY_COLOUR] + [rank_colour(r) for r in range(ranks)])


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
    """Link traffic only, in KiB per step (a rank's rows to its own experts never cross a
    link and are left out). Left: dispatch bytes (four channels) per (from, to) pair,
    diagonal greyed. Right: link bytes each rank sends, stacked by channel."""
    chans = list(per_peer)
    first = per_peer[chans[0]]
    r = first.shape[0]
    eye = torch.eye(r, dtype=torch.bool)
    link = {c: per_peer[c].to(torch.float64).masked_fill(eye, 0.0) / 1024 for c in chans}
    disp = sum((link[c] for c in chans if c != "combine"), torch.zeros(r, r,
                                                                     dtype=torch.float64))
    fig, (ax0, ax1) = new_figure(12.0, 4.4, ncols=2)
    img = disp.masked_fill(eye, float("nan"))
    cmap = matplotlib.colormaps["cividis"].with_extremes(bad=EMPTY_COLOUR)
    im = ax0.imshow(img.numpy(), cmap=cmap, interpolation="nearest", vmin=0.0)
    ax0.grid(False)
    lo, hi = 0.0, float(torch.nan_to_num(img).max())
    if r * r <= 64:
        for i in range(r):
            for j in range(r):
                text = "self\n(no link)" if i == j else f"{float(disp[i, j]):.1f}"
                ax0.text(j, i, text, ha="center", va="center", fontsize=9,
                         color="0.3" if i == j else _text_colour(float(disp[i, j]), lo, hi))
    ax0.set_xticks(range(r))
    ax0.set_yticks(range(r))
    ax0.set(title="dispatch link bytes per peer (4 channels)",
            xlabel="to rank (expert owner)", ylabel="from rank (token origin)")
    fig.colorbar(im, ax=ax0, label="KiB per step")
    bottom = torch.zeros(r, dtype=torch.float64)
    for i, ch in enumerate(chans):
        sent = link[ch].sum(dim=1)
        ax1.bar(range(r), sent.numpy(), bottom=bottom.numpy(), width=0.6, color=colour(i),
                label=ch + (" (owner -> origin)" if ch == "combine" else ""))
        bottom += sent
    ax1.set_xticks(range(r))
    ax1.set(title="link bytes each rank sends, by channel", xlabel="sending rank",
            ylabel="KiB per step (linear)")
    legend_outside(ax1)
    fig.suptitle(_wrap(title))
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
    handles = [Patch(color=rank_colour(q), label=f"computed on rank {q}") for q in range(r)]
    handles.append(Patch(color=EMPTY_COLOUR, label="dropped (zero row)"))
    axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   fontsize=8, frameon=False)
    return fig
