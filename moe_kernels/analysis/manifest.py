"""figures/manifest.json: for every figure file, the notebook that made it, its
parameters, its source (computed / sim / model / published / measured, see
`style.SOURCES`), the shape it plots and the package version. Updates merge into the
file under a lock and are written atomically with stable key order and formatting, so
concurrent notebooks (a sweep) and repeated runs leave a clean, diff-friendly file."""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .. import __version__
from ..atomic import write_atomic
from .plots import save_figure
from .style import add_footer, check_source

MANIFEST_NAME = "manifest.json"
#: Bump when the manifest layout changes.
MANIFEST_SCHEMA = 2


def dumps_manifest(data: Mapping[str, Any]) -> str:
    """Stable JSON text: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def read_manifest(figures_dir: str | Path) -> dict[str, Any]:
    """The manifest in `figures_dir` (an empty one if the file does not exist)."""
    path = Path(figures_dir) / MANIFEST_NAME
    if not path.exists():
        return {"schema": MANIFEST_SCHEMA, "figures": {}}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("figures"), dict):
        raise ValueError(f"{path} is not a figures manifest (no 'figures' object)")
    return data


@contextmanager
def _locked(figures_dir: Path) -> Iterator[None]:
    """Exclusive lock on the folder itself (no lock file left behind in figures/)."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(figures_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_shape(shape: str) -> str:
    if not isinstance(shape, str) or not shape.strip():
        raise ValueError(f"shape must be a non-empty string (preset, R, T, C as plotted), "
                         f"got {shape!r}")
    return shape


def register_figure(figures_dir: str | Path, filename: str, notebook: str,
                    parameters: Mapping[str, Any], title: str = "", *, source: str,
                    shape: str, version: str = __version__) -> dict[str, Any]:
    """Add or replace the entry for `filename` (relative to figures_dir) in the manifest,
    merging with entries already there; returns the entry written. `source` starts with
    one of style.SOURCES ('model: alpha-beta, A3 UB'); `shape` is the plotted shape
    ('demo · R=2 · T=128/rank · C=128')."""
    fdir = Path(figures_dir)
    rel = Path(filename)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"filename must be relative to figures_dir, got {filename!r}")
    entry = {"notebook": notebook, "parameters": json.loads(json.dumps(dict(parameters))),
             "package_version": version, "source": check_source(source),
             "shape": _check_shape(shape)}
    if title:
        entry["title"] = title
    with _locked(fdir):
        data = read_manifest(fdir)
        data["schema"] = MANIFEST_SCHEMA
        data["figures"][rel.as_posix()] = entry
        write_atomic(fdir / MANIFEST_NAME, dumps_manifest(data))
    return entry


def _title_of(fig: Figure) -> str:
    """The suptitle, else the first axes' title (one line)."""
    sup = fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""
    text = sup or (fig.axes[0].get_title() if fig.axes else "")
    return " ".join(text.split())


def prune_notebook(figures_dir: str | Path, notebook: str, keep: set[str]) -> list[str]:
    """Remove the manifest entries (and PNG files) of `notebook` not named in `keep`:
    figures a notebook no longer writes. Returns the removed names."""
    fdir = Path(figures_dir)
    with _locked(fdir):
        data = read_manifest(fdir)
        gone = sorted(n for n, e in data["figures"].items()
                      if e.get("notebook") == notebook and n not in keep)
        for n in gone:
            del data["figures"][n]
            (fdir / n).unlink(missing_ok=True)
        if gone:
            write_atomic(fdir / MANIFEST_NAME, dumps_manifest(data))
    return gone


@dataclass
class FigureWriter:
    """Saves a notebook's figures into `figures_dir` under stable names and registers
    each in the manifest with the notebook's name and parameters."""

    figures_dir: Path
    notebook: str
    parameters: Mapping[str, Any]
    written: list[Path] = field(default_factory=list)

    def save(self, fig: Figure, name: str, title: str = "", *, source: str, shape: str
             ) -> Path:
        """Draw the footer (source | shape), save `fig` as figures_dir/name (.png) and
        register it with its source and shape; returns the path."""
        if not name.endswith(".png") or "/" in name or "\\" in name:
            raise ValueError(f"name must be a plain file name ending in .png, got {name!r}")
        _check_shape(shape)
        add_footer(fig, source, shape)
        path = save_figure(fig, Path(self.figures_dir) / name)
        register_figure(self.figures_dir, name, self.notebook, self.parameters,
                        title=title or _title_of(fig), source=source, shape=shape)
        self.written.append(path)
        return path

    def show(self, fig: Figure, name: str, title: str = "", *, source: str, shape: str
             ) -> Any:
        """`save` then return an IPython Image of the saved PNG for display (the path if
        IPython is not available)."""
        path = self.save(fig, name, title, source=source, shape=shape)
        try:
            from IPython.display import Image
        except ImportError:  # pragma: no cover - IPython ships with the notebook env
            return path
        return Image(filename=str(path))
