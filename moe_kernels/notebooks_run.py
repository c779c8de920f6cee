"""Run the workbook's notebooks in batch with papermill: the main run (every notebook at
its defaults with the demo preset and 2 ranks, figures into figures/) and parameter
sweeps (one execution and one figure folder per combination of values).

Executed copies go to build/notebooks/ (git-ignored); the notebooks themselves, and
their jupytext .py pairs, stay output-free. The main run also writes each executed
notebook as HTML into figures/notebooks/ (figures linked, not embedded) and removes the
figures a notebook no longer writes. The kernel's own stdout and stderr (startup
warnings, worker-process chatter) go to build/notebooks/<name>.kernel.log, so a batch
run prints only its progress bar and a summary.
"""
from __future__ import annotations

import ast
import itertools
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .notebook_html import HTML_DIRNAME, export_html, html_total_bytes
from .paths import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build" / "notebooks"
#: Parameters of the main batch run (the seed's shape), applied where a notebook has them.
#: The batch run's shape is the seed's decode step (demo preset, 2 ranks; notebooks keep
#: batch 64 and seq 2 as defaults); the pypto comparison of 03 is on, and 04's step at
#: scale and its sweeps run at DeepSeek-V4-Flash on 8 ranks, batch 16, seq 2. Each entry
#: applies only to notebooks that declare it.
MAIN_RUN_PARAMETERS: dict[str, Any] = {"preset": "demo", "ranks": 2, "batch": 64, "seq": 2,
                                       "compare_pypto": True, "scale_preset": "flash",
                                       "scale_ranks": 8, "scale_batch": 16, "scale_seq": 2}
KERNEL_NAME = "python3"
#: Seconds a single cell may run before papermill gives up.
CELL_TIMEOUT_S = 600


def _quiet_kernel_manager(log: Any) -> type:
    """An AsyncKernelManager class whose kernel writes stdout/stderr to the open file
    `log` instead of the terminal (the cells' outputs still reach the notebook)."""
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return QuietKernelManager


class NotebookRunError(ConfigError):
    """A notebook name or a sweep parameter is not valid (the message says what is)."""


def list_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The workbook notebooks NN_name.ipynb in `notebooks_dir`, in order."""
    return sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))


def resolve_notebook(notebook: str | Path, notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """A notebook path from a path, a name ('01_routing', '01_routing.ipynb', its .py
    pair) or a number prefix ('01')."""
    p = Path(notebook)
    if p.suffix == ".py":
        p = p.with_suffix(".ipynb")
    if p.suffix == ".ipynb" and p.exists():
        return p.resolve()
    stem = p.name.removesuffix(".ipynb")
    found = [q for q in list_notebooks(notebooks_dir)
             if q.stem == stem or q.stem.split("_", 1)[0] == stem]
    if len(found) != 1:
        names = [q.stem for q in list_notebooks(notebooks_dir)]
        raise NotebookRunError(f"notebook {str(notebook)!r} not found; choose one of {names}")
    return found[0]


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """Name -> default value of the notebook's `parameters` cell (literals only)."""
    import papermill as pm
    info = pm.inspect_notebook(str(resolve_notebook(notebook)))
    out: dict[str, Any] = {}
    for name, spec in info.items():
        try:
            out[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):
            out[name] = spec["default"]
    return out


def coerce_value(name: str, text: Any, default: Any) -> Any:
    """Turn a CLI string into the type of the parameter's default ('none' -> None)."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    if t.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if t.lower() in ("true", "1", "yes"):
            return True
        if t.lower() in ("false", "0", "no"):
            return False
        raise NotebookRunError(f"parameter {name}={text!r}: expected true or false")
    if isinstance(default, str):
        return t
    try:
        v = ast.literal_eval(t)
    except (ValueError, SyntaxError):
        return t  # let the notebook's validation name the allowed values
    if isinstance(default, float) and isinstance(v, int):
        return float(v)
    if isinstance(default, int) and isinstance(v, float):
        raise NotebookRunError(f"parameter {name}={text!r}: expected an integer")
    return v


def run_label(parameters: Mapping[str, Any]) -> str:
    """Folder/file name encoding the swept parameters, e.g. 'ranks=4__skew=0.5'."""
    parts = [f"{k}={v}" for k, v in parameters.items()]
    return re.sub(r"[^A-Za-z0-9=._,+-]", "-", "__".join(parts)) or "defaults"


def run_notebook(notebook: str | Path, parameters: Mapping[str, Any] | None = None,
                 output_path: str | Path | None = None, kernel_name: str = KERNEL_NAME,
                 cell_progress: bool = False, timeout: int = CELL_TIMEOUT_S) -> Path:
    """Execute one notebook with papermill (cwd = repository root) and return the path of
    the executed copy (default build/notebooks/<name>.ipynb). Raises papermill's
    PapermillExecutionError when a cell fails (its evalue is the cell's error)."""
    import papermill as pm
    nb = resolve_notebook(notebook)
    out = Path(output_path) if output_path is not None else BUILD_DIR / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    declared = notebook_parameters(nb)
    unknown = sorted(set(parameters or {}) - set(declared))
    if unknown:
        raise NotebookRunError(f"{nb.stem} has no parameter(s) {unknown}; its parameters: "
                               f"{sorted(declared)}")
    with open(out.with_suffix(".kernel.log"), "w", encoding="utf-8") as log:
        pm.execute_notebook(str(nb), str(out), parameters=dict(parameters or {}),
                            kernel_name=kernel_name, cwd=str(REPO_ROOT),
                            progress_bar=cell_progress, log_output=False,
                            execution_timeout=timeout,
                            kernel_manager_class=_quiet_kernel_manager(log))
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="notebook", disable=not enabled)


def run_all(notebooks: Sequence[str | Path] | None = None,
            figures_dir: str | Path = "figures",
            parameters: Mapping[str, Any] | None = None,
            build_dir: str | Path = BUILD_DIR, progress: bool = True,
            kernel_name: str = KERNEL_NAME, html: bool = True) -> list[Path]:
    """The main batch run: every notebook (default: all NN_*.ipynb) at its defaults plus
    MAIN_RUN_PARAMETERS (demo preset, 2 ranks) and `parameters`, each applied only where
    the notebook declares it; figures into `figures_dir` (relative = from the current
    directory), stale figures of each notebook removed, and (html=True) each executed
    notebook as figures_dir/notebooks/<name>.html. Returns the executed notebooks' paths
    in build_dir."""
    nbs = [resolve_notebook(n) for n in notebooks] if notebooks else list_notebooks()
    fdir = Path(figures_dir).resolve()
    wanted = {**MAIN_RUN_PARAMETERS, **dict(parameters or {}), "figures_dir": str(fdir)}
    done: list[Path] = []
    with _progress(len(nbs), "notebooks", progress) as bar:
        for nb in nbs:
            bar.set_postfix_str(nb.stem)
            declared = notebook_parameters(nb)
            params = {k: v for k, v in wanted.items() if k in declared}
            started = time.time()
            done.append(run_notebook(nb, params, Path(build_dir) / nb.name,
                                     kernel_name=kernel_name))
            _prune_stale(fdir, nb.stem, started)
            if html:
                export_html(done[-1], fdir)
            bar.update(1)
    return done


def _prune_stale(figures_dir: Path, notebook: str, started: float) -> list[str]:
    """Drop the manifest entries and PNGs of `notebook` that its run did not rewrite."""
    from .analysis.manifest import prune_notebook, read_manifest
    entries = read_manifest(figures_dir)["figures"]
    keep = {n for n, e in entries.items() if e.get("notebook") == notebook
            and (figures_dir / n).exists() and (figures_dir / n).stat().st_mtime >= started}
    return prune_notebook(figures_dir, notebook, keep)


def batch_summary(executed: Sequence[Path], figures_dir: str | Path, seconds: float) -> str:
    """One paragraph after a batch run: notebooks, figures, HTML pages and their size."""
    from .analysis.manifest import read_manifest
    fdir = Path(figures_dir).resolve()
    names = {p.stem for p in executed}
    figs = [n for n, e in read_manifest(fdir)["figures"].items() if e.get("notebook") in names]
    pages = sorted((fdir / HTML_DIRNAME).glob("*.html"))
    return (f"{len(executed)} notebook(s) in {seconds:.0f} s: {len(figs)} figures in {fdir} "
            f"(listed in manifest.json); {len(pages)} HTML page(s) in "
            f"{fdir / HTML_DIRNAME} ({html_total_bytes(fdir) / 1024:.0f} KiB); executed "
            f"notebooks and kernel logs in {Path(executed[0]).parent if executed else '-'}")


@dataclass(frozen=True)
class SweepRun:
    """One execution of a sweep: its parameters, figure folder and executed notebook."""

    parameters: dict[str, Any]
    label: str
    figures_dir: Path
    executed: Path
    seconds: float


def sweep(notebook: str, params: Mapping[str, Sequence[Any]],
          figures_dir: str | Path = Path("figures") / "sweeps",
          base_parameters: Mapping[str, Any] | None = None,
          build_dir: str | Path = BUILD_DIR / "sweeps", progress: bool = True,
          kernel_name: str = KERNEL_NAME) -> list[SweepRun]:
    """Run `notebook` once per combination (cartesian product, in the order given) of
    `params` {name: [values]}; values may be CLI strings, coerced to the type of the
    notebook's default. Each run writes its figures and manifest into
    figures_dir/<notebook>/<label>/ and its executed copy to build_dir/<notebook>/<label>
    .ipynb, where label encodes the parameters (see run_label)."""
    nb = resolve_notebook(notebook)
    declared = notebook_parameters(nb)
    if not params:
        raise NotebookRunError("sweep needs at least one parameter with values")
    for name, values in params.items():
        if name not in declared or name == "figures_dir":
            allowed = sorted(k for k in declared if k != "figures_dir")
            raise NotebookRunError(f"{nb.stem} has no sweepable parameter {name!r}; "
                                   f"allowed: {allowed}")
        if isinstance(values, (str, bytes)) or not list(values):
            raise NotebookRunError(f"parameter {name}: give a non-empty list of values, "
                                   f"got {values!r}")
    names = list(params)
    grids = [[coerce_value(n, v, declared[n]) for v in params[n]] for n in names]
    base = {**dict(base_parameters or {})}
    root = Path(figures_dir).resolve() / nb.stem
    runs: list[SweepRun] = []
    combos = list(itertools.product(*grids))
    with _progress(len(combos), f"sweep {nb.stem}", progress) as bar:
        for combo in combos:
            swept = dict(zip(names, combo, strict=True))
            label = run_label(swept)
            bar.set_postfix_str(label)
            fdir = root / label
            t0 = time.perf_counter()
            out = run_notebook(nb, {**base, **swept, "figures_dir": str(fdir)},
                               Path(build_dir) / nb.stem / f"{label}.ipynb",
                               kernel_name=kernel_name)
            runs.append(SweepRun(parameters=swept, label=label, figures_dir=fdir,
                                 executed=out, seconds=time.perf_counter() - t0))
            bar.update(1)
    return runs


def _cells(nb: Any) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source.strip(), tuple(c.get("metadata", {}).get("tags", ())))
            for c in nb.cells]


def pair_differences(notebook: str | Path) -> list[str]:
    """Differences between a notebook and its jupytext .py pair (cell types, sources,
    tags); empty when they are in sync."""
    import jupytext
    import nbformat
    ipynb = Path(notebook)
    py = ipynb.with_suffix(".py")
    if not py.exists():
        return [f"{py.name} is missing"]
    a = _cells(nbformat.read(str(ipynb), as_version=4))
    b = _cells(jupytext.read(str(py)))
    diffs = [f"{ipynb.name} has {len(a)} cells, {py.name} has {len(b)}"] if len(a) != len(
        b) else []
    for i, (ca, cb) in enumerate(zip(a, b, strict=False)):
        if ca[0] != cb[0] or ca[2] != cb[2]:
            diffs.append(f"cell {i}: {ca[0]} tags {list(ca[2])} in {ipynb.name}, "
                         f"{cb[0]} tags {list(cb[2])} in {py.name}")
        elif ca[1] != cb[1]:
            la, lb = ca[1].splitlines(), cb[1].splitlines()
            j = next((j for j, (x, y) in enumerate(zip(la, lb, strict=False)) if x != y),
                     min(len(la), len(lb)))
            diffs.append(f"cell {i} line {j + 1}: {(la[j:] or [''])[0]!r} in {ipynb.name}, "
                         f"{(lb[j:] or [''])[0]!r} in {py.name}")
    return diffs


def cells_with_outputs(notebook: str | Path) -> list[int]:
    """Indices of code cells that carry outputs or an execution count (should be none)."""
    import nbformat
    nb = nbformat.read(str(notebook), as_version=4)
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
            and (c.get("outputs") or c.get("execution_count") is not None)]
