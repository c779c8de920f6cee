"""The stage registry: for every stage, its torch reference, its pypto kernel and its cost.

One place per stage. The torch backend, the pypto backend, the `stages` report, the step
model and the notebooks' stage lists are all derived from `STAGES`. Costs are named
formulas of the per-rank shape (`StageShape`): the HBM bytes a stage must move at least
(every input read once, every output written once, weights included), its matmul work
(INT8 ops and FP FLOPs, 2·M·N·K) and its elementwise vector work (one op per element per
vector instruction the math needs). They feed the rooflines of `pto.report`; they are
never fitted to a stage's own SIM time.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .config import RunConfig
from .reference import dispatch_combine as _dc
from .reference import expert_routed as _er
from .reference import expert_shared as _es
from .reference import gate as _gate
from .reference import hc_post as _hp
from .reference import hc_pre as _hpre

#: Bytes per element of the dtypes the stages move.
BF16_BYTES = 2
FP32_BYTES = 4
INT8_BYTES = 1
INT32_BYTES = 4
#: A dispatched row's side channels as the kernels move them: FP32 scale + FP32 weight.
ROW_SIDE_BYTES = 2 * FP32_BYTES
#: Vector ops per element of composite functions (one per vector instruction).
SIGMOID_OPS = 3          # exp, add, divide
Q8_OPS = 6               # abs, row amax, scale multiply, three casts (FP32->INT32->FP16->INT8)
SWIGLU_OPS = 2 * 3 + SIGMOID_OPS + 2 + Q8_OPS   # g and u: cast + 2 muls; silu·u; Q8(h)


@dataclass(frozen=True)
class StageShape:
    """The per-rank sizes the stage costs depend on.

    `expert_rows` is the rows each local expert received (length NL); an expert with no
    rows streams no weights. Default: the balanced layout, ceil(T·K / NL) rows each.
    """

    tokens: int
    hidden: int
    intermediate: int
    hc: int
    mix: int
    experts: int
    topk: int
    n_local: int
    sinkhorn_iters: int
    hash_routing: bool
    expert_rows: tuple[int, ...]

    @classmethod
    def from_run(cls, run: RunConfig, expert_rows: tuple[int, ...] | None = None
                 ) -> StageShape:
        """The shape of one rank of `run`; `expert_rows` as received (default balanced)."""
        cfg = run.model
        nl, k, t = run.n_local, cfg.num_experts_per_tok, run.tokens
        rows = expert_rows if expert_rows is not None else (-(-t * k // nl),) * nl
        if len(rows) != nl or any(r < 0 for r in rows):
            raise ValueError(f"expert_rows must be {nl} counts >= 0, got {list(rows)}")
        return cls(tokens=t, hidden=cfg.hidden_size, intermediate=cfg.moe_intermediate_size,
                   hc=cfg.hc_mult, mix=cfg.mix_hc, experts=cfg.n_routed_experts, topk=k,
                   n_local=nl, sinkhorn_iters=cfg.hc_sinkhorn_iters,
                   hash_routing=run.routing == "hash", expert_rows=tuple(int(r) for r in rows))

    @property
    def routes(self) -> int:
        """T·K routes this rank sends (one per (token, chosen expert))."""
        return self.tokens * self.topk

    @property
    def ffn_weight_bytes(self) -> int:
        """One W8A8 SwiGLU expert: INT8 w1, w3 [I, D], w2 [D, I] and FP32 channel scales."""
        i, d = self.intermediate, self.hidden
        return 3 * i * d * INT8_BYTES + (2 * i + d) * FP32_BYTES


@dataclass(frozen=True)
class StageCost:
    """What a stage must do at least: HBM bytes, INT8 matmul ops, FP matmul FLOPs, vector ops."""

    hbm_bytes: int
    int8_ops: int = 0
    fp_flops: int = 0
    vec_ops: int = 0


def _hc_pre_cost(s: StageShape) -> StageCost:
    t, d, hc, mix = s.tokens, s.hidden, s.hc, s.mix
    read_x_hc = t * hc * d * BF16_BYTES
    read_hc_fn = mix * hc * d * FP32_BYTES
    write_x_mixed = t * d * BF16_BYTES
    write_post_comb = t * (hc + hc * hc) * FP32_BYTES
    rms = 3 * t * hc * d                       # cast, square, sum over hc·D
    mix_streams = t * d * 3 * hc               # per stream: cast, mul, add
    sinkhorn = t * hc * hc * 6 * s.sinkhorn_iters   # 2 normalisations of (sum, +eps, /)
    return StageCost(hbm_bytes=read_x_hc + read_hc_fn + write_x_mixed + write_post_comb,
                     fp_flops=2 * t * hc * d * mix, vec_ops=rms + mix_streams + sinkhorn)


def _gate_cost(s: StageShape) -> StageCost:
    t, d, e, k = s.tokens, s.hidden, s.experts, s.topk
    read_x = t * d * BF16_BYTES
    read_weights = d * FP32_BYTES + e * d * FP32_BYTES + e * FP32_BYTES   # norm, gate, bias
    read_ids = t * INT32_BYTES
    write_x_norm = t * d * (BF16_BYTES + INT8_BYTES) + t * FP32_BYTES    # bf16, int8, scale
    write_routes = t * k * (INT32_BYTES + FP32_BYTES)                    # indices, weights
    read_tid2eid = t * k * INT32_BYTES if s.hash_routing else 0
    return StageCost(hbm_bytes=read_x + read_weights + read_ids + write_x_norm + write_routes
                     + read_tid2eid,
                     fp_flops=2 * t * d * e,
                     vec_ops=t * d * (5 + 2 + Q8_OPS))   # RMS (5), 2 casts, Q8 of x_norm


def _expert_shared_cost(s: StageShape) -> StageCost:
    t, d, i = s.tokens, s.hidden, s.intermediate
    return StageCost(hbm_bytes=s.ffn_weight_bytes + t * (d * INT8_BYTES + FP32_BYTES)
                     + t * d * BF16_BYTES,
                     int8_ops=2 * t * 3 * i * d,
                     vec_ops=t * i * SWIGLU_OPS + t * d * 4)   # y: cast, 2 muls, cast


def _expert_routed_cost(s: StageShape) -> StageCost:
    d, i = s.hidden, s.intermediate
    active = sum(1 for r in s.expert_rows if r > 0)
    rows = sum(s.expert_rows)
    return StageCost(hbm_bytes=active * s.ffn_weight_bytes
                     + rows * (d * INT8_BYTES + ROW_SIDE_BYTES) + rows * d * BF16_BYTES,
                     int8_ops=2 * rows * 3 * i * d,
                     vec_ops=rows * i * SWIGLU_OPS + rows * d * 5)   # y also · weight


def _pack_routes_cost(s: StageShape) -> StageCost:
    n, d = s.routes, s.hidden
    return StageCost(hbm_bytes=2 * n * (d * INT8_BYTES + ROW_SIDE_BYTES) + n * INT32_BYTES)


def _scatter_routes_cost(s: StageShape) -> StageCost:
    n, d = s.routes, s.hidden
    return StageCost(hbm_bytes=2 * n * d * BF16_BYTES + n * 2 * INT32_BYTES)


def _reduce_routes_cost(s: StageShape) -> StageCost:
    t, d, k = s.tokens, s.hidden, s.topk
    return StageCost(hbm_bytes=t * d * BF16_BYTES + t * k * d * BF16_BYTES + t * d * BF16_BYTES,
                     vec_ops=t * d * (2 * k + 2))   # K+1 casts, K adds, one cast


def _hc_post_cost(s: StageShape) -> StageCost:
    t, d, hc = s.tokens, s.hidden, s.hc
    return StageCost(hbm_bytes=t * d * BF16_BYTES + 2 * t * hc * d * BF16_BYTES
                     + t * (hc + hc * hc) * FP32_BYTES,
                     # casts of f and the streams; per output stream: mul, hc (mul, add), cast
                     vec_ops=t * d * (1 + hc) + t * hc * d * (2 * hc + 2))


@dataclass(frozen=True)
class Stage:
    """One stage: its math in a line, its torch reference, its pypto kernel, its cost."""

    name: str
    math: str
    reference: Callable
    kernel_path: str            # "module:function" under moe_kernels.pto, loaded on demand
    cost: Callable[[StageShape], StageCost]
    in_ep_step: bool = True

    def kernel(self) -> Callable:
        """The pypto kernel wrapper (imports pypto on first use)."""
        module, fn = self.kernel_path.split(":")
        return getattr(importlib.import_module(f"moe_kernels.pto.{module}"), fn)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("hc_pre", "hyper-connection pre-mix: RMS, mix matmul, Sinkhorn -> x_mixed, post, "
          "comb", _hpre.hc_pre, "hc:hc_pre", _hc_pre_cost),
    Stage("gate", "FFN RMSNorm, per-token INT8, sqrt-softplus scores, top-k (hash or sort)",
          _gate.gate, "gate:gate", _gate_cost),
    Stage("expert_shared", "the shared W8A8 SwiGLU expert over every token",
          _es.expert_shared, "shared_ffn:expert_shared", _expert_shared_cost),
    Stage("pack_routes", "gather each route's INT8 row, scale and weight for dispatch",
          _dc.pack_routes, "routes:pack_routes", _pack_routes_cost),
    Stage("expert_routed", "each local expert's W8A8 SwiGLU over its received rows, "
          "times the routing weight", _er.expert_routed, "ffn:expert_routed",
          _expert_routed_cost),
    Stage("scatter_routes", "single card only: write each expert row back to its route",
          _dc.scatter_routes, "routes:scatter_routes", _scatter_routes_cost,
          in_ep_step=False),
    Stage("reduce_routes", "ffn_out = bf16(sh + sum_k routed_y[t, k]) in FP32",
          _dc.reduce_routes, "routes:reduce_routes", _reduce_routes_cost),
    Stage("hc_post", "hyper-connection post-mix: x_next = post·ffn_out + comb·x_hc",
          _hp.hc_post, "hc:hc_post", _hc_post_cost),
)}

#: Every stage, in layer order.
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
#: The compute stages of one EP step, in order (no scatter_routes: combine writes routes).
EP_STEP_STAGES: tuple[str, ...] = tuple(n for n, s in STAGES.items() if s.in_ep_step)


def stage_cost(name: str, shape: StageShape) -> StageCost:
    """The named cost of stage `name` at `shape`; ValueError names the known stages."""
    if name not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGE_NAMES)}, got {name!r}")
    return STAGES[name].cost(shape)
