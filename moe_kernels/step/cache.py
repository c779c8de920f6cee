"""Disk cache of SIM kernel timings, keyed by kernel source, shape and pypto version.

Why: at flash/pro shapes one SIM run of a stage kernel takes seconds to minutes (compile +
cost model), while its result is a deterministic function of (the kernel's source, the
shape it was specialised to, the pypto release). A key names all three:

    {"kernel": name, "source": sha256 of the kernel's pypto modules' source,
     "shape": {...}, "pypto": installed version}

and its sha256 (canonical JSON) is the entry's id. Entries are looked up in the local cache
folder (`<pto cache>/timings/<id>.json`, written on every miss) and then in the small
committed file `moe_kernels/data/sim_timings.json`, which holds the entries the default
step runs need, so a fresh clone does not re-simulate them. Any change to a kernel's
source, the shape or pypto gives a new id: the stale entry is simply never found again.
"""
from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..pto import runtime as rt

#: The committed timings (small JSON, tracked): {entry id: entry}.
COMMITTED_PATH = Path(__file__).resolve().parents[1] / "data" / "sim_timings.json"
#: pypto kernel modules (under moe_kernels/pto) whose source defines each timed kernel:
#: the kernel's own module and the helper modules it traces through.
KERNEL_MODULES: dict[str, tuple[str, ...]] = {
    "hc_pre": ("hc", "tiling"),
    "gate": ("gate", "q8", "tiling"),
    "expert_shared": ("shared_ffn", "ffn", "q8", "tiling"),
    "expert_routed": ("ffn", "q8", "tiling"),
    "pack_routes": ("routes", "tiling"),
    "scatter_routes": ("routes", "tiling"),
    "reduce_routes": ("routes", "tiling"),
    "hc_post": ("hc", "tiling"),
}


def source_hash(modules: Iterable[str], root: Path | None = None) -> str:
    """sha256 (hex, 16 chars) over the code of moe_kernels.pto modules (or of
    `root`/<module>.py), in order, comments and docstrings left out."""
    h = hashlib.sha256()
    pto_dir = root if root is not None else Path(rt.__file__).resolve().parent
    for m in modules:
        text = (pto_dir / f"{m}.py").read_text()
        h.update(m.encode() + b"\0" + _code_only(text).encode() + b"\0")
    return h.hexdigest()[:16]


def _code_only(text: str) -> str:
    """The code of `text` without comments or docstrings (its AST dump), so editing a
    constant's explanation does not invalidate the timings its value produced."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def make_key(kernel: str, shape: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """The cache key of `kernel` at `shape` (JSON-able values); `source` overrides the
    kernel's source hash (tests use a stand-in kernel)."""
    if source is None:
        if kernel not in KERNEL_MODULES:
            raise ValueError(f"kernel must be one of {sorted(KERNEL_MODULES)} or give source=, "
                             f"got {kernel!r}")
        source = source_hash(KERNEL_MODULES[kernel])
    return {"kernel": kernel, "source": source, "shape": dict(shape),
            "pypto": rt.installed_pypto_version()}


def key_id(key: dict[str, Any]) -> str:
    """The entry id of a key: sha256 of its canonical JSON (24 hex chars)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def local_dir() -> Path:
    """Where measured entries are written: <pto cache folder>/timings."""
    return rt.cache_dir() / "timings"


@lru_cache(maxsize=4)
def _committed(path: str, mtime: float) -> dict[str, dict[str, Any]]:
    return json.loads(Path(path).read_text())


def committed_entries(path: Path = COMMITTED_PATH) -> dict[str, dict[str, Any]]:
    """The committed entries {id: entry} ({} when the file is absent)."""
    if not path.exists():
        return {}
    return _committed(str(path), path.stat().st_mtime)


def lookup(key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached entry of `key` (local folder first, then the committed file), or None."""
    kid = key_id(key)
    f = local_dir() / f"{kid}.json"
    if f.exists():
        try:
            entry = json.loads(f.read_text())
        except ValueError:
            entry = None
        if entry is not None and entry.get("key") == key:
            return entry
    entry = committed_entries().get(kid)
    return entry if entry is not None and entry.get("key") == key else None


def store(key: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """Write {"key": key, **value} to the local folder (atomic rename); returns the entry."""
    entry = {"key": key, **value}
    d = local_dir()
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(d / f"{key_id(key)}.json", json.dumps(entry, sort_keys=True) + "\n")
    return entry


def cached(key: dict[str, Any], measure: Callable[[], dict[str, Any]]
           ) -> tuple[dict[str, Any], bool]:
    """(entry, hit): the cached entry of `key`, or `measure()` stored under it."""
    entry = lookup(key)
    if entry is not None:
        return entry, True
    return store(key, measure()), False


def export_committed(ids: Iterable[str], path: Path = COMMITTED_PATH) -> int:
    """Copy local entries `ids` into the committed file (merged, sorted); returns its size.
    A maintainer's tool: run after changing a kernel, then commit the JSON."""
    out = dict(committed_entries(path))
    for kid in ids:
        out[kid] = json.loads((local_dir() / f"{kid}.json").read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(out, sort_keys=True, indent=1) + "\n")
    return len(out)
