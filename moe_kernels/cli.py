"""Command line: run a layer, print per-stage latency, sweep notebooks.

    python -m moe_kernels layer  --preset demo --ranks 2 --transport gloo --dump run.pt
    python -m moe_kernels stages --preset demo --ranks 2 --json stages.json
    python -m moe_kernels sweep  01_routing -p skew 0,0.5,1
    python -m moe_kernels figures
    python -m moe_kernels comm   --validate
    python -m moe_kernels eplb   --preset demo --ranks 2 --skew 1 --redundant 4 --json eplb.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import comm_cmd
from .backend import BACKENDS, get_backend
from .config import PRESETS, ConfigError, RunConfig, get_preset
from .eplb_cmd import add_parser as add_eplb_parser
from .eplb_cmd import run as cmd_eplb
from .fixtures import make_inputs, make_weights
from .layer import LayerResult, reference_layer
from .types import CapacityError

TRANSPORTS: tuple[str, ...] = ("local", "gloo")
OVERFLOW_MODES: tuple[str, ...] = ("error", "drop")


def _run_args(p: argparse.ArgumentParser, batch: int = 64, seq: int = 2) -> None:
    p.add_argument("--preset", default="demo", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--ranks", type=int, default=1, help="EP ranks (must divide the experts)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--routing", choices=("hash", "sort"), default=None,
                   help="gate route (default: hash if the preset has hash layers)")
    p.add_argument("--capacity", type=int, default=None,
                   help="rows per local expert in a receive window (default: spec RECV_MAX)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    lay = sub.add_parser("layer", help="run one MoE layer on CPU and print a summary")
    _run_args(lay)
    lay.add_argument("--seed", type=int, default=0)
    lay.add_argument("--transport", choices=TRANSPORTS, default=None,
                     help="EP exchange (default: single-card reference for 1 rank, "
                          "local for more)")
    lay.add_argument("--backend", choices=BACKENDS, default="torch",
                     help="who computes the stages: torch reference or pypto kernels")
    lay.add_argument("--poison", action="store_true",
                     help="fill every window with garbage before the step")
    lay.add_argument("--overflow", choices=OVERFLOW_MODES, default="error",
                     help="receive-capacity overflow: raise, or drop and count")
    lay.add_argument("--timeout", type=float, default=60.0,
                     help="seconds to wait for a peer before failing")
    lay.add_argument("--check", action="store_true",
                     help="also run the single-card reference and compare x_next")
    lay.add_argument("--dump", type=Path, default=None, help="write a replayable .pt dump")

    stg = sub.add_parser("stages", help="per-stage SIM latency vs roofline (pypto kernels)")
    _run_args(stg)
    stg.add_argument("--seed", type=int, default=0)
    stg.add_argument("--json", type=Path, default=None, help="also write the records as JSON")

    swp = sub.add_parser("sweep", help="run a notebook over parameter values (papermill)")
    swp.add_argument("notebook", help="notebook name, e.g. 01_routing")
    swp.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUES"),
                     required=True, help="parameter name and comma-separated values")
    swp.add_argument("--figures-dir", type=Path, default=Path("figures") / "sweeps")

    fig = sub.add_parser("figures", help="run every notebook at its defaults (demo, 2 ranks) "
                                         "and write figures/")
    fig.add_argument("--figures-dir", type=Path, default=Path("figures"))
    comm_cmd.add_parser(sub)
    add_eplb_parser(sub)
    return parser


def _make_run(args: argparse.Namespace) -> RunConfig:
    model = get_preset(args.preset)
    routing = args.routing or ("hash" if model.num_hash_layers > 0 else "sort")
    return RunConfig(model=model, batch=args.batch, seq=args.seq, ranks=args.ranks,
                     routing=routing, recv_capacity=args.capacity)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ)


def format_summary(result: LayerResult, timings: dict[str, float], label: str) -> str:
    """A short human summary: shapes, per-expert and per-rank load, wall times."""
    run = result.run
    cfg = run.model
    load = result.expert_load()
    per_rank = load.reshape(run.ranks, run.n_local).sum(dim=1)
    mean = load.float().mean().item()
    lines = [
        f"MoE layer: preset={cfg.name} ranks={run.ranks} batch={run.batch} seq={run.seq} "
        f"routing={run.routing} ({label})",
        f"  D={cfg.hidden_size} I={cfg.moe_intermediate_size} experts={cfg.n_routed_experts} "
        f"(NL={run.n_local}/rank) top-k={cfg.num_experts_per_tok} recv_max={run.recv_max}",
        f"  x_hc [R,B,S,hc,D] = {list(result.x_next.shape)} bf16 -> x_next same shape; "
        f"mean |x_next| = {result.x_next.float().abs().mean().item():.4f}",
        f"  per-expert load (routes): {load.tolist()}",
        f"  per-rank load: {per_rank.tolist()}  imbalance max/mean expert = "
        f"{(load.max().item() / mean if mean else 0):.2f}",
    ]
    dropped = result.extra.get("dropped")
    if dropped is not None and int(dropped.sum()):
        lines.append(f"  dropped routes (overflow=drop): {int(dropped.sum())}")
    lines.append("  wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return "\n".join(lines)


def cmd_layer(args: argparse.Namespace) -> int:
    run = _make_run(args)
    if args.seed < 0:
        raise ConfigError(f"seed must be >= 0, got {args.seed}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    weights = make_weights(run.model, args.seed)
    inputs = make_inputs(run, args.seed)
    timings["fixtures"] = time.perf_counter() - t0
    backend = get_backend(args.backend)
    t0 = time.perf_counter()
    if _under_torchrun():
        from .ep.dist import run_under_torchrun
        result = run_under_torchrun(run, inputs, weights, backend=args.backend,
                                    poison=args.poison, overflow=args.overflow,
                                    timeout=args.timeout)
        if result is None:  # not rank 0: rank 0 reports
            return 0
        label = "gloo via torchrun"
    elif args.transport is None and run.ranks == 1:
        if args.poison or args.overflow != "error":
            raise ConfigError("--poison and --overflow apply to the EP program: "
                              "give --transport local or gloo")
        result = reference_layer(run, inputs, weights, backend=backend)
        label = f"single-card, backend {args.backend}"
    else:
        from .ep import run_ep_layer
        transport = args.transport or "local"
        result = run_ep_layer(run, inputs, weights, transport=transport, backend=backend,
                              poison=args.poison, overflow=args.overflow,
                              timeout=args.timeout)
        label = f"EP over {transport}, backend {args.backend}"
    timings["layer"] = time.perf_counter() - t0
    print(format_summary(result, timings, label))
    if args.check:
        ref = reference_layer(run, inputs, weights)
        same = torch.equal(ref.x_next.view(torch.int16), result.x_next.view(torch.int16))
        if same:
            print("  check: x_next equals the single-card torch reference bit for bit")
        else:
            from .numerics import ratio_reldiff
            print(f"  check: x_next vs single-card torch reference: "
                  f"{ratio_reldiff(result.x_next, ref.x_next, diff_thd=0.003)}")
    if args.dump is not None:
        from .dump import save_dump
        print(f"  dump: {save_dump(args.dump, result, inputs, weights)}")
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    run = _make_run(args)
    from .pto.report import format_stage_table, stage_report
    records = stage_report(run, seed=args.seed)
    print(format_stage_table(records))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.to_dict() for r in records], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def parse_sweep_values(pairs: list[list[str]]) -> dict[str, list[str]]:
    """[["skew", "0,0.5"]] -> {"skew": ["0", "0.5"]}; names must be unique, values non-empty."""
    out: dict[str, list[str]] = {}
    for name, values in pairs:
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"-p {name}: give at least one value, got {values!r}")
        if name in out:
            raise ConfigError(f"-p {name} given twice")
        out[name] = vals
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    from .notebooks_run import sweep
    sweep(args.notebook, parse_sweep_values(args.param), figures_dir=args.figures_dir)
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .notebooks_run import run_all
    run_all(figures_dir=args.figures_dir)
    return 0


COMMANDS = {"layer": cmd_layer, "stages": cmd_stages, "sweep": cmd_sweep,
            "figures": cmd_figures}
COMMANDS["comm"] = comm_cmd.run
COMMANDS["eplb"] = cmd_eplb


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures print one line and exit non-zero: bad input
    (a configuration or capacity overflow) exits 2, a peer that timed out exits 1."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CapacityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:  # a peer that never arrived (local windows or gloo)
        print(f"error: {exc}", file=sys.stderr)
        return 1
