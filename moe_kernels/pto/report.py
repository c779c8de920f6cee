"""Per-stage SIM latency vs roofline at the per-rank shapes of a run (the `stages` command).

Per rank: T = batch·seq tokens, NL = n_local experts, each local expert receiving the
mean load ceil(T·K/NL) rows (a balanced layout), the rank packing and scattering all of
its T·K routes. Each stage kernel runs once in SIM on seeded inputs of those shapes.

bytes, int8/fp FLOPs and vector ops are the stage's named cost formulas in the registry
(`moe_kernels.stages`), the same ones the step model uses.
roofline_us = max(bytes / BW, int8_flops / P_int8 + fp_flops / P_bf16): calibrated limits
(moe_kernels.pto.calibrate, what the cost model sustains) and configured ones (pypto's
lib/configs/A2A3.ini, see `configured_limits`). FP32 matmuls (hc_pre, gate) are counted at
the BF16 peak: they are tiny and memory-bound.

vec_roof_us (a separate, extra bound; roofline_us above is unchanged): the registry's vector
ops at the calibrated FP32 vector throughput (moe_kernels.pto.calibrate.vector_calibration).
`bound_ratio` = sim_us / max(roofline_us, vec_roof_us).
"""
from __future__ import annotations

import configparser
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import RunConfig
from ..fixtures import generator, make_gate_weights, make_inputs
from ..stages import STAGE_NAMES, STAGES, StageShape, stage_cost
from ..step import cache
from ..types import ExpertWeights
from . import explain as ex
from . import runtime as rt


@dataclass(frozen=True)
class Limits:
    """Roofline limits: HBM bytes/s, INT8 ops/s, BF16 FLOP/s; `source` says where from."""

    hbm_bytes_per_s: float
    int8_ops_per_s: float
    bf16_flops_per_s: float
    source: str


@dataclass(frozen=True)
class StageRecord:
    """One stage of one rank: SIM latency, work, and its rooflines."""

    stage: str
    sim_us: float
    bytes: int
    flops: int
    roofline_us: float          # at the calibrated limits
    config_roofline_us: float   # at the configured (A2A3.ini) limits
    int8_flops: int = 0
    n_tasks: int = 0
    utilization: float = 0.0
    trace_path: str = ""
    vec_ops: int = 0            # elementwise vector ops the math needs (see module doc)
    vec_roof_us: float = 0.0    # vec_ops at the calibrated vector throughput
    # fixed costs on the critical path (pto.explain): task, DMA and dependent-op parts,
    # the best of those and the throughput bounds, and the largest single part
    task_us: float = 0.0
    dma_us: float = 0.0
    chain_us: float = 0.0
    explained_us: float = 0.0
    dominant: str = ""

    @property
    def explained_ratio(self) -> float:
        """sim_us / explained_us: 1.0 means the parts account for the whole time."""
        return self.sim_us / self.explained_us if self.explained_us else math.inf

    @property
    def bound_ratio(self) -> float:
        """sim_us / max(roofline_us, vec_roof_us): against memory, matmul and vector bounds."""
        b = max(self.roofline_us, self.vec_roof_us)
        return self.sim_us / b if b else math.inf

    @property
    def ratio(self) -> float:
        """sim_us / roofline_us (calibrated)."""
        return self.sim_us / self.roofline_us if self.roofline_us else math.inf

    @property
    def config_ratio(self) -> float:
        return self.sim_us / self.config_roofline_us if self.config_roofline_us else math.inf

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items()}
        d["ratio"] = self.ratio
        d["config_ratio"] = self.config_ratio
        d["bound_ratio"] = self.bound_ratio
        return d


def configured_limits() -> Limits:
    """The 910B (A2A3) model's nominal limits from pypto's shipped lib/configs/A2A3.ini.

    HBM: [AICoreMemoryRates] ddr_rate (bytes/cycle per AI core) x [SoCInfo] ai_core_cnt.
    Peak: [AICoreSpec] cube_m_size·cube_n_size·cube_k_size MACs/cycle (BF16) and
    [DtypeMKN] DT_INT8 m·k·n (INT8), x 2 FLOP/MAC x cube_core_cnt. Cycles at runtime.CLOCK_MHZ.
    """
    ini = configparser.ConfigParser()
    ini.read(rt._shipped_lib_dir() / "configs" / "A2A3.ini")
    hz = rt.CLOCK_MHZ * 1e6
    cores = ini.getint("SoCInfo", "ai_core_cnt")
    cube = ini.getint("SoCInfo", "cube_core_cnt")
    spec = ini["AICoreSpec"]
    bf16_mac = (spec.getint("cube_m_size") * spec.getint("cube_n_size")
                * spec.getint("cube_k_size"))
    i8 = [int(v) for v in ini.get("DtypeMKN", "DT_INT8").split(",")]
    return Limits(hbm_bytes_per_s=ini.getint("AICoreMemoryRates", "ddr_rate") * cores * hz,
                  int8_ops_per_s=2.0 * i8[0] * i8[1] * i8[2] * cube * hz,
                  bf16_flops_per_s=2.0 * bf16_mac * cube * hz,
                  source="pypto lib/configs/A2A3.ini")


def calibrated_limits() -> Limits:
    from .calibrate import calibration
    c = calibration()
    return Limits(c.hbm_bytes_per_s, c.int8_ops_per_s, c.bf16_flops_per_s,
                  source="calibrated SIM (moe_kernels.pto.calibrate)")


def calibrated_vector_ops_per_s() -> float:
    """Sustained FP32 elementwise vector ops/s of the SIM model (48 AIV), calibrated."""
    from .calibrate import vector_calibration
    return vector_calibration().vec_ops_per_s


def roofline_us(nbytes: float, int8_flops: float, fp_flops: float, lim: Limits) -> float:
    """max(memory time, compute time) in microseconds."""
    mem = nbytes / lim.hbm_bytes_per_s
    comp = int8_flops / lim.int8_ops_per_s + fp_flops / lim.bf16_flops_per_s
    return max(mem, comp) * 1e6


def _i8(seed: int, name: str, *shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=generator(seed, name), dtype=torch.int8)


def _pos(seed: int, name: str, *shape: int, scale: float = 1e-3) -> torch.Tensor:
    return (torch.rand(*shape, generator=generator(seed, name)) + 0.5) * scale


def _empty_i8(seed: int, name: str, *shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int8)  # never touched: no pages, no memory


def _stage_cases(run: RunConfig, seed: int, latency_only: bool = False
                 ) -> dict[str, Callable]:
    """stage -> thunk running its kernel on seeded inputs of the per-rank shape of `run`,
    returning (outputs, LatencyRecord). latency_only: expert weights are uninitialised
    torch.empty (flash/pro routed weights are 6-25 GiB) and expert_routed is timed
    without inputs (`ffn.expert_routed_latency`); run the thunks inside
    `runtime.latency_only()`, the interpreter would read garbage."""
    cfg = run.model
    t, d, i, hcm = run.tokens, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hc_mult
    k, nl = cfg.num_experts_per_tok, run.n_local
    c = -(-t * k // nl)  # mean rows per local expert (balanced layout)
    n = t * k
    inp = make_inputs(RunConfig(cfg, batch=run.batch, seq=run.seq, ranks=1,
                                routing=run.routing), seed)
    x_hc = inp.x_hc[0]
    ids = inp.input_ids[0]
    gw = make_gate_weights(cfg, seed)   # hc_pre and gate weights, no experts
    hc_fn, hc_scale, hc_base = gw.hc_fn, gw.hc_scale, gw.hc_base
    x_mixed = torch.randn(run.batch, run.seq, d, generator=generator(seed, "xm")).bfloat16()
    norm_w, gate_w, gate_b, tid2eid = gw.norm_w, gw.gate_w, gw.gate_bias, gw.tid2eid
    xq = _i8(seed, "xq", t, d)
    xs = _pos(seed, "xs", t, 1, scale=0.02)
    wts = torch.full((t, k), 1.0 / k)
    w8 = _empty_i8 if latency_only else _i8
    sw = {nm: w8(seed, f"s{nm}", *shape) for nm, shape in
          (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i)))}
    rw = {nm: w8(seed, f"r{nm}", nl, *shape) for nm, shape in
          (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i)))}
    rx = _i8(seed, "rx", nl, c, d)
    rs = _pos(seed, "rs", nl, c, scale=0.02)
    rwt = torch.full((nl, c), 1.0 / k)
    cnt = torch.full((nl,), c, dtype=torch.int64)
    rows = torch.randn(n, d, generator=generator(seed, "rows")).bfloat16()
    perm = torch.randperm(n, generator=generator(seed, "perm")).to(torch.int32)
    sh = torch.randn(t, d, generator=generator(seed, "sh")).bfloat16()
    post = torch.rand(run.batch, run.seq, hcm) * 2
    comb = torch.rand(run.batch, run.seq, hcm, hcm) / hcm
    lim = cfg.swiglu_limit
    kernels = {name: STAGES[name].kernel() for name in STAGE_NAMES}
    if latency_only:
        from . import ffn
        kernels["expert_routed"] = lambda *a: (None, ffn.expert_routed_latency(
            ffn.routed_rows([c] * nl, c), c, d, i, lim))
    return {
        "hc_pre": lambda: kernels["hc_pre"](x_hc, hc_fn, hc_scale, hc_base, cfg),
        "gate": lambda: kernels["gate"](x_mixed, norm_w, gate_w, gate_b, tid2eid, ids, cfg,
                                        run.routing),
        "expert_shared": lambda: kernels["expert_shared"](xq, xs, ExpertWeights(
            sw["w1"], _pos(seed, "s1", i), sw["w3"], _pos(seed, "s3", i), sw["w2"],
            _pos(seed, "s2", d)), lim),
        "pack_routes": lambda: kernels["pack_routes"](xq, xs, wts, perm),
        "expert_routed": lambda: kernels["expert_routed"](rx, rs, rwt, cnt, ExpertWeights(
            rw["w1"], _pos(seed, "rs1", nl, i), rw["w3"], _pos(seed, "rs3", nl, i),
            rw["w2"], _pos(seed, "rs2", nl, d)), lim),
        "scatter_routes": lambda: kernels["scatter_routes"](rows, perm, n),
        "reduce_routes": lambda: kernels["reduce_routes"](sh, rows, k),
        "hc_post": lambda: kernels["hc_post"](sh.reshape(run.batch, run.seq, d), x_hc, post,
                                              comb),
    }


def timing_shape(run: RunConfig, stage: str) -> dict[str, Any]:
    """What a stage kernel's SIM time depends on (the shape part of its timing-cache key):
    every model size plus batch, seq and routing; expert_routed (whose inputs are NL
    experts x C rows) also NL and the balanced rows. Ranks do not enter otherwise."""
    shape: dict[str, Any] = {k: v for k, v in run.model.to_dict().items() if k != "name"}
    shape.update(batch=run.batch, seq=run.seq, routing=run.routing)
    if stage == "expert_routed":
        shape.update(n_local=run.n_local, rows=-(-run.tokens * run.model.num_experts_per_tok
                                                 // run.n_local))
    return shape


def _measure(thunk: Callable, name: str) -> dict[str, Any]:
    _, lat = thunk()
    if lat is None:
        raise RuntimeError(f"stage {name}: no SIM latency (not running in SIM mode)")
    return {"aicore_us": lat.aicore_us, "n_tasks": lat.n_tasks,
            "utilization": lat.utilization, "trace_path": lat.trace_path,
            "path": ex.path_dict(lat.output_dir)}


def time_stage(run: RunConfig, stage: str, seed: int = 0,
               cases: dict[str, Callable] | None = None) -> tuple[dict[str, Any], bool]:
    """(timing entry, cache hit) of `stage` at the per-rank shape of `run`: SIM cost model
    without the interpreter (uninitialised weights), from the disk cache when present.
    The entry's aicore_us is the SIM latency in microseconds."""
    def measure() -> dict[str, Any]:
        thunks = cases if cases is not None else _stage_cases(run, seed, latency_only=True)
        with rt.latency_only():
            return _measure(thunks[stage], stage)
    return cache.cached(cache.make_key(stage, timing_shape(run, stage)), measure)


def stage_report(run: RunConfig, seed: int = 0, stages: tuple[str, ...] | None = None,
                 verify: bool = False) -> list[StageRecord]:
    """One StageRecord per stage at the per-rank shapes of `run` (SIM latency, bytes,
    FLOPs, calibrated and configured rooflines). `stages` picks a subset (default all).

    verify=False (default): SIM cost model only, no CPU interpreter, uninitialised
    weights, so any preset runs; times come from the disk timing cache (`step.cache`)
    when present. verify=True also computes the numbers in the interpreter (slow; small
    shapes) and always re-simulates."""
    if not isinstance(run, RunConfig):
        raise TypeError(f"run must be a RunConfig, got {type(run).__name__}")
    wanted = STAGE_NAMES if stages is None else tuple(stages)
    unknown = set(wanted) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"stages must be a subset of {list(STAGE_NAMES)}, "
                         f"got {sorted(unknown)}")
    cal, conf = calibrated_limits(), configured_limits()
    vec_rate = calibrated_vector_ops_per_s()
    shape = StageShape.from_run(run)
    cases = _stage_cases(run, seed, latency_only=not verify)
    out = []
    for name in wanted:
        cost = stage_cost(name, shape)
        nbytes, i8f, fpf = cost.hbm_bytes, cost.int8_ops, cost.fp_flops
        lat = _measure(cases[name], name) if verify else time_stage(run, name, seed,
                                                                      cases)[0]
        if not verify and not ex.path_current(lat.get("path")):
            # a cached entry counted by an older pto.explain (or none): simulate it again
            with rt.latency_only():
                lat = cache.store(cache.make_key(name, timing_shape(run, name)),
                                  _measure(cases[name], name))
        expl = ex.explain_entry(lat.get("path"), nbytes / cal.hbm_bytes_per_s * 1e6,
                                (i8f / cal.int8_ops_per_s + fpf / cal.bf16_flops_per_s) * 1e6,
                                cost.vec_ops / vec_rate * 1e6)
        out.append(StageRecord(
            stage=name, sim_us=lat["aicore_us"], bytes=int(nbytes), flops=int(i8f + fpf),
            roofline_us=roofline_us(nbytes, i8f, fpf, cal),
            config_roofline_us=roofline_us(nbytes, i8f, fpf, conf), int8_flops=int(i8f),
            n_tasks=lat["n_tasks"], utilization=lat["utilization"],
            trace_path=lat["trace_path"], vec_ops=cost.vec_ops,
            vec_roof_us=cost.vec_ops / vec_rate * 1e6, task_us=expl.task_us,
            dma_us=expl.dma_us, chain_us=expl.chain_us, explained_us=expl.bound_us,
            dominant=expl.dominant if expl.counts else ""))
    return out


def format_stage_table(records: list[StageRecord]) -> str:
    """A fixed-width table: one row per stage plus the total, both rooflines and ratios."""
    hdr = (f"{'stage':<15}{'sim_us':>10}{'MB':>9}{'GFLOP':>9}{'roof_us':>10}{'ratio':>7}"
           f"{'cfg_roof':>10}{'cfg_ratio':>10}{'vec_roof':>10}{'bnd_ratio':>10}{'tasks':>7}"
           f"{'task':>7}{'dma':>7}{'chain':>7}{'dominant':>9}{'x_best':>7}")
    lines = [hdr, "-" * len(hdr)]
    for r in records:
        lines.append(f"{r.stage:<15}{r.sim_us:>10.2f}{r.bytes / 1e6:>9.2f}{r.flops / 1e9:>9.3f}"
                     f"{r.roofline_us:>10.2f}{r.ratio:>7.2f}{r.config_roofline_us:>10.2f}"
                     f"{r.config_ratio:>10.2f}{r.vec_roof_us:>10.2f}{r.bound_ratio:>10.2f}"
                     f"{r.n_tasks:>7}{r.task_us:>7.1f}{r.dma_us:>7.1f}{r.chain_us:>7.1f}"
                     f"{r.dominant or '-':>9}{r.explained_ratio:>7.2f}")
    sim = sum(r.sim_us for r in records)
    roof = sum(r.roofline_us for r in records)
    croof = sum(r.config_roofline_us for r in records)
    bound = sum(max(r.roofline_us, r.vec_roof_us) for r in records)
    lines.append("-" * len(hdr))
    lines.append(f"{'total':<15}{sim:>10.2f}{sum(r.bytes for r in records) / 1e6:>9.2f}"
                 f"{sum(r.flops for r in records) / 1e9:>9.3f}{roof:>10.2f}"
                 f"{(sim / roof if roof else math.inf):>7.2f}{croof:>10.2f}"
                 f"{(sim / croof if croof else math.inf):>10.2f}"
                 f"{sum(r.vec_roof_us for r in records):>10.2f}"
                 f"{(sim / bound if bound else math.inf):>10.2f}")
    lines.append(f"SIM: pypto {rt.SUPPORTED_PYPTO_VERSION} cost model (910B / A2A3), "
                 f"AICore end-to-end at {rt.CLOCK_MHZ:.0f} MHz. roof = calibrated limits, "
                 f"cfg_roof = A2A3.ini limits; vec_roof = vector ops at the calibrated FP32 "
                 f"vector rate (extra bound, not in roof); bnd_ratio = sim / max(roof, vec_roof). "
                 f"task/dma/chain = calibrated fixed costs on the critical path (pto.explain); "
                 f"dominant = largest part; x_best = sim / max(task+dma+chain, HBM, cube, vec).")
    return "\n".join(lines)
