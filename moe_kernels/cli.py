"""Command line: run a layer, print per-stage latency, sweep notebooks.

    python -m moe_kernels layer  --preset demo --ranks 2 --transport gloo --dump run.pt
    python -m moe_kernels stages --preset demo --ranks 2 --json stages.json
    python -m moe_kernels sweep  01_routing -p skew 0,0.5,1
    python -m moe_kernels figures
    python -m moe_kernels comm   --validate
    python -m moe_kernels eplb   --preset demo --ranks 2 --skew 1 --redundant 4 --json eplb.json
    python -m moe_kernels replay run.pt

Exit codes, the same for every command:
    0  success
    1  a failed check or a runtime fault: `layer --check` or `replay` found x_next
       different from the reference / the dump, a peer timed out, a notebook cell
       failed, an allocation or write failed
    2  bad input: an invalid or out-of-range parameter (one line naming it, its value
       and the limit), an unwritable output path, a run that does not fit in memory,
       a receive-capacity overflow, a corrupt or foreign dump
Errors print as one line `error: ...` on stderr, without a traceback unless `--debug`
is given (anywhere on the command line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import comm_cmd, step_cmd
from .backend import BACKENDS, get_backend
from .config import PRESETS, ConfigError, RunConfig, check_seed, get_preset
from .dump import result_field
from .ep.layout import OVERFLOW_MODES
from .ep.transport import TRANSPORTS
from .eplb_cmd import add_parser as add_eplb_parser
from .eplb_cmd import run as cmd_eplb
from .fixtures import make_inputs, make_weights
from .layer import LayerResult, reference_layer
from .limits import check_memory
from .outputs import check_output_dir, check_output_file
from .types import CapacityError

#: Seconds an EP rank waits for a peer when --timeout is not given.
DEFAULT_TIMEOUT_S = 60.0
#: Exit codes of every command (see the module docstring).
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _run_args(p: argparse.ArgumentParser, batch: int = 64, seq: int = 2) -> None:
    p.add_argument("--preset", default="demo", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--ranks", type=int, default=1, help="EP ranks (must divide the experts)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--routing", choices=("hash", "sort"), default=None,
                   help="gate route (default: hash if the preset has hash layers)")
    p.add_argument("--capacity", type=int, default=None,
                   help="rows per local expert in a receive window, at most ranks x batch "
                        "x seq (default: spec RECV_MAX clamped to [16, ranks x batch x seq])")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m moe_kernels", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (accepted anywhere)")
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
    lay.add_argument("--timeout", type=float, default=None,
                     help=f"seconds to wait for a peer before failing (EP runs only; "
                          f"default {DEFAULT_TIMEOUT_S:g})")
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
    rpl = sub.add_parser("replay", help="rerun a --dump file and check x_next bit for bit")
    rpl.add_argument("file", type=Path, help="a .pt written by layer --dump")
    comm_cmd.add_parser(sub)
    step_cmd.add_parser(sub)
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
    dropped = result_field(result, "dropped")
    if dropped is not None and int(dropped.sum()):
        lines.append(f"  dropped routes (overflow=drop): {int(dropped.sum())}")
    lines.append("  wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return "\n".join(lines)


def _layer_mode(args: argparse.Namespace, run: RunConfig) -> str | None:
    """The transport of a layer run (None = the single-card reference); rejects options
    that the chosen mode would silently ignore."""
    if _under_torchrun():
        return "gloo"
    if args.transport is None and run.ranks == 1:
        if args.poison or args.overflow != "error" or args.timeout is not None:
            raise ConfigError("--poison, --overflow and --timeout apply to the EP program; "
                              "with --ranks 1 give --transport local or gloo")
        return None
    return args.transport or "local"


def cmd_layer(args: argparse.Namespace) -> int:
    run = _make_run(args)
    check_seed(args.seed, "--seed")
    transport = _layer_mode(args, run)
    timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    if args.dump is not None:
        check_output_file(args.dump, "--dump")
    if not _under_torchrun():
        check_memory(run, transport=transport, check=args.check)
    if args.backend == "pypto":
        from .pto.runtime import check_cache_dir
        check_cache_dir()
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
                                    timeout=timeout)
        if result is None:  # not rank 0: rank 0 reports
            return EXIT_OK
        label = "gloo via torchrun"
    elif transport is None:
        result = reference_layer(run, inputs, weights, backend=backend)
        label = f"single-card, backend {args.backend}"
    else:
        from .ep import run_ep_layer
        result = run_ep_layer(run, inputs, weights, transport=transport, backend=backend,
                              poison=args.poison, overflow=args.overflow,
                              timeout=timeout)
        label = f"EP over {transport}, backend {args.backend}"
    timings["layer"] = time.perf_counter() - t0
    print(format_summary(result, timings, label))
    status = EXIT_OK
    if args.check:
        ref = reference_layer(run, inputs, weights)
        if compare_x_next(result.x_next, ref.x_next):
            print("  check: x_next equals the single-card torch reference bit for bit")
        else:
            from .numerics import ratio_reldiff
            print(f"  check: FAIL: x_next differs from the single-card torch reference "
                  f"({ratio_reldiff(result.x_next, ref.x_next, diff_thd=0.003)})")
            status = EXIT_FAILED
    if args.dump is not None:
        from .dump import save_dump
        path = save_dump(args.dump, result, inputs, weights, seed=args.seed,
                         overflow=args.overflow, transport=transport, backend=args.backend,
                         poison=args.poison)
        print(f"  dump: {path}")
    return status


def compare_x_next(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """True when two BF16 x_next tensors are identical bit for bit."""
    return actual.shape == expected.shape and torch.equal(actual.view(torch.int16),
                                                          expected.view(torch.int16))


def cmd_replay(args: argparse.Namespace) -> int:
    from .dump import replay_dump
    same, message = replay_dump(args.file)
    print(message)
    return EXIT_OK if same else EXIT_FAILED


def cmd_stages(args: argparse.Namespace) -> int:
    run = _make_run(args)
    check_seed(args.seed, "--seed")
    if args.json is not None:
        check_output_file(args.json, "--json")
    from .pto.runtime import check_cache_dir
    check_cache_dir()
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
    sweep(args.notebook, parse_sweep_values(args.param),
          figures_dir=check_output_dir(args.figures_dir, "--figures-dir"))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .notebooks_run import batch_summary, run_all
    fdir, t0 = check_output_dir(args.figures_dir, "--figures-dir"), time.perf_counter()
    print(batch_summary(run_all(figures_dir=fdir), fdir, time.perf_counter() - t0))
    return 0


COMMANDS = {"layer": cmd_layer, "stages": cmd_stages, "sweep": cmd_sweep,
            "figures": cmd_figures, "replay": cmd_replay}
COMMANDS["comm"] = comm_cmd.run
COMMANDS["step"] = step_cmd.run
COMMANDS["eplb"] = cmd_eplb


def _error(exc: BaseException, code: int, prefix: str = "") -> int:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"error: {prefix}{text}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (contract in the module docstring):
    0 ok, 1 failed check or runtime fault, 2 bad input; one error line, no traceback
    unless --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CapacityError, ValueError) as exc:  # bad input (DumpError too)
        if debug:
            raise
        return _error(exc, EXIT_BAD_INPUT)
    except TimeoutError as exc:  # a peer that never arrived (local windows or gloo)
        if debug:
            raise
        return _error(exc, EXIT_FAILED)
    except MemoryError as exc:
        if debug:
            raise
        return _error(exc, EXIT_FAILED, "out of memory: ")
    except KeyboardInterrupt:  # Ctrl-C: one line (EP ranks stop silently with us)
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the contract: one line, exit 1
        if debug:
            raise
        ename = getattr(exc, "ename", None)  # papermill: a notebook cell raised
        if ename is not None:
            bad = ename in ("ParameterError", "ConfigError")
            return _error(ValueError(f"{ename}: {getattr(exc, 'evalue', '')}"),
                          EXIT_BAD_INPUT if bad else EXIT_FAILED, "notebook cell failed: ")
        return _error(exc, EXIT_FAILED, f"{type(exc).__name__}: ")
