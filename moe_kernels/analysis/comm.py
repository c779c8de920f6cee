"""Bytes per channel of the spec's dispatch/combine and a MODEL of their link time.

Bytes (spec §3.2, §3.4 step 5, §3.6). One route = one (token, expert) pair; a route from
rank src to local expert e of rank dst moves, in dispatch, four payload tiles:

* x_i8:    the token's INT8 row, D bytes;
* scale:   its FP32 dequant scale, padded to PAD_COLS columns = 32 bytes;
* weight:  the FP32 routing weight, padded to PAD_COLS columns = 32 bytes;
* r_route: the INT32 origin route id t·K + k, padded to PAD_COLS columns = 32 bytes;

and, in combine, one BF16 row of D elements (2·D bytes) back from dst to src.
Routes to a rank's own experts (src == dst) do not cross a link: they are reported as
`self_bytes` and not timed.

Communication model (an alpha-beta model, NOT a measurement). Each rank has one link port
of `bandwidth_gbps` per direction (full duplex). A phase costs a rank
    egress_us  = Σ_{dst≠me} (bytes[me,dst] / bandwidth + messages[me,dst] · latency_us)
    ingress_us = Σ_{src≠me} (bytes[src,me] / bandwidth + messages[src,me] · latency_us)
    rank_us    = max(egress_us, ingress_us)
and the phase ends when its slowest rank does (barrier): phase_us = max_r rank_us.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

#: W_PAD = IDX_PAD = 8 columns (spec §1.3): the scale, weight and r_route tiles are padded
#: to 8 FP32/INT32 elements because 8 · 4 B = 32 B is the minimum tile (one 32-byte
#: block) the Ascend vector unit moves; column 0 holds the value, columns 1..7 are zero.
PAD_COLS = 8
#: Bytes per element of the FP32 / INT32 side channels.
SIDE_ELEM_BYTES = 4
#: Bytes of one padded side-channel tile per route (scale, weight, r_route): 32.
PAD_TILE_BYTES = PAD_COLS * SIDE_ELEM_BYTES
#: Bytes per element of the x payload (INT8) and of the combine row (BF16).
X_ELEM_BYTES = 1
Y_ELEM_BYTES = 2
#: The four dispatch payload channels, in the spec's order.
DISPATCH_CHANNELS: tuple[str, ...] = ("x_i8", "scale", "weight", "r_route")
COMBINE_CHANNEL = "y_bf16"

#: Published DeepEP-Ascend low-latency figures (sgl-project/sgl-kernel-npu README,
#: "DeepEP-Ascend Performance"): pure HCCS, A3 384 SuperPOD, 128 tokens, hidden 7168,
#: top-8, INT8 dispatch, BF16 combine. EP -> (dispatch us, dispatch GB/s, combine us,
#: combine GB/s).
DEEPEP_ASCEND_LL_SOURCE = ("DeepEP-Ascend low-latency, A3 384 SuperPOD, pure HCCS, 128 tok, "
                           "hidden 7168, top-8 (sgl-project/sgl-kernel-npu README)")
DEEPEP_ASCEND_LL: dict[int, tuple[float, float, float, float]] = {
    8: (132.0, 58.0, 126.0, 116.0),
    16: (139.0, 55.0, 135.0, 109.0),
    32: (153.0, 49.0, 151.0, 97.0),
}
#: Default link bandwidths: the EP8 rows above (dispatch 58 GB/s, combine 116 GB/s).
DEFAULT_DISPATCH_GBPS = 58.0
DEFAULT_COMBINE_GBPS = 116.0
#: Default per-message latency, derived from the same table: the bytes each rank sends do
#: not depend on EP there (128 tokens x top-8), so the latency growth from EP8 to EP32 is
#: the per-peer cost: dispatch (153-132)/(32-8) = 0.875 us, combine (151-126)/24 ≈ 1.04 us.
#: One "message" is one aggregated send to one peer in DeepEP; see `dispatch_messages`.
DEFAULT_DISPATCH_LATENCY_US = 0.875
DEFAULT_COMBINE_LATENCY_US = 1.04


def _routes(counts: torch.Tensor) -> torch.Tensor:
    if counts.dim() != 3 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be [R, R, NL] (src, dst, local expert), got shape "
                         f"{tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    return counts.to(torch.int64).sum(dim=2)


def dispatch_bytes(counts: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    """Bytes [R,R] (row = sender src, column = receiver dst) per dispatch channel, from
    counts[src, dst, e] and hidden size D. Includes the diagonal (self traffic)."""
    if not isinstance(hidden, int) or hidden <= 0:
        raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
    routes = _routes(counts)
    return {"x_i8": routes * hidden * X_ELEM_BYTES, "scale": routes * PAD_TILE_BYTES,
            "weight": routes * PAD_TILE_BYTES, "r_route": routes * PAD_TILE_BYTES}


def combine_bytes(counts: torch.Tensor, hidden: int) -> torch.Tensor:
    """Combine bytes [R,R] (row = sender = expert owner, column = origin rank): one BF16
    row of D per route, sent back from dst to src, i.e. transpose(routes) · 2·D."""
    if not isinstance(hidden, int) or hidden <= 0:
        raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
    return _routes(counts).t().contiguous() * hidden * Y_ELEM_BYTES


def dispatch_messages(counts: torch.Tensor, per: Literal["route", "peer"] = "route"
                      ) -> torch.Tensor:
    """Messages [R,R] per channel: per='route' counts one remote store per route (the
    spec's protocol, §3.4 step 5); per='peer' one aggregated message per non-empty
    (src, dst) pair (DeepEP style)."""
    routes = _routes(counts)
    if per == "route":
        return routes
    if per == "peer":
        return (routes > 0).to(torch.int64)
    raise ValueError(f"per must be one of ['route', 'peer'], got {per!r}")


@dataclass(frozen=True)
class LinkParams:
    """One phase's link: bandwidth per rank port and direction (GB/s, 1 GB = 1e9 B) and a
    fixed cost per message (us). `source` says where the numbers come from."""

    bandwidth_gbps: float
    latency_us: float
    source: str = "parameter"

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps!r}")
        if not self.latency_us >= 0:
            raise ValueError(f"latency_us must be >= 0, got {self.latency_us!r}")


DISPATCH_LINK = LinkParams(DEFAULT_DISPATCH_GBPS, DEFAULT_DISPATCH_LATENCY_US,
                           "derived from " + DEEPEP_ASCEND_LL_SOURCE + ", EP8-EP32")
COMBINE_LINK = LinkParams(DEFAULT_COMBINE_GBPS, DEFAULT_COMBINE_LATENCY_US,
                          "derived from " + DEEPEP_ASCEND_LL_SOURCE + ", EP8-EP32")


@dataclass(frozen=True)
class PhaseModel:
    """Modelled time of one phase (dispatch or combine), per rank, in microseconds."""

    name: str
    egress_us: torch.Tensor   # [R] FP64
    ingress_us: torch.Tensor  # [R] FP64
    link_bytes: torch.Tensor  # [R,R] INT64, off-diagonal bytes (diagonal zeroed)
    self_bytes: torch.Tensor  # [R] INT64, bytes a rank sends to itself (not timed)
    link: LinkParams

    @property
    def rank_us(self) -> torch.Tensor:
        """[R] max(egress, ingress) per rank."""
        return torch.maximum(self.egress_us, self.ingress_us)

    @property
    def phase_us(self) -> float:
        """The slowest rank's time (the phase ends at a barrier)."""
        return float(self.rank_us.max())


def _total(x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(x, Mapping):
        if not x:
            raise ValueError("need at least one channel")
        return sum((v.to(torch.int64) for v in x.values()), torch.zeros_like(
            next(iter(x.values())), dtype=torch.int64))
    return x.to(torch.int64)


def phase_model(name: str, nbytes: torch.Tensor | Mapping[str, torch.Tensor],
                messages: torch.Tensor | Mapping[str, torch.Tensor], link: LinkParams
                ) -> PhaseModel:
    """Model one phase from bytes [R,R] and message counts [R,R] (row = sender), either
    plain tensors or dicts of per-channel tensors (summed). Self traffic is not timed."""
    b, m = _total(nbytes), _total(messages)
    if b.dim() != 2 or b.shape[0] != b.shape[1] or m.shape != b.shape:
        raise ValueError(f"bytes and messages must both be [R,R], got {tuple(b.shape)} "
                         f"and {tuple(m.shape)}")
    eye = torch.eye(b.shape[0], dtype=torch.bool)
    self_bytes = torch.diagonal(b).clone()
    b_link = b.masked_fill(eye, 0)
    m_link = m.masked_fill(eye, 0).to(torch.float64)
    us_per_byte = 1e6 / (link.bandwidth_gbps * 1e9)
    cost = b_link.to(torch.float64) * us_per_byte + m_link * link.latency_us
    return PhaseModel(name=name, egress_us=cost.sum(dim=1), ingress_us=cost.sum(dim=0),
                      link_bytes=b_link, self_bytes=self_bytes, link=link)


@dataclass(frozen=True)
class CommModel:
    """Modelled dispatch + combine time per rank (a model: see the module docstring)."""

    dispatch: PhaseModel
    combine: PhaseModel

    LABEL = "MODEL (alpha-beta, not measured)"

    @property
    def rank_us(self) -> torch.Tensor:
        """[R] dispatch + combine time per rank."""
        return self.dispatch.rank_us + self.combine.rank_us

    def table(self) -> list[dict[str, float]]:
        """One row per rank: dispatch_us, combine_us, total_us, self bytes."""
        return [{"rank": r, "dispatch_us": float(self.dispatch.rank_us[r]),
                 "combine_us": float(self.combine.rank_us[r]),
                 "total_us": float(self.rank_us[r]),
                 "self_bytes": int(self.dispatch.self_bytes[r] + self.combine.self_bytes[r])}
                for r in range(self.rank_us.numel())]


def comm_model(counts: torch.Tensor, hidden: int,
               dispatch_link: LinkParams = DISPATCH_LINK,
               combine_link: LinkParams = COMBINE_LINK,
               per: Literal["route", "peer"] = "peer") -> CommModel:
    """Dispatch and combine model for counts[src,dst,e] and hidden size D. `per` picks the
    message granularity: 'peer' (DeepEP style, the default: one message per non-empty
    (src, dst) pair carrying all four dispatch channels, and one per pair in combine) or
    'route' (the spec's protocol: one remote store per route and dispatch channel, one
    per route in combine)."""
    msgs = dispatch_messages(counts, per)
    disp = phase_model("dispatch", dispatch_bytes(counts, hidden),
                       {c: msgs for c in DISPATCH_CHANNELS} if per == "route" else msgs,
                       dispatch_link)
    comb = phase_model("combine", combine_bytes(counts, hidden), msgs.t().contiguous(),
                       combine_link)
    return CommModel(dispatch=disp, combine=comb)
