"""Memory a run needs, checked against the memory available before any work starts.

`estimate_memory(run, ...)` adds up the big buffers of one `layer` command (weights,
activations, receive windows, the single-card reference's windows, the FFN working set
and the fixture generator's temporaries) from the frozen RunConfig alone; nothing is
allocated. `check_memory` compares the total with MemAvailable of /proc/meminfo and
raises a ConfigError that says how much the run needs, so a preset that does not fit
(pro on 8 ranks needs ~25 GiB of INT8 routed weights alone) fails in a second with one
line instead of after a minute with an allocator traceback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .config import MIN_RECV_ROWS, RECV_SAFETY, ConfigError, RunConfig

GIB = 1024 ** 3
#: A Python process with torch imported (measured RSS ~0.35 GiB, rounded up).
PROCESS_BASE_BYTES = 512 * 1024 ** 2
#: Fixture generation threads (fixtures.make_weights) and the FP32 temporaries each
#: keeps per weight matrix (randn, bf16, fp32 copy, scaled, int32, fp16).
GEN_THREADS = 2
GEN_TEMPS_PER_MATRIX = 5
#: Safety margin over the estimate (allocator slack, fragmentation).
MARGIN = 1.15
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component of one run; `total` includes the margin."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()) * MARGIN)

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in big)


def mem_available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo in bytes, None where the file is missing."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def routed_weight_bytes(run: RunConfig, experts: int | None = None) -> int:
    """INT8 w1, w3, w2 plus FP32 scales of `experts` routed experts (default all E)."""
    cfg = run.model
    e = cfg.n_routed_experts if experts is None else experts
    i, d = cfg.moe_intermediate_size, cfg.hidden_size
    return e * (3 * i * d + 4 * (2 * i + d))


def estimate_memory(run: RunConfig, *, transport: str | None = None, check: bool = False,
                    gen_workers: int = GEN_THREADS) -> MemoryEstimate:
    """What one `layer` run holds at its peak. transport None is the single-card
    reference; "local" runs every rank in this process; "gloo" adds one process per
    rank holding its shard. check adds the single-card reference."""
    cfg = run.model
    e, i, d, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size, \
        cfg.num_experts_per_tok
    r, t, c = run.ranks, run.tokens, run.recv_max
    parts: dict[str, int] = {"process": PROCESS_BASE_BYTES,
                             "routed weights (INT8)": routed_weight_bytes(run)}
    parts["shared + gate weights"] = (3 * i * d + 4 * (2 * i + d) + 4 * e * d
                                      + 4 * cfg.mix_hc * cfg.hc_dim + 4 * cfg.vocab_size * k)
    # generator temporaries: FP32 matrices per thread, and tid2eid's rand + argsort [V, E]
    parts["fixture generation"] = max(gen_workers * GEN_TEMPS_PER_MATRIX * 4 * i * d,
                                      12 * cfg.vocab_size * e)
    # x_hc in, x_next out (BF16), per-rank stages (~8 B per token and D), FP64 hc_pre
    parts["activations"] = r * t * (2 * 2 * cfg.hc_mult * d + 8 * d) + 8 * t * cfg.hc_dim
    ffn = 4 * c * (5 * i + 2 * d)  # g, u, h, INT32 products; y per expert call
    if transport is not None:
        # every rank's receive window (INT8 rows + BF16 outputs) and routed_y_buf
        parts["EP windows"] = r * (run.n_local * c * (3 * d + 12) + t * k * (2 * d + d))
        parts["FFN working set"] = ffn
    if transport is None or check:
        # dispatch_single sizes each call's window to its busiest expert
        busiest = min(t, math.ceil(t * k / e) * RECV_SAFETY + MIN_RECV_ROWS)
        parts["reference windows"] = e * busiest * (3 * d + 12) + t * k * 2 * d
        parts["FFN working set"] = max(parts.get("FFN working set", 0),
                                       4 * busiest * (5 * i + 2 * d))
    if transport == "gloo":
        parts["gloo rank processes"] = r * (PROCESS_BASE_BYTES
                                            + routed_weight_bytes(run, run.n_local))
    return MemoryEstimate(parts)


def check_memory(run: RunConfig, *, transport: str | None = None, check: bool = False,
                 available: int | None = None) -> MemoryEstimate:
    """Raise ConfigError when the run's estimate exceeds MemAvailable (or `available`)."""
    est = estimate_memory(run, transport=transport, check=check)
    avail = mem_available_bytes() if available is None else available
    if avail is not None and est.total > avail:
        cfg = run.model
        raise ConfigError(
            f"preset={cfg.name} ranks={run.ranks} batch={run.batch} seq={run.seq} needs "
            f"about {est.total / GIB:.1f} GiB ({est.describe()}), more than the "
            f"{avail / GIB:.1f} GiB available (MemAvailable in /proc/meminfo); use a "
            f"smaller preset, batch or seq, or a machine with more memory")
    return est
