"""Bytes of the EP step's count exchange, dispatch and combine, and a MODEL of their time.

Bytes come from the EP program's own accounting, `moe_kernels.ep.layout.peer_channel_bytes`: a
route (one (token, expert) pair) from rank src to an expert of rank dst moves, in
dispatch, its INT8 row (D bytes) and three padded 32-byte tiles (scale, weight, r_route);
in combine one BF16 row (2·D bytes) back from dst to src. In the count exchange every rank
writes its whole histogram [R, NL] (INT32 `pub_counts` rows, ep/windows.py) to every
rank. Traffic of a rank to itself (src == dst) does not cross a link and is not timed.

The model (an alpha-beta model with a fixed cost per call, NOT a measurement). With
bytes b[src, dst] and messages m[src, dst] (one per non-empty peer, or one per route)::

    egress_us[r]  = max(Σ_d b[r,d] / port, max_d b[r,d] / link) + latency · Σ_d m[r,d]
    ingress_us[r] = the same over the column r (what r receives)
    rank_us[r]    = overhead + max(egress_us[r], ingress_us[r]);  phase_us = max_r rank_us

`port` is a rank's fabric bandwidth per direction, `link` the per-peer cap of a full mesh
(None on a switched fabric). `overhead` is the kernel's fixed cost per call (launch,
quantisation, flag handshakes), the one quantity no hardware sheet gives.

Where the numbers come from (none is a published DeepEP-Ascend latency or bandwidth):

| parameter (constant) | value | source |
|---|---|---|
| A3 UB per rank, per direction (`A3_UB.port_gbps`) | 196 GB/s | [1] §3.3.1 |
| A3 rank = one 910C die | 16 per node | [2] |
| A3 cost per message (`A3_UB.latency_us`) | 1.0 us | ASSUMPTION, bound of [1] |
| A2 HCCS per 910B (`A2_HCCS.port_gbps`) | 392 GB/s | [3], [4] |
| A2 HCCS per peer link (`A2_HCCS.link_gbps`) | 56 GB/s | [4]; direction ASSUMED |
| A2 cost per message (`A2_HCCS.latency_us`) | 1.0 us | ASSUMPTION (none found) |
| count-exchange overhead | 0 us | ASSUMPTION (none found) |
| dispatch / combine overhead (`fit_overheads`) | fitted | [5], EP8 row only |

[1] Zuo et al., "Serving Large Language Models on Huawei CloudMatrix384",
    arXiv:2506.12708 (2025). §3.3.1: the UB interface of a 910C die gives 196 GB/s per
    direction (seven 224 Gbps links; 392 GB/s per two-die package). §3: across nodes UB
    loses < 3 % bandwidth and adds < 1 us latency; no per-message cost is published, so
    1 us per peer message is an assumption taken from that bound.
[2] hiascend.com, MindCluster scheduling guide, "Atlas 900 A3 SuperPoD": two processors
    (dies) per HiAM module over SIO, eight HiAM modules per node; one EP rank per die.
[3] Huawei, Atlas 800T A2 training server technical specifications (support.huawei.com,
    EDDOC1100317202): 8 x 910B, HCCS full mesh, "HCCS 392GB/s".
[4] ArthurChiao/arthurchiao.github.io, "GPU Advanced Notes 2: Huawei Ascend 910B" §3.1
    and §4: HCCS peer-to-peer, one-to-one max 56 GB/s, one-to-many 392 GB/s (7 links).
    Neither [3] nor [4] says per direction or both; we ASSUME per direction.
[5] The only fitted numbers: DeepEP-Ascend's EP8 latency (`published.DEEPEP_ASCEND_LL`,
    sgl-project/sgl-kernel-npu README) minus the modelled A3 link time at EP8. EP16 and
    EP32 are held out: `published_comparison`, `python -m moe_kernels comm --validate`.

What the fit says: at EP8 the A3 link time is 40 us of dispatch's 132 us and 73 us of
combine's 126 us; the rest is per-call cost. The held-out error moves with the assumed
latency (0 us per message: up to -12 %; 1 us: up to +4 %). On A2 the overheads are reused
as they are (ASSUMPTION: the same kernel cost on 910B).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from typing import Literal

import torch

from ..config import check_int
from ..ep.layout import peer_channel_bytes, send_histogram
from .published import DEEPEP_ASCEND_LL, DEEPEP_ASCEND_LL_SHAPE, DEEPEP_ASCEND_SOURCE

#: The four dispatch payload channels, in the spec's order, and the combine channel (the
#: keys of `ep.layout.peer_channel_bytes`).
DISPATCH_CHANNELS: tuple[str, ...] = ("x_i8", "scale", "weight", "r_route")
COMBINE_CHANNEL = "combine"
#: Bytes per entry of the published count table (`pub_counts` is INT32, ep/windows.py).
COUNT_ENTRY_BYTES = 4
#: The published point the overheads are fitted on; the others are held out.
FIT_EP = 8
#: Routed experts at the published shape. ASSUMPTION: DeepSeek-V3's 256 (the source does
#: not say); it only sets NL, the bytes at uniform routing do not depend on it.
PUBLISHED_EXPERTS = 256
#: Held-out error bound of `python -m moe_kernels comm --validate` (percent).
HELD_OUT_BOUND_PCT = 25.0

_CM384 = "arXiv:2506.12708 (CloudMatrix384) §3.3.1"


@dataclass(frozen=True)
class Fabric:
    """A rank's interconnect: bandwidth per direction of its port (GB/s, 1 GB = 1e9 B),
    optional per-peer link cap (full mesh), and a cost per message (us)."""

    name: str
    port_gbps: float
    link_gbps: float | None
    latency_us: float
    source: str


#: A3 SuperPoD (CloudMatrix384 / Atlas 900 A3): UB per 910C die, switched (no peer cap).
A3_UB = Fabric("A3 SuperPoD UB, per 910C die", 196.0, None, 1.0,
               f"{_CM384}: UB 196 GB/s per die; 1 us/msg assumed (< 1 us bound)")
#: Atlas 800T A2: 8 x 910B, HCCS full mesh, 7 links of 56 GB/s = 392 GB/s per chip.
A2_HCCS = Fabric("Atlas 800T A2 HCCS, per 910B", 392.0, 56.0, 1.0,
                 "Atlas 800T A2 spec (HCCS 392 GB/s); 56 GB/s per link (ArthurChiao, "
                 "GPU Advanced Notes 2); 1 us/msg assumed")
FABRICS: dict[str, Fabric] = {"a3": A3_UB, "a2": A2_HCCS}


@dataclass(frozen=True)
class LinkParams:
    """One phase's parameters: port bandwidth per rank and direction (GB/s), cost per
    message (us), optional per-peer cap (GB/s), fixed cost per call (us), provenance."""

    bandwidth_gbps: float
    latency_us: float
    source: str = "parameter"
    peer_gbps: float | None = None
    overhead_us: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise ValueError(f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps!r}")
        if not self.latency_us >= 0:
            raise ValueError(f"latency_us must be >= 0, got {self.latency_us!r}")
        if self.peer_gbps is not None and not self.peer_gbps > 0:
            raise ValueError(f"peer_gbps must be None or > 0, got {self.peer_gbps!r}")
        if not self.overhead_us >= 0:
            raise ValueError(f"overhead_us must be >= 0, got {self.overhead_us!r}")


def fabric_link(fabric: Fabric, overhead_us: float = 0.0, what: str = "") -> LinkParams:
    """LinkParams of `fabric` with a fixed cost per call."""
    src = fabric.source + (f"; {what}" if what else "")
    return LinkParams(fabric.port_gbps, fabric.latency_us, src, fabric.link_gbps, overhead_us)


def _routes(counts: torch.Tensor) -> torch.Tensor:
    if counts.dim() not in (2, 3) or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be [R, R, NL] (src, dst, local expert) or [R, R] "
                         f"routes, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    counts = counts.to(torch.int64)
    return counts.sum(dim=2) if counts.dim() == 3 else counts


def dispatch_bytes(counts: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    """Bytes [R,R] (row = sender src, column = receiver dst) per dispatch channel, from
    counts[src, dst, e] (or routes [R,R]) and hidden size D. Includes the diagonal."""
    check_int("hidden", hidden)
    per = peer_channel_bytes(_routes(counts), hidden)
    return {c: per[c] for c in DISPATCH_CHANNELS}


def combine_bytes(counts: torch.Tensor, hidden: int) -> torch.Tensor:
    """Combine bytes [R,R] (row = sender = expert owner, column = origin rank): one BF16
    row of D per route, sent back from dst to src, i.e. transpose(routes) · 2·D."""
    check_int("hidden", hidden)
    return peer_channel_bytes(_routes(counts), hidden)[COMBINE_CHANNEL]


def count_bytes(ranks: int, n_local: int) -> torch.Tensor:
    """Count-exchange bytes [R,R]: every rank writes its [R, NL] INT32 histogram to every
    rank (diagonal included, not timed)."""
    if not isinstance(ranks, int) or ranks < 1 or not isinstance(n_local, int) or n_local < 1:
        raise ValueError(f"ranks and n_local must be positive integers, got {ranks!r}, "
                         f"{n_local!r}")
    return torch.full((ranks, ranks), ranks * n_local * COUNT_ENTRY_BYTES, dtype=torch.int64)


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
class PhaseModel:
    """Modelled time of one phase (count exchange, dispatch or combine), per rank, in us."""

    name: str
    egress_us: torch.Tensor   # [R] FP64, link time of what the rank sends
    ingress_us: torch.Tensor  # [R] FP64, link time of what the rank receives
    link_bytes: torch.Tensor  # [R,R] INT64, off-diagonal bytes (diagonal zeroed)
    self_bytes: torch.Tensor  # [R] INT64, bytes a rank sends to itself (not timed)
    link: LinkParams

    @property
    def rank_us(self) -> torch.Tensor:
        """[R] overhead + max(egress, ingress) per rank."""
        return torch.maximum(self.egress_us, self.ingress_us) + self.link.overhead_us

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
    bf = b_link.to(torch.float64)
    m_link = m.masked_fill(eye, 0).to(torch.float64)
    out = bf.sum(dim=1) / (link.bandwidth_gbps * 1e3)        # 1 GB/s = 1e3 bytes per us
    inn = bf.sum(dim=0) / (link.bandwidth_gbps * 1e3)
    if link.peer_gbps is not None:
        pair = bf / (link.peer_gbps * 1e3)
        out = torch.maximum(out, pair.max(dim=1).values)
        inn = torch.maximum(inn, pair.max(dim=0).values)
    return PhaseModel(name=name, egress_us=out + m_link.sum(dim=1) * link.latency_us,
                      ingress_us=inn + m_link.sum(dim=0) * link.latency_us,
                      link_bytes=b_link, self_bytes=self_bytes, link=link)


@dataclass(frozen=True)
class CommModel:
    """Modelled dispatch + combine time per rank (a model: see the module docstring)."""

    dispatch: PhaseModel
    combine: PhaseModel

    LABEL = "MODEL (alpha-beta + per-call overhead, not measured)"

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


def _phases(counts: torch.Tensor, hidden: int, dispatch_link: LinkParams,
            combine_link: LinkParams, per: Literal["route", "peer"]) -> CommModel:
    msgs = dispatch_messages(counts, per)
    disp = phase_model("dispatch", dispatch_bytes(counts, hidden),
                       {c: msgs for c in DISPATCH_CHANNELS} if per == "route" else msgs,
                       dispatch_link)
    comb = phase_model("combine", combine_bytes(counts, hidden), msgs.t().contiguous(),
                       combine_link)
    return CommModel(dispatch=disp, combine=comb)


def uniform_counts(ranks: int, tokens: int, topk: int, n_experts: int) -> torch.Tensor:
    """counts [R,R,NL] when every rank routes token t to experts (t·K + k) mod E: uniform
    routing through the EP program's own `send_histogram` (every src alike)."""
    if n_experts % ranks or topk > n_experts:
        raise ValueError(f"need ranks | n_experts and topk <= n_experts, got {ranks}, "
                         f"{n_experts}, {topk}")
    idx = (torch.arange(tokens * topk) % n_experts).reshape(tokens, topk)
    hist = send_histogram(idx, n_experts // ranks, ranks)
    return hist.unsqueeze(0).expand(ranks, -1, -1).clone()


def _published_model(ep: int, dispatch_link: LinkParams, combine_link: LinkParams
                     ) -> CommModel:
    tokens, hidden, topk = DEEPEP_ASCEND_LL_SHAPE
    counts = uniform_counts(ep, tokens, topk, PUBLISHED_EXPERTS)
    return _phases(counts, hidden, dispatch_link, combine_link, "peer")


@cache
def fit_overheads(fabric: Fabric = A3_UB, ep: int = FIT_EP) -> tuple[float, float]:
    """(dispatch, combine) fixed cost per call: the published DeepEP-Ascend latency at
    `ep` ranks minus the link time the model gives there on `fabric`, at least 0."""
    bare = fabric_link(fabric)
    m = _published_model(ep, bare, bare)
    disp_us, _, comb_us, _ = DEEPEP_ASCEND_LL[ep]
    return max(disp_us - m.dispatch.phase_us, 0.0), max(comb_us - m.combine.phase_us, 0.0)


@dataclass(frozen=True)
class CommLinks:
    """The three phases' parameters of one EP step."""

    counts: LinkParams
    dispatch: LinkParams
    combine: LinkParams


def fabric_links(fabric: Fabric = A3_UB) -> CommLinks:
    """Count exchange, dispatch and combine on `fabric`; the dispatch / combine overheads
    are the ones fitted on A3 at EP8 (`fit_overheads()`), reused on any fabric."""
    d_over, c_over = fit_overheads()
    fit = f"overhead fitted on DeepEP-Ascend EP{FIT_EP} (A3)"
    return CommLinks(counts=fabric_link(fabric, 0.0, "no overhead (assumed)"),
                     dispatch=fabric_link(fabric, d_over, fit),
                     combine=fabric_link(fabric, c_over, fit))


_A3_LINKS = fabric_links(A3_UB)
#: Default dispatch / combine parameters: A3 UB hardware figures + EP8-fitted overheads.
DISPATCH_LINK = _A3_LINKS.dispatch
COMBINE_LINK = _A3_LINKS.combine


def comm_model(counts: torch.Tensor, hidden: int,
               dispatch_link: LinkParams = DISPATCH_LINK,
               combine_link: LinkParams = COMBINE_LINK,
               per: Literal["route", "peer"] = "peer") -> CommModel:
    """Dispatch and combine model for counts[src,dst,e] (or routes [R,R]) and hidden size
    D. `per` picks the message granularity: 'peer' (DeepEP style, the default: one message
    per non-empty (src, dst) pair carrying all four dispatch channels, and one per pair in
    combine) or 'route' (the spec's protocol: one remote store per route and dispatch
    channel, one per route in combine)."""
    return _phases(counts, hidden, dispatch_link, combine_link, per)


@dataclass(frozen=True)
class StepComm:
    """Modelled count exchange, dispatch and combine of one EP step, per rank."""

    counts: PhaseModel
    dispatch: PhaseModel
    combine: PhaseModel

    @property
    def rank_us(self) -> torch.Tensor:
        """[R] sum of the three phases per rank (serial upper bound)."""
        return self.counts.rank_us + self.dispatch.rank_us + self.combine.rank_us

    def per_rank_us(self) -> dict[str, list[float]]:
        """{"count exchange", "dispatch", "combine"} -> [R] us, for stacked bars."""
        return {"count exchange": self.counts.rank_us.tolist(),
                "dispatch": self.dispatch.rank_us.tolist(),
                "combine": self.combine.rank_us.tolist()}


def ep_step_comm(routes: torch.Tensor, hidden: int, n_local: int,
                 links: CommLinks | None = None,
                 per: Literal["route", "peer"] = "peer") -> StepComm:
    """Per-rank count-exchange, dispatch and combine time of one EP step, from the routes
    per (src, dst) pair ([R,R], or counts [R,R,NL]), hidden size D and experts per rank
    NL (the count table's width); `links` defaults to `fabric_links(A3_UB)`."""
    links = _A3_LINKS if links is None else links
    r = _routes(routes)
    cnt = count_bytes(r.shape[0], n_local)
    counts = phase_model("count exchange", cnt, torch.ones_like(cnt), links.counts)
    cm = _phases(r, hidden, links.dispatch, links.combine, per)
    return StepComm(counts=counts, dispatch=cm.dispatch, combine=cm.combine)


@dataclass(frozen=True)
class ComparisonRow:
    """Our modelled phase at a published shape next to the published latency."""

    ep: int
    phase: str            # "dispatch" or "combine"
    model_us: float
    published_us: float
    fitted: bool          # True if this point was used to fit the overheads
    source: str = DEEPEP_ASCEND_SOURCE

    @property
    def error_pct(self) -> float:
        """(model - published) / published, in percent."""
        return 100.0 * (self.model_us - self.published_us) / self.published_us


def published_comparison(links: CommLinks | None = None) -> list[ComparisonRow]:
    """Like for like: the model at each DeepEP-Ascend low-latency point (128 tokens,
    hidden 7168, top-8, uniform routing, EP8/16/32), dispatch and combine, beside the
    published latency; rows in (EP, phase) order, for a table or a plot."""
    links = _A3_LINKS if links is None else links
    rows = []
    for ep, (disp_us, _, comb_us, _) in sorted(DEEPEP_ASCEND_LL.items()):
        m = _published_model(ep, links.dispatch, links.combine)
        rows.append(ComparisonRow(ep, "dispatch", m.dispatch.phase_us, disp_us, ep == FIT_EP))
        rows.append(ComparisonRow(ep, "combine", m.combine.phase_us, comb_us, ep == FIT_EP))
    return rows


def held_out_max_error(rows: list[ComparisonRow]) -> float:
    """Largest |error %| over the rows not used to fit (0 if there are none)."""
    return max((abs(r.error_pct) for r in rows if not r.fitted), default=0.0)


def with_overheads(links: CommLinks, dispatch_us: float, combine_us: float) -> CommLinks:
    """`links` with other fixed costs per call (e.g. 0 for link time only)."""
    return replace(links, dispatch=replace(links.dispatch, overhead_us=dispatch_us),
                   combine=replace(links.combine, overhead_us=combine_us))
