"""`python -m moe_kernels eplb`: the EPLB what-if of notebook 01 from the command line.

    python -m moe_kernels eplb --preset demo --ranks 2 --skew 1 --redundant 4 --json eplb.json

The per-expert load is notebook 01's: the fixtures' gate routes every rank's tokens, then
the synthetic Zipf skew re-ranks them (`analysis.eplb.skewed_expert_load`). The plan is
`analysis.eplb.eplb_whatif`; a short summary is printed and, with --json, a record with
`before.rank_load`, `after.rank_load` (one entry per rank) and `placement` (per rank, its
global expert ids; unused redundant slots are left out).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .analysis.eplb import eplb_whatif, skewed_expert_load
from .analysis.params import ParameterError, validate_params
from .config import PRESETS, ConfigError

#: CLI flag of each `validate_params` parameter whose name differs from the flag.
_FLAG_OF = {"redundant_slots": "redundant"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `eplb` sub-command on an argparse sub-parsers object."""
    p = subparsers.add_parser("eplb", help="EPLB what-if: replicate hot experts into "
                                           "redundant slots, print rank load before/after")
    p.add_argument("--preset", default="demo", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--ranks", type=int, default=2, help="EP ranks (must divide the experts)")
    p.add_argument("--skew", type=float, default=1.0,
                   help="Zipf exponent of the synthetic hot-expert skew (0 = none)")
    p.add_argument("--redundant", type=int, default=4,
                   help="redundant expert slots in total, a multiple of --ranks")
    p.add_argument("--seed", type=int, default=0, help="fixtures and skew draws")
    p.add_argument("--batch", type=int, default=64, help="decode batch per rank")
    p.add_argument("--seq", type=int, default=2, help="tokens per sequence per step")
    p.add_argument("--routing", choices=("hash", "sort"), default=None,
                   help="gate route (default: hash if the preset has hash layers)")
    p.add_argument("--json", type=Path, default=None, help="also write the plan as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    """Validate the flags, build the plan, print the summary, write --json if given."""
    routing = args.routing
    if routing is None and args.preset in PRESETS:
        routing = "hash" if PRESETS[args.preset].num_hash_layers > 0 else "sort"
    try:
        p = validate_params(preset=args.preset, ranks=args.ranks, batch=args.batch,
                            seq=args.seq, seed=args.seed, figures_dir=".",
                            routing=routing or "hash", skew=args.skew,
                            redundant_slots=args.redundant)
    except ParameterError as exc:
        flag = _FLAG_OF.get(exc.name, exc.name)
        raise ConfigError(f"--{flag} {exc.value!r} is invalid; allowed: {exc.allowed}"
                          ) from None
    load = skewed_expert_load(p.run, p.skew, p.seed)
    plan = eplb_whatif(load, p.run.ranks, args.redundant)
    print(f"EPLB what-if: preset {p.model.name}, {p.run.ranks} ranks, {p.run.routing} route, "
          f"skew {p.skew:g}, seed {p.seed}, {args.redundant} redundant slots "
          f"({len(plan.replicated)} used)")
    for name, rl, imb in (("before", plan.load_before, plan.imbalance_before),
                          ("after", plan.load_after, plan.imbalance_after)):
        rows = ", ".join(f"{v:g}" for v in rl.tolist())
        print(f"  {name:<6} rank load [{rows}]  max/mean {imb:.3f}")
    print(f"  replicated experts: {list(plan.replicated)}")
    if args.json is not None:
        record = {"preset": p.model.name, "ranks": p.run.ranks, "routing": p.run.routing,
                  "batch": p.run.batch, "seq": p.run.seq, "skew": p.skew,
                  "redundant": args.redundant, "seed": p.seed, **plan.to_dict()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
