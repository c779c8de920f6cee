"""Write and replay a layer run as a torch `.pt` dict (the `--dump FILE` format).

Keys: config (every preset field and run parameter), inputs (x_hc [R,B,S,hc,D] BF16,
input_ids [R,B,S] INT64, layer_id), weights (routed ones with a leading global expert
axis), stages (per-rank tensors with a leading rank axis), x_next [R,B,S,hc,D] BF16, and
for EP runs layout (counts, recv_count, slot, dst_rank, local_expert) and, when routes
were dropped, dropped [R, NL].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .fixtures import Inputs, Weights
from .layer import LayerResult

DUMP_KEYS: tuple[str, ...] = ("config", "inputs", "weights", "stages", "x_next")


def dump_dict(result: LayerResult, inputs: Inputs, weights: Weights) -> dict[str, Any]:
    """The dump as a plain dict of tensors and Python scalars."""
    d: dict[str, Any] = {
        "config": result.run.to_dict(),
        "inputs": {"x_hc": inputs.x_hc, "input_ids": inputs.input_ids,
                   "layer_id": int(inputs.layer_id)},
        "weights": weights.to_dict(),
        "stages": dict(result.stages),
        "x_next": result.x_next,
    }
    layout = result.extra.get("layout")
    if layout is not None:
        d["layout"] = layout.to_dump()
    dropped = result.extra.get("dropped")
    if dropped is not None and int(dropped.sum()) > 0:  # only when overflow="drop" dropped
        d["dropped"] = dropped
    return d


def save_dump(path: str | Path, result: LayerResult, inputs: Inputs, weights: Weights) -> Path:
    """Write the dump of `result` to `path` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dump_dict(result, inputs, weights), path)
    return path


def load_dump(path: str | Path) -> dict[str, Any]:
    """Read a dump; checks that the required keys are present."""
    d = torch.load(Path(path), map_location="cpu", weights_only=True)
    missing = [k for k in DUMP_KEYS if k not in d]
    if missing:
        raise ValueError(f"{path} is not a moe_kernels dump: missing keys {missing}")
    return d


def replay_inputs(d: dict[str, Any]) -> tuple[RunConfig, Inputs, Weights]:
    """Rebuild (run, inputs, weights) from a loaded dump, to run the layer again."""
    run = RunConfig.from_dict(d["config"])
    inp = d["inputs"]
    inputs = Inputs(x_hc=inp["x_hc"], input_ids=inp["input_ids"], layer_id=int(inp["layer_id"]))
    return run, inputs, Weights.from_dict(d["weights"])
