"""The workbook's figure style, shared by every notebook: palettes (series, ranks,
stages), the output resolution, the smallest font, the footer that names a figure's
source and plotted shape, and the checks run on every figure before it is saved
(fonts readable at 50 % zoom, log axes named as log).

Rules a design review can rely on:

* rank r has the same colour in every figure (`rank_colour`);
* every stage of the layer and every communication phase has its own colour, none
  repeated (`stage_colour`);
* the source (`SOURCES`) and the shape sit in a fixed footer, never in the title;
* PNGs are written at `FIG_DPI`; no text is smaller than `MIN_FONT_PT`.
"""
from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.text import Text

from ..stages import STAGE_NAMES

#: Okabe & Ito (2008) colour-blind-safe palette for series that are not ranks or stages:
#: orange, sky blue, bluish green, yellow, blue, vermillion, reddish purple, black.
OKABE_ITO: tuple[str, ...] = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2",
                              "#D55E00", "#CC79A7", "#000000")
#: One colour per rank, the same in every figure (ranks 0-7 colour-blind safe, 8-15
#: from Paul Tol's muted scheme; wraps after 16).
RANK_COLOURS: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9",
                                 "#CC79A7", "#F0E442", "#555555", "#332288", "#88CCEE",
                                 "#117733", "#DDCC77", "#882255", "#44AA99", "#999933",
                                 "#AA4499")
#: Communication phases of an EP step, drawn beside the compute stages.
COMM_PHASES: tuple[str, ...] = ("count", "dispatch", "combine", "wait")
#: One colour per compute stage (stages.STAGE_NAMES) and communication phase (greys,
#: dark to light in step order); no two are the same.
STAGE_COLOURS: dict[str, str] = {
    "hc_pre": "#332288", "gate": "#88CCEE", "expert_shared": "#44AA99",
    "pack_routes": "#117733", "expert_routed": "#999933", "scatter_routes": "#DDCC77",
    "reduce_routes": "#CC6677", "hc_post": "#AA4499",
    "count": "#E0E0E0", "dispatch": "#A8A8A8", "combine": "#707070", "wait": "#383838"}
#: Output resolution of every saved PNG (dots per inch): 150 keeps 9 pt text about 9 px
#: high when a slide shows the figure at 50 %.
FIG_DPI = 150
#: Smallest font size (points) of any text in a saved figure.
MIN_FONT_PT = 9.0
#: Font size (points) of the footer.
FOOTER_PT = 9.0
#: Height of the footer band (inches) reserved below the axes.
FOOTER_IN = 0.32
#: Where a figure's numbers come from (the first word of a footer's source):
#: computed = torch reference / layout logic on CPU over seeded fixtures (exact, no
#: timing); sim = pypto's SIM cost model; model = an analytical model (shapes, alpha-beta
#: communication); published = a publication; measured = timed on hardware.
SOURCES: tuple[str, ...] = ("computed", "sim", "model", "published", "measured")
_FOOTER_GID = "moe-footer"


def colour(i: int) -> str:
    """The i-th series colour (Okabe-Ito, cycling after 8)."""
    return OKABE_ITO[i % len(OKABE_ITO)]


def rank_colour(rank: int) -> str:
    """Rank `rank`'s colour, the same in every figure."""
    return RANK_COLOURS[rank % len(RANK_COLOURS)]


def stage_colour(name: str) -> str:
    """The colour of a compute stage or communication phase; ValueError names them all.
    A suffix in parentheses is ignored ("dispatch (model)" -> dispatch)."""
    key = name.split(" (")[0].strip()
    if key not in STAGE_COLOURS:
        raise ValueError(f"stage must be one of {list(STAGE_NAMES) + list(COMM_PHASES)}, "
                         f"got {name!r}")
    return STAGE_COLOURS[key]


def check_source(source: str) -> str:
    """`source` if its first word (before ':') is one of SOURCES, else ValueError."""
    kind = source.split(":", 1)[0].strip() if isinstance(source, str) else None
    if kind not in SOURCES:
        raise ValueError(f"source must start with one of {list(SOURCES)} (optionally "
                         f"'kind: detail'), got {source!r}")
    return source


def shape_label(preset: str, ranks: int | str | None = None, tokens: int | None = None,
                capacity: int | None = None, **extra: Any) -> str:
    """The plotted shape as the footer prints it: 'demo · R=2 · T=128/rank · C=128'
    (fields left None are omitted; `extra` adds 'name=value' items in order)."""
    parts = [str(preset)]
    if ranks is not None:
        parts.append(f"R={ranks}")
    if tokens is not None:
        parts.append(f"T={tokens}/rank")
    if capacity is not None:
        parts.append(f"C={capacity}")
    parts += [f"{k}={v}" for k, v in extra.items()]
    return " · ".join(parts)


def run_shape(run: Any, capacity: int | None = None, **extra: Any) -> str:
    """shape_label of a RunConfig (preset, R, T, C = its receive capacity)."""
    return shape_label(run.model.name, run.ranks, run.tokens,
                       run.recv_max if capacity is None else capacity, **extra)


def add_footer(fig: Figure, source: str, shape: str) -> None:
    """Write 'source: ... | shape: ...' in a fixed band at the bottom of `fig`, below
    the axes (replaces an earlier footer of the same figure)."""
    check_source(source)
    if not isinstance(shape, str) or not shape.strip():
        raise ValueError(f"shape must be a non-empty string, got {shape!r}")
    for t in [t for t in fig.texts if t.get_gid() == _FOOTER_GID]:
        t.remove()
    width, height = fig.get_size_inches()
    text = f"source: {source}   |   shape: {shape}"
    lines = 1
    if len(text) * 0.55 * FOOTER_PT / 72 > 0.97 * width:   # too wide: one field a line
        text, lines = f"source: {source}\nshape: {shape}", 2
    band = min(0.3, (FOOTER_IN + (lines - 1) * 1.25 * FOOTER_PT / 72) / height)
    fig.text(0.01, 0.06 / height, text, ha="left", va="bottom", fontsize=FOOTER_PT,
             color="0.3", gid=_FOOTER_GID)
    engine = fig.get_layout_engine()
    if isinstance(engine, ConstrainedLayoutEngine):
        engine.set(rect=(0.0, band, 1.0, 1.0 - band))
    for leg in fig.legends:  # an "outside lower" legend would sit on the footer band
        if getattr(leg, "_outside_loc", None) == "lower" and leg._bbox_to_anchor is None:
            leg.set_loc("outside upper center")


def footer_text(fig: Figure) -> str | None:
    """The footer of `fig` (None if it has none)."""
    return next((t.get_text() for t in fig.texts if t.get_gid() == _FOOTER_GID), None)


def _log_named(ax: Axes) -> None:
    for scale, get, set_ in ((ax.get_xscale(), ax.get_xlabel, ax.set_xlabel),
                             (ax.get_yscale(), ax.get_ylabel, ax.set_ylabel)):
        label = get()
        if scale in ("log", "symlog") and label and "log" not in label.lower():
            set_(f"{label} ({scale} scale)")


def _fit(text: Text, width_in: float) -> None:
    """Wrap a title that would run past `width_in` inches (about 0.55 em per char)."""
    s = text.get_text()
    chars = max(20, int(width_in * 72 / (0.55 * text.get_fontsize())))
    if s and max(len(line) for line in s.splitlines()) > chars:
        text.set_text("\n".join(textwrap.wrap(" ".join(s.split()), chars)))


def readable(fig: Figure, min_pt: float = MIN_FONT_PT) -> None:
    """Raise every text of `fig` (titles, labels, ticks, legends, annotations, cell
    text) to at least `min_pt` points, wrap titles wider than the figure, and name log
    axes as log."""
    width = fig.get_size_inches()[0]
    if fig._suptitle is not None:
        _fit(fig._suptitle, 0.95 * width)
    for ax in fig.axes:
        _fit(ax.title, 0.95 * width * ax.get_position().width)
        _log_named(ax)
        for axis in ("x", "y"):
            labels = getattr(ax, f"get_{axis}ticklabels")()
            if labels and min(t.get_fontsize() for t in labels) < min_pt:
                ax.tick_params(axis=axis, labelsize=min_pt)
    for t in fig.findobj(Text):
        if t.get_fontsize() < min_pt:
            t.set_fontsize(min_pt)


def legend_outside(ax: Axes, handles: list | None = None, **kw: Any) -> None:
    """A legend outside the axes on the right, so it never hides data."""
    opts: Mapping[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0),
                               "fontsize": MIN_FONT_PT, "frameon": False, **kw}
    if handles is None:
        ax.legend(**opts)
    else:
        ax.legend(handles=handles, **opts)
