"""The notebooks' "What we saw" sections, written from the run's own numbers, so a sweep's
text always matches its figures. Each function returns Markdown (a heading and one
bullet per finding); notebooks display it with IPython's `Markdown`."""
from __future__ import annotations

from collections.abc import Sequence

from .agreement import Comparison
from .combine_views import ReduceCheck
from .eplb import EplbPlan
from .layout_views import ChannelBytes, Headroom, OverflowOutcome
from .routing import RoutingStats
from .whatif import DropGrid, HeadroomCurve, NearOverflow, PayloadPoint

HEADING = "## What we saw"


def _md(bullets: Sequence[str], next_step: str) -> str:
    lines = [HEADING, ""] + [f"* {b}" for b in bullets if b] + [f"* Next: {next_step}"]
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return f"{x:.1f} %" if x >= 0.1 or x == 0 else "< 0.1 %"


def near_overflow_sentence(near: Sequence[NearOverflow], what: str) -> str:
    """'At skew 1, expert 7 gets 127 of its 128 slots: 1 short of overflow.' (or none)."""
    if not near:
        return f"{what}: no expert comes within 10 % of its capacity."
    n = near[0]
    if n.headroom < 0:
        tail = f"{-n.headroom} routes over it, so they are dropped or raise"
    elif n.headroom == 0:
        tail = "exactly full: one more route would overflow"
    else:
        tail = f"{n.headroom} short of overflow"
    more = f" ({len(near) - 1} more within 10 %)" if len(near) > 1 else ""
    return (f"{what}: expert {n.expert} gets {n.load} rows for {n.capacity} slots, "
            f"{tail}{more}.")


def routing_findings(preset: str, stats: dict[str, RoutingStats], route: str, skew: float,
                     skewed: RoutingStats, capacity: int, near: Sequence[NearOverflow],
                     grid: DropGrid, factor: float, plan: EplbPlan) -> str:
    """Findings of notebook 01 from its numbers."""
    h, s = stats["hash"], stats["sort"]
    base = stats[route]
    bullets = [
        f"Without skew ({preset}), the hash route loads the busiest rank "
        f"{h.rank_imbalance:.2f}x the mean and the sort route {s.rank_imbalance:.2f}x; "
        f"per expert the spread is wider ({h.expert_imbalance:.2f}x and "
        f"{s.expert_imbalance:.2f}x), because a rank averages over its experts.",
        f"Skew {skew:g} on the {route} route moves the busiest rank from "
        f"{base.rank_imbalance:.2f}x to {skewed.rank_imbalance:.2f}x the mean "
        f"(rank {skewed.busiest_rank}, {skewed.busiest_load} rows); the step waits for "
        f"that rank.",
        near_overflow_sentence(near, f"At skew {skew:g} and capacity C = {capacity}"),
    ]
    if skew in grid.skews and factor in grid.factors:
        i, j = grid.skews.index(skew), grid.factors.index(factor)
        safe = grid.min_safe_factor(i)
        bullets.append(
            f"Drop rate: at skew {skew:g} and capacity factor {factor:g}, "
            f"{_pct(float(grid.rate_pct[i, j]))} of the routes would be dropped; "
            + (f"no route is dropped from factor {safe:g} up." if safe is not None else
               "every factor on the grid drops routes."))
    worst = float(grid.rate_pct[-1, 0])
    bullets.append(f"At the grid's extreme (skew {grid.skews[-1]:g}, factor "
                   f"{grid.factors[0]:g}) {_pct(worst)} of routes are dropped.")
    used = len(plan.replicated)
    bullets.append(
        f"EPLB with {plan.redundant} redundant slots ({used} used) takes the busiest rank "
        f"from {plan.imbalance_before:.2f}x to {plan.imbalance_after:.2f}x the mean.")
    return _md(bullets, "`02_dispatch_layouts` turns these routes into receive windows "
                        "and bytes per channel.")


def dispatch_findings(source: str, bytes_: ChannelBytes, hr: Headroom,
                      overflow: OverflowOutcome, curves: Sequence[HeadroomCurve],
                      payload: PayloadPoint | None) -> str:
    """Findings of notebook 02 from its numbers."""
    link = {c: bytes_.link_total(c) for c in bytes_.per_peer}
    total = sum(link.values())
    big = link.get("x_i8", 0) + link.get("combine", 0)
    r, e = hr.tightest
    bullets = [
        f"One count tensor, published in full by every rank, fixes every slot ({source}).",
        (f"Over links, `x_i8` and the combine carry {100 * big / total:.1f} % of the "
         f"{total / 1024:.1f} KiB per step; the three padded side channels carry the rest."
         if total else "No route crosses a link: every rank's tokens stay on its own "
                       "experts."),
        f"The tightest expert (rank {r}, local expert {e}) uses "
        f"{100 * hr.peak_utilisation:.0f} % of its {hr.capacity} slots.",
    ]
    for c in curves:
        s = c.first_overflow()
        bullets.append(f"Under skew, the {c.label}'s busiest expert "
                       + (f"first overflows C = {c.capacity} at skew {s:g}." if s is not None
                          else f"stays within C = {c.capacity} up to skew {c.skews[-1]:g}."))
    if overflow.overflowed:
        bullets.append(
            f"At the reduced capacity {overflow.capacity}, overflow='error' raises a "
            f"CapacityError naming rank, expert and counts; overflow='drop' drops "
            f"{overflow.dropped_total} of {overflow.routes_total} routes "
            f"({100 * overflow.dropped_total / overflow.routes_total:.1f} %).")
    else:
        bullets.append(f"At the reduced capacity {overflow.capacity} nothing overflows.")
    if payload is not None:
        bullets.append(
            f"INT8 + scale sends {payload.bytes_saved_pct:.0f} % fewer dispatch bytes than "
            f"BF16 ({payload.preset}, R = {payload.ranks}), but the modelled phase is only "
            f"{payload.time_saved_pct:.0f} % shorter: a fixed {payload.overhead_us:.0f} us "
            f"per call dominates.")
    return _md(bullets, "`03_per_rank_combine` computes on these windows and pushes the "
                        "results back.")


def combine_findings(comparisons: Sequence[Comparison], checks: Sequence[ReduceCheck],
                     rows_moved: Sequence[Sequence[int]]) -> str:
    """Findings of notebook 03 from its numbers."""
    n = len(rows_moved)
    own = sum(rows_moved[o][o] for o in range(n))
    total = sum(sum(row) for row in rows_moved)
    bullets = [f"Every placed route's row returns exactly once: {total} rows, {own} of them "
               f"from the origin's own experts and {total - own} across links."]
    ok = all(c.spec_order_matches for c in checks)
    rev = sum(c.reversed_differs for c in checks)
    b16 = sum(c.bf16_accum_differs for c in checks)
    numel = sum(c.numel for c in checks)
    bullets.append(
        ("The reduce in the contract's order reproduces `ffn_out` bit for bit on every "
         "rank" if ok else "The reduce in the contract's order does NOT reproduce "
                           "`ffn_out`")
        + f"; reversing the order changes {rev} of {numel} elements, BF16 accumulation "
          f"{b16} ({100 * b16 / numel if numel else 0:.1f} %).")
    for c in comparisons:
        if c.bit_identical:
            bullets.append(f"{c.label}: bit-identical on every rank.")
        else:
            verdict = "within" if c.passed else "OUTSIDE"
            bullets.append(
                f"{c.label}: {verdict} tolerance; the worst element reaches "
                f"{c.worst_ratio:.2g}x the threshold, and bad points use "
                f"{100 * c.bad_share_of_allowance:.0f} % of the {100 * c.pct_thd:g} % "
                f"allowed.")
    return _md(bullets, "`04_latency` puts Ascend cycle counts on these stages.")
