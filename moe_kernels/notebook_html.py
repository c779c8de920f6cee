"""Executed notebooks as browsable HTML beside the figures they wrote.

`export_html` converts an executed notebook with nbconvert. Every displayed PNG that is
byte-for-byte one of the figures in the figures folder becomes a link to that file
(`<img src="../01_x.png">`) instead of a second, base64-embedded copy, so the pages stay
small (the whole set well under HTML_BUDGET_BYTES) and always show the committed PNGs.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import html
import re
from pathlib import Path

from .atomic import write_atomic
from .paths import REPO_ROOT

#: Sub-folder of the figures folder that holds the HTML pages.
HTML_DIRNAME = "notebooks"
#: Upper bound of all pages together (bytes); `html_total_bytes` reports the sum.
HTML_BUDGET_BYTES = 5 * 1024 * 1024
#: nbconvert template: "classic" carries far less CSS than "lab" and reads the same.
HTML_TEMPLATE = "classic"
#: The template's stylesheet, written once beside the pages and linked from each (the
#: template would embed the same ~13,000 lines of CSS in every page).
CSS_NAME = "notebook.css"
_STYLE = re.compile(r'<style type="text/css">(.*?)</style>\n?', re.S)


def share_css(page: str) -> tuple[str, str]:
    """(page with its <head> style blocks replaced by one link to CSS_NAME, their CSS)."""
    head_end = page.index("</head>")
    head, rest = page[:head_end], page[head_end:]
    css = "\n".join(m.group(1).strip("\n") for m in _STYLE.finditer(head)) + "\n"
    head = _STYLE.sub("", head)
    link = f'<link rel="stylesheet" href="{CSS_NAME}"/>\n'
    return head + link + rest, css


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def figure_index(figures_dir: Path) -> dict[str, str]:
    """sha256 of every PNG in figures_dir -> its file name."""
    return {_digest(p.read_bytes()): p.name for p in sorted(Path(figures_dir).glob("*.png"))}


def link_figures(nb: object, index: dict[str, str], prefix: str = "../") -> int:
    """Replace, in place, every image/png output of `nb` whose bytes are a known figure
    with an HTML <img> pointing at it; returns how many were replaced."""
    replaced = 0
    for cell in nb.cells:  # type: ignore[attr-defined]
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            png = data.get("image/png")
            if not png:
                continue
            name = index.get(_digest(base64.b64decode(png)))
            if name is None:
                continue
            src = html.escape(prefix + name, quote=True)
            out["data"] = {"text/html": f'<img src="{src}" alt="{html.escape(name)}" '
                                        f'style="max-width:100%">',
                           "text/plain": name}
            out["metadata"] = {}
            replaced += 1
    return replaced


def make_reproducible(nb: object, repo_root: Path) -> None:
    """Make the page depend only on what the run computed, in place: adjacent stream
    outputs merged (how the kernel chunked stdout is timing), papermill's injected cell
    given a fixed id (papermill draws a random one), and the checkout's absolute path
    written as "<repo>" (so every clone renders the same page)."""
    root = str(repo_root)
    for cell in nb.cells:  # type: ignore[attr-defined]
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell["id"] = "injected-parameters"
        if cell.get("cell_type") == "code":
            cell["source"] = cell["source"].replace(root, "<repo>")
        merged: list = []
        for out in cell.get("outputs", []):
            if out.get("text") is not None:
                out["text"] = out["text"].replace(root, "<repo>")
            prev = merged[-1] if merged else None
            if (prev is not None and out.get("output_type") == "stream"
                    and prev.get("output_type") == "stream"
                    and prev.get("name") == out.get("name")):
                prev["text"] += out["text"]
                continue
            merged.append(out)
        if "outputs" in cell:
            cell["outputs"] = merged


def export_html(executed: str | Path, figures_dir: str | Path) -> Path:
    """Write figures_dir/notebooks/<name>.html from the executed notebook `executed`,
    linking (not embedding) the figures it saved; returns the page's path."""
    import nbformat
    from nbconvert import HTMLExporter
    fdir = Path(figures_dir)
    nb = nbformat.read(str(executed), as_version=4)
    nb = copy.deepcopy(nb)
    link_figures(nb, figure_index(fdir))
    make_reproducible(nb, REPO_ROOT)
    body, _ = HTMLExporter(template_name=HTML_TEMPLATE).from_notebook_node(nb)
    body, css = share_css(body)
    out = fdir / HTML_DIRNAME / f"{Path(executed).stem}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, body)
    write_atomic(out.parent / CSS_NAME, css)   # the same for every page
    return out


def html_total_bytes(figures_dir: str | Path) -> int:
    """Bytes of all HTML pages (and their shared stylesheet) under figures_dir/notebooks."""
    d = Path(figures_dir) / HTML_DIRNAME
    return sum(p.stat().st_size for p in [*d.glob("*.html"), *d.glob(CSS_NAME)])
