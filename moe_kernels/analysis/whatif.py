"""What-ifs computed from shapes and routing counts (no weights, no kernels): drop rate
over skew x capacity factor, capacity headroom under skew, the windows' memory
footprint per rank, and INT8 + scale against BF16 dispatch payloads.

Capacity here is `capacity_for_factor`: factor x the mean rows per local expert
(T·K/NL), rounded up and never more than the R·T rows that can arrive. An expert's
receive window overflows when more routes pick it than it has slots; in overflow="drop"
mode those routes are dropped, so the drop count is sum_g max(0, load_g - C).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..ep.layout import PAD_BYTES
from ..stages import BF16_BYTES, INT8_BYTES, INT32_BYTES
from .comm import DISPATCH_LINK, LinkParams, dispatch_messages, phase_model, uniform_counts
from .layout_views import capacity_for_factor
from .routing import expert_load
from .skew import skew_routing

#: Capacity factors of the drop-rate heat map and the footprint figure.
FACTOR_GRID: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: Skews of the drop-rate heat map and the headroom curve.
SKEW_AXIS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
#: EP sizes of the footprint and payload what-ifs.
RANKS_AXIS: tuple[int, ...] = (2, 4, 8, 16)
#: Presets of the footprint and payload what-ifs (real DeepSeek-V4 sizes plus the demo).
WHATIF_PRESETS: tuple[str, ...] = ("demo", "flash", "pro")
#: An expert within this share of its capacity counts as near overflow.
NEAR_OVERFLOW = 0.10


def factor_capacity(tokens: int, topk: int, n_local: int, ranks: int, factor: float) -> int:
    """ceil(T·K/NL · factor), at least 1 and at most R·T (the rows that can arrive)."""
    return min(ranks * tokens, capacity_for_factor(tokens, topk, n_local, factor))


def dropped_routes(load: torch.Tensor, capacity: int) -> int:
    """Routes dropped at `capacity` rows per expert: sum_g max(0, load_g - capacity)."""
    return int((load.to(torch.int64) - capacity).clamp_min(0).sum())


@dataclass(frozen=True)
class NearOverflow:
    """An expert at or above (1 - NEAR_OVERFLOW) of its capacity."""

    expert: int
    load: int
    capacity: int

    @property
    def headroom(self) -> int:
        """Slots left (negative: routes over capacity)."""
        return self.capacity - self.load

    def label(self) -> str:
        """'expert 7: 127/128 rows, 1 slot left' or '... 5 over'."""
        h = self.headroom
        tail = f"{h} slot{'s' if h != 1 else ''} left" if h >= 0 else f"{-h} over"
        return f"expert {self.expert}: {self.load}/{self.capacity} rows, {tail}"


def near_overflow(load: torch.Tensor, capacity: int, within: float = NEAR_OVERFLOW
                  ) -> list[NearOverflow]:
    """Experts whose load is at least (1 - within) x capacity, fullest first."""
    lf = load.to(torch.int64)
    idx = torch.nonzero(lf >= (1.0 - within) * capacity).reshape(-1).tolist()
    out = [NearOverflow(int(g), int(lf[g]), capacity) for g in idx]
    return sorted(out, key=lambda n: (-n.load, n.expert))


@dataclass(frozen=True)
class DropGrid:
    """Drop rate (percent of routes) for every (skew, capacity factor)."""

    skews: tuple[float, ...]
    factors: tuple[float, ...]
    capacities: tuple[int, ...]     # per factor
    rate_pct: torch.Tensor          # [len(skews), len(factors)] FP64
    peak_load: tuple[int, ...]      # busiest expert's rows per skew

    def min_safe_factor(self, skew_index: int) -> float | None:
        """The smallest factor on the grid with no drop at skews[skew_index]."""
        ok = [f for f, r in zip(self.factors, self.rate_pct[skew_index].tolist(),
                                strict=True) if r == 0.0]
        return min(ok) if ok else None


def drop_rate_grid(base: torch.Tensor, n_experts: int, ranks: int,
                   skews: Sequence[float] = SKEW_AXIS,
                   factors: Sequence[float] = FACTOR_GRID, seed: int = 0) -> DropGrid:
    """DropGrid of routing base [R,T,K] skewed by each skew (skew_routing, same seed)
    at each capacity factor."""
    r, t, k = base.shape
    n_local = n_experts // ranks
    caps = tuple(factor_capacity(t, k, n_local, r, f) for f in factors)
    rate = torch.zeros(len(skews), len(factors), dtype=torch.float64)
    peaks = []
    total = base.numel()
    for i, s in enumerate(skews):
        load = expert_load(skew_routing(base, n_experts, s, seed), n_experts)
        peaks.append(int(load.max()))
        for j, c in enumerate(caps):
            rate[i, j] = 100.0 * dropped_routes(load, c) / total
    return DropGrid(tuple(float(s) for s in skews), tuple(float(f) for f in factors), caps,
                    rate, tuple(peaks))


@dataclass(frozen=True)
class HeadroomCurve:
    """Busiest expert's rows against a fixed capacity, over skew."""

    label: str
    skews: tuple[float, ...]
    peak_load: tuple[int, ...]
    capacity: int

    @property
    def utilisation_pct(self) -> list[float]:
        """Busiest expert's rows as a percentage of the capacity, per skew."""
        return [100.0 * p / self.capacity for p in self.peak_load]

    def first_overflow(self) -> float | None:
        """The smallest skew at which the busiest expert exceeds the capacity."""
        return next((s for s, p in zip(self.skews, self.peak_load, strict=True)
                     if p > self.capacity), None)


def headroom_curve(label: str, base: torch.Tensor, n_experts: int, capacity: int,
                   skews: Sequence[float] = SKEW_AXIS, seed: int = 0) -> HeadroomCurve:
    """HeadroomCurve of routing base [R,T,K] under skew_routing at each skew."""
    peaks = tuple(int(expert_load(skew_routing(base, n_experts, s, seed), n_experts).max())
                  for s in skews)
    return HeadroomCurve(label, tuple(float(s) for s in skews), peaks, capacity)


@dataclass(frozen=True)
class Footprint:
    """Bytes one rank allocates for the exchange."""

    window_bytes: int     # receive window: NL·C rows of x_i8 (D) + scale/weight/r_route
    count_bytes: int      # the count table pub_counts [R·R, NL] INT32
    combine_bytes: int    # routed_y_buf [T·K, D] BF16


def footprint(model: ModelConfig, ranks: int, tokens: int, factor: float) -> Footprint:
    """Footprint of one rank at `ranks`, `tokens` per rank and capacity `factor`, from
    the window shapes of ep/windows.py (no weights)."""
    if model.n_routed_experts % ranks:
        raise ValueError(f"ranks must divide n_routed_experts ({model.n_routed_experts}), "
                         f"got {ranks}")
    nl, k, d = model.n_routed_experts // ranks, model.num_experts_per_tok, model.hidden_size
    c = factor_capacity(tokens, k, nl, ranks, factor)
    row = d * INT8_BYTES + 3 * PAD_BYTES
    return Footprint(window_bytes=nl * c * row, count_bytes=ranks * ranks * nl * INT32_BYTES,
                     combine_bytes=tokens * k * d * BF16_BYTES)


@dataclass(frozen=True)
class PayloadPoint:
    """Dispatch of one EP size at uniform routing: INT8 + scale against BF16 rows."""

    preset: str
    ranks: int
    int8_bytes: int       # link bytes the busiest rank sends, INT8 row + scale tile
    bf16_bytes: int       # the same with BF16 rows and no scale
    int8_us: float        # modelled dispatch phase (us)
    bf16_us: float
    overhead_us: float    # the model's fixed cost per call, included in both

    @property
    def bytes_saved_pct(self) -> float:
        return 100.0 * (1.0 - self.int8_bytes / self.bf16_bytes)

    @property
    def time_saved_pct(self) -> float:
        return 100.0 * (1.0 - self.int8_us / self.bf16_us)


def payload_point(model: ModelConfig, ranks: int, tokens: int,
                  link: LinkParams = DISPATCH_LINK) -> PayloadPoint:
    """Dispatch bytes and modelled time (comm.phase_model, one message per peer) at
    uniform routing: INT8 rows (D bytes) + an FP32 scale tile against BF16 rows (2·D),
    both with the weight and r_route tiles."""
    counts = uniform_counts(ranks, tokens, model.num_experts_per_tok, model.n_routed_experts)
    routes = counts.sum(dim=2)
    d = model.hidden_size
    side = {"weight": routes * PAD_BYTES, "r_route": routes * PAD_BYTES}
    int8 = {"x_i8": routes * d * INT8_BYTES, "scale": routes * PAD_BYTES, **side}
    bf16 = {"x_bf16": routes * d * BF16_BYTES, **side}
    msgs = dispatch_messages(counts, "peer")
    m8, m16 = phase_model("int8", int8, msgs, link), phase_model("bf16", bf16, msgs, link)
    return PayloadPoint(preset=model.name, ranks=ranks,
                        int8_bytes=int(m8.link_bytes.sum(dim=1).max()),
                        bf16_bytes=int(m16.link_bytes.sum(dim=1).max()),
                        int8_us=m8.phase_us, bf16_us=m16.phase_us,
                        overhead_us=link.overhead_us)
