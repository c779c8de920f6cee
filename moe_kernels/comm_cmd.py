"""`python -m moe_kernels comm`: the communication model's parameters and its validation.

    python -m moe_kernels comm              # parameters, each with its source
    python -m moe_kernels comm --validate   # model vs DeepEP-Ascend low-latency, per point

--validate prints, for every published DeepEP-Ascend low-latency point (128 tokens,
hidden 7168, top-8, EP8/16/32; INT8 dispatch, BF16 combine), the model at that shape
(uniform routing, the EP program's byte accounting), the published latency, the error and
whether the point was used to fit. The last line is ``comm-validate: held-out max error
X%``; the exit status is 0 when every held-out point is within ±HELD_OUT_BOUND_PCT, else 1.
"""
from __future__ import annotations

import argparse
from typing import Any

from .analysis.comm import (
    A3_UB,
    DISPATCH_LINK,
    FABRICS,
    FIT_EP,
    HELD_OUT_BOUND_PCT,
    PUBLISHED_EXPERTS,
    ComparisonRow,
    fit_overheads,
    held_out_max_error,
    published_comparison,
)
from .analysis.published import DEEPEP_ASCEND_LL_SHAPE, DEEPEP_ASCEND_SOURCE


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `comm` sub-command on an argparse sub-parsers object."""
    p = subparsers.add_parser("comm", help="communication model: parameters and sources; "
                                           "--validate against DeepEP-Ascend figures")
    p.add_argument("--validate", action="store_true",
                   help="compare the model with every published DeepEP-Ascend low-latency "
                        "point; exit 1 if a held-out point is off by more than "
                        f"{HELD_OUT_BOUND_PCT:g}%%")
    return p


def format_parameters() -> str:
    """The fabrics and the fitted overheads, one line each, with their sources."""
    lines = ["communication model parameters (a MODEL, not a measurement):"]
    for key, f in FABRICS.items():
        link = "switched" if f.link_gbps is None else f"{f.link_gbps:g} GB/s per peer link"
        lines.append(f"  {key}: {f.name}: {f.port_gbps:g} GB/s per rank and direction, "
                     f"{link}, {f.latency_us:g} us per message  [{f.source}]")
    d_us, c_us = fit_overheads()
    lines.append(f"  overhead per call, fitted on DeepEP-Ascend EP{FIT_EP} ({A3_UB.name}): "
                 f"dispatch {d_us:.1f} us, combine {c_us:.1f} us")
    return "\n".join(lines)


def format_validation(rows: list[ComparisonRow]) -> str:
    """The per-point table; its last line is `comm-validate: held-out max error X%`."""
    tokens, hidden, topk = DEEPEP_ASCEND_LL_SHAPE
    link = DISPATCH_LINK
    lines = [f"published: {DEEPEP_ASCEND_SOURCE}; low-latency, A3 SuperPoD, {tokens} tokens, "
             f"hidden {hidden}, top-{topk}, INT8 dispatch, BF16 combine",
             f"model: uniform routing over {PUBLISHED_EXPERTS} experts, {link.bandwidth_gbps:g}"
             f" GB/s per rank, {link.latency_us:g} us per peer message, overhead fitted on "
             f"EP{FIT_EP} only",
             f"{'EP':>4}  {'phase':<9}{'model us':>10}{'published us':>14}{'error':>9}  fit"]
    for r in rows:
        lines.append(f"{r.ep:>4}  {r.phase:<9}{r.model_us:>10.1f}{r.published_us:>14.1f}"
                     f"{r.error_pct:>+8.1f}%  {'used to fit' if r.fitted else 'held out'}")
    worst = held_out_max_error(rows)
    if worst > HELD_OUT_BOUND_PCT:
        lines.append(f"held-out error exceeds the ±{HELD_OUT_BOUND_PCT:g}% bound")
    lines.append(f"comm-validate: held-out max error {worst:.1f}%")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the parameters, or with --validate the validation table; exit 0/1."""
    if not args.validate:
        print(format_parameters())
        return 0
    rows = published_comparison()
    print(format_validation(rows))
    return 0 if held_out_max_error(rows) <= HELD_OUT_BOUND_PCT else 1
