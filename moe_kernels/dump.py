"""Write, verify and replay a layer run as a torch `.pt` dict (the `--dump FILE` format).

Keys: config (every preset field and run parameter, plus seed, overflow, transport,
backend, poison, package_version, format and `checksums`), inputs (x_hc [R,B,S,hc,D]
BF16, input_ids [R,B,S] INT64, layer_id), weights (routed ones with a leading global
expert axis), stages (per-rank tensors with a leading rank axis), x_next [R,B,S,hc,D]
BF16, and for EP runs layout (counts, recv_count, slot, dst_rank, local_expert) and,
when routes were dropped, dropped [R, NL].

`config["checksums"]` maps every tensor's key path ("weights/routed_w1") to the sha256
of its dtype, shape and bytes; `load_dump` recomputes them and names the first corrupt
tensor. Dumps are written atomically: a temporary file in the same folder, fsync, then
os.replace, so a run killed while writing never leaves a truncated file at the path.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .backend import get_backend
from .config import ConfigError, RunConfig
from .fixtures import Inputs, Weights
from .layer import LayerResult, reference_layer

DUMP_KEYS: tuple[str, ...] = ("config", "inputs", "weights", "stages", "x_next")
#: Format tag in config["format"]; version 2 added checksums, seed and overflow.
DUMP_FORMAT = "moe_kernels.dump/2"


class DumpError(ValueError):
    """A file is not a moe_kernels dump, is truncated, or a tensor fails its checksum."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw bytes of `t` (row-major)."""
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def iter_tensors(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(key path, tensor) for every tensor in a nested dict, `config` left out."""
    for k, v in d.items():
        path = f"{prefix}{k}"
        if path == "config":
            continue
        if isinstance(v, torch.Tensor):
            yield path, v
        elif isinstance(v, dict):
            yield from iter_tensors(v, f"{path}/")


def result_field(result: LayerResult, name: str) -> Any:
    """An EP result's `layout` or `dropped` (None for the single card)."""
    value = getattr(result, name, None)
    extra = getattr(result, "extra", None)
    if value is None and isinstance(extra, dict):
        value = extra.get(name)
    return value


def dump_dict(result: LayerResult, inputs: Inputs, weights: Weights, *, seed: int | None = None,
              overflow: str = "error", transport: str | None = None, backend: str = "torch",
              poison: bool = False) -> dict[str, Any]:
    """The dump as a plain dict of tensors and Python scalars, checksums included."""
    config = result.run.to_dict()
    config.update(seed=seed, overflow=overflow, transport=transport, backend=backend,
                  poison=poison, package_version=__version__, format=DUMP_FORMAT)
    d: dict[str, Any] = {
        "config": config,
        "inputs": {"x_hc": inputs.x_hc, "input_ids": inputs.input_ids,
                   "layer_id": int(inputs.layer_id)},
        "weights": weights.to_dict(),
        "stages": dict(result.stages),
        "x_next": result.x_next,
    }
    layout = result_field(result, "layout")
    if layout is not None:
        d["layout"] = layout.to_dump()
    dropped = result_field(result, "dropped")
    if dropped is not None and int(dropped.sum()) > 0:  # only when overflow="drop" dropped
        d["dropped"] = dropped
    config["checksums"] = {p: tensor_sha256(t) for p, t in iter_tensors(d)}
    return d


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save into a temporary file next to `path`, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def _unlink_quietly(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def save_dump(path: str | Path, result: LayerResult, inputs: Inputs, weights: Weights,
              **meta: Any) -> Path:
    """Write the dump of `result` to `path` atomically (parent folders created); `meta`
    (seed, overflow, transport, backend, poison) goes into the config."""
    return atomic_torch_save(dump_dict(result, inputs, weights, **meta), path)


def verify_dump(d: dict[str, Any], name: str = "dump") -> None:
    """Recompute every tensor's checksum; DumpError naming the first bad or missing one."""
    sums = d["config"].get("checksums")
    if not isinstance(sums, dict):
        raise DumpError(f"{name} has no checksums (written before format "
                        f"{DUMP_FORMAT}?); it cannot be verified")
    present = dict(iter_tensors(d))
    for path, want in sums.items():
        if path not in present:
            raise DumpError(f"{name} is corrupt: tensor {path} is missing")
        if tensor_sha256(present[path]) != want:
            raise DumpError(f"{name} is corrupt: tensor {path} fails its sha256 checksum")
    extra = sorted(set(present) - set(sums))
    if extra:
        raise DumpError(f"{name} is corrupt: tensor {extra[0]} has no checksum")


def load_dump(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read a dump; checks the required keys and (verify) every tensor's checksum."""
    try:
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise DumpError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise DumpError(f"{path} is a directory, not a dump") from exc
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError
        raise DumpError(f"{path} is not a readable moe_kernels dump (truncated or "
                        f"foreign file): {type(exc).__name__}: {str(exc)[:120]}") from exc
    if not isinstance(d, dict):
        raise DumpError(f"{path} is not a moe_kernels dump: missing keys {list(DUMP_KEYS)}")
    missing = [k for k in DUMP_KEYS if k not in d]
    if missing:
        raise DumpError(f"{path} is not a moe_kernels dump: missing keys {missing}")
    if verify:
        verify_dump(d, str(path))
    return d


def replay_inputs(d: dict[str, Any]) -> tuple[RunConfig, Inputs, Weights]:
    """Rebuild (run, inputs, weights) from a loaded dump, to run the layer again."""
    try:
        run = RunConfig.from_dict(d["config"])
        inp = d["inputs"]
        inputs = Inputs(x_hc=inp["x_hc"], input_ids=inp["input_ids"],
                        layer_id=int(inp["layer_id"]))
        return run, inputs, Weights.from_dict(d["weights"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise DumpError(f"dump config or tensors do not describe a run: "
                        f"{type(exc).__name__}: {exc}") from exc


def replay_dump(path: str | Path) -> tuple[bool, str]:
    """Load and verify a dump, rerun its layer as it was run (single-card reference or
    the recorded EP transport, overflow and poison) and compare x_next bit for bit.
    Returns (identical, one-line message); a corrupt or foreign file raises DumpError."""
    d = load_dump(path)
    run, inputs, weights = replay_inputs(d)
    cfg = d["config"]
    transport = cfg.get("transport")
    if transport is None and "layout" in d:
        transport = "local"
    backend = get_backend(cfg.get("backend") or "torch")
    if transport is None:
        result = reference_layer(run, inputs, weights, backend=backend)
    else:
        from .ep import run_ep_layer
        result = run_ep_layer(run, inputs, weights, transport=transport, backend=backend,
                              overflow=cfg.get("overflow", "error"),
                              poison=bool(cfg.get("poison", False)))
    want = d["x_next"]
    got = result.x_next
    if got.shape == want.shape and torch.equal(got.view(torch.int16), want.view(torch.int16)):
        return True, (f"replay: {path}: x_next identical bit for bit ({got.numel()} values, "
                      f"preset {run.model.name}, {run.ranks} rank(s))")
    if got.shape != want.shape:
        return False, (f"replay: {path}: x_next shape {list(got.shape)} differs from the "
                       f"dump's {list(want.shape)}")
    diff = got.view(torch.int16) != want.view(torch.int16)
    err = (got.float() - want.float()).abs().max().item()
    return False, (f"replay: {path}: x_next differs from the dump at {int(diff.sum())} of "
                   f"{diff.numel()} values (max |diff| {err:.3g})")
