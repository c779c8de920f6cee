"""`python -m moe_kernels step`: one EP decode step per rank, as a timeline that follows
the routing.

    python -m moe_kernels step --preset flash --ranks 8 --batch 16 --seq 2 --skew 1.5 \\
        --seed 0 --json step.json

Per rank: the rows its experts received, every stage's SIM time (pypto cost model of the
910B, no interpreter; expert_routed follows the rows received), the count exchange,
dispatch and combine from the communication MODEL, the wait for the slowest peer and the
rank's total; the step time is the slowest rank's total (`moe_kernels.step.model`).
The last stdout line is `step_us: X`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .config import PRESETS, ConfigError, RunConfig, get_preset
from .stages import EP_STEP_STAGES

#: Short column names of the per-rank table.
_SHORT = {"hc_pre": "hc_pre", "gate": "gate", "expert_shared": "shared",
          "pack_routes": "pack", "expert_routed": "routed", "reduce_routes": "reduce",
          "hc_post": "hc_post"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `step` sub-command on an argparse sub-parsers object."""
    p = subparsers.add_parser("step", help="per-rank EP step timeline: SIM stage times "
                                           "following the routing + communication model")
    p.add_argument("--preset", default="demo", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--ranks", type=int, default=2, help="EP ranks (must divide the experts)")
    p.add_argument("--batch", type=int, default=64, help="decode batch per rank")
    p.add_argument("--seq", type=int, default=2, help="tokens per sequence per step")
    p.add_argument("--skew", type=float, default=0.0,
                   help="Zipf exponent of the synthetic hot-expert skew (0 = gate routing)")
    p.add_argument("--seed", type=int, default=0, help="fixtures and skew draws")
    p.add_argument("--routing", choices=("hash", "sort"), default=None,
                   help="gate route (default: hash if the preset has hash layers)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="receive capacity = F x mean rows per expert, routes beyond it are "
                        "dropped (default: every route fits)")
    p.add_argument("--eplb", type=int, default=None, metavar="SLOTS",
                   help="EPLB what-if: SLOTS redundant expert slots in total (multiple of "
                        "--ranks) before computing rows per rank")
    p.add_argument("--overlap", action="store_true",
                   help="run expert_shared beside the count exchange and dispatch")
    p.add_argument("--direct", action="store_true",
                   help="SIM every rank's expert_routed kernel (slow at flash/pro) instead "
                        "of deriving it from a few measured kernels")
    p.add_argument("--json", type=Path, default=None, help="also write the step as JSON")
    return p


def format_step(d: dict[str, Any]) -> str:
    """A per-rank table: rows, stage SIM us, comm MODEL us, wait, total."""
    cols = [_SHORT.get(s, s) for s in EP_STEP_STAGES]
    hdr = (f"{'rank':>4}{'rows':>6}{'drop':>6}" + "".join(f"{c:>9}" for c in cols)
           + f"{'count':>8}{'disp':>8}{'comb':>8}{'wait':>8}{'total':>9}")
    lines = [hdr, "-" * len(hdr)]
    for r in d["ranks"]:
        s, c = r["stages_us"], r["comm_us"]
        lines.append(f"{r['rank']:>4}{r['rows_received']:>6}{r['dropped']:>6}"
                     + "".join(f"{s[n]:>9.1f}" for n in EP_STEP_STAGES)
                     + f"{c['count']:>8.1f}{c['dispatch']:>8.1f}{c['combine']:>8.1f}"
                     f"{r['wait_us']:>8.1f}{r['total_us']:>9.1f}")
    routed = [r["stages_us"]["expert_routed"] for r in d["ranks"]]
    spread = max(routed) / min(routed) if min(routed) > 0 else float("inf")
    cfg = d["config"]
    how = "/".join(sorted({r["expert_routed_method"] for r in d["ranks"]}))
    lines.append(f"stages: SIM, pypto cost model (910B / A2A3), no interpreter; "
                 f"expert_routed per rank: {how} (max/min {spread:.2f}x). "
                 f"comm: communication MODEL (analysis.comm).")
    lines.append(f"capacity {cfg['capacity']} rows/expert, routes dropped "
                 f"{cfg['routes_dropped']} of {cfg['routes_total']}; overlap "
                 f"{cfg['overlap']}; eplb slots {cfg['eplb_slots']}")
    for stage, why in d.get("stage_fallbacks", {}).items():
        lines.append(f"NOT SIM: {stage}: {why}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Build the run, model the step, print the table, write --json; `step_us: X` last."""
    from .step.model import ep_step
    model = get_preset(args.preset)
    routing = args.routing or ("hash" if model.num_hash_layers > 0 else "sort")
    run_cfg = RunConfig(model=model, batch=args.batch, seq=args.seq, ranks=args.ranks,
                        routing=routing)
    if not args.skew >= 0:
        raise ConfigError(f"--skew must be >= 0, got {args.skew}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.eplb is not None and (args.eplb < 0 or args.eplb % args.ranks):
        raise ConfigError(f"--eplb must be a multiple of --ranks ({args.ranks}) >= 0, "
                          f"got {args.eplb}")
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        raise ConfigError(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    t0 = time.perf_counter()
    res = ep_step(run_cfg, skew=args.skew, seed=args.seed,
                  capacity_factor=args.capacity_factor, eplb_slots=args.eplb or None,
                  overlap=args.overlap, direct_routed=args.direct)
    d = res.to_dict()
    d["config"]["wall_s"] = round(time.perf_counter() - t0, 2)
    print(format_step(d))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(d, indent=1) + "\n")
        print(f"wrote {args.json}")
    print(f"step_us: {res.step_us:.2f}")
    return 0
