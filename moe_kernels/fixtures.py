"""Seeded, deterministic inputs and weights for any preset and run shape (spec §5.1).

Every tensor draws from its own torch.Generator seeded from (seed, tensor name), so a
tensor's bytes depend only on the seed, its name and its shape: the same on any machine
with the pinned torch, and unaffected when other tensors are added.
"""
from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import torch

from .config import ConfigError, ModelConfig, RunConfig, check_seed
from .numerics import quantize_rows_int8
from .types import ExpertWeights

#: Real layer-0 hc_ffn gate constants of DeepSeek-V4-Flash (spec §5.1, commit 60d25e5f:
#: "scale=0.5/base=0 leaves hc_pre post≈1 + near-uniform comb"), as published in
#: hw-native-sys/pypto-lib's MOE_HC_FFN_SCALE / MOE_HC_FFN_BASE (hc_mult = 4).
HC_FFN_SCALE = (0.11334, 0.035901, 0.058183)
HC_FFN_BASE = (2.4153, -2.0252, -2.0019, -2.1947, -1.5430, -3.0228, -6.8248, 0.5894,
               2.1916, -7.2132, -3.0938, -2.1119, -3.0161, 3.3293, -3.2224, -4.0226,
               -2.0428, -3.3478, 3.0893, -3.4166, -1.8144, -3.8147, -3.1307, 1.7862)
#: Std of hc_ffn_fn (spec §5.1, 60d25e5f: fn = randn · 0.0635).
HC_FN_STD = 0.0635
#: Std of the selection bias. The seed used zeros; a small bias makes "bias selects,
#: unbiased score weighs" visible in sort routing.
GATE_BIAS_STD = 0.02


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, name)."""
    check_seed(seed)
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    return g


def _randn(seed: int, name: str, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed, name), dtype=torch.float32)


def quantized_weight(seed: int, name: str, n_out: int, k_in: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 randn[n_out, k_in]/sqrt(k_in) -> per-output-channel INT8 + FP32 scale [n_out]
    (spec §2.1 weight recipe, moe_ep.py:981-987)."""
    w = _randn(seed, name, n_out, k_in).div_(math.sqrt(k_in)).to(torch.bfloat16)
    q, s = quantize_rows_int8(w.to(torch.float32))
    return q, s.reshape(n_out)


@dataclass(frozen=True)
class GateWeights:
    """The hc_pre and gate weights of one layer: all that routing needs."""

    hc_fn: torch.Tensor           # [mix_hc, hc·D] FP32
    hc_scale: torch.Tensor        # [3] FP32
    hc_base: torch.Tensor         # [mix_hc] FP32
    norm_w: torch.Tensor          # [D] FP32
    gate_w: torch.Tensor          # [E, D] FP32
    gate_bias: torch.Tensor       # [E] FP32
    tid2eid: torch.Tensor         # [V, K] INT32, K distinct experts per row

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Weights(GateWeights):
    """Every weight of one MoE layer; routed weights carry a leading global expert axis."""

    shared_w1: torch.Tensor       # [I, D] INT8
    shared_w1_scale: torch.Tensor  # [I] FP32
    shared_w3: torch.Tensor
    shared_w3_scale: torch.Tensor
    shared_w2: torch.Tensor       # [D, I] INT8
    shared_w2_scale: torch.Tensor  # [D] FP32
    routed_w1: torch.Tensor       # [E, I, D] INT8
    routed_w1_scale: torch.Tensor  # [E, I] FP32
    routed_w3: torch.Tensor
    routed_w3_scale: torch.Tensor
    routed_w2: torch.Tensor       # [E, D, I] INT8
    routed_w2_scale: torch.Tensor  # [E, D] FP32

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> Weights:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    @property
    def shared(self) -> ExpertWeights:
        """The shared expert's FFN weights."""
        return ExpertWeights(*(getattr(self, f"shared_{n}") for n in ExpertWeights._fields))

    def routed_shard(self, rank: int, n_local: int) -> ExpertWeights:
        """The routed weights of rank `rank`'s experts [rank·NL, (rank+1)·NL)."""
        sl = slice(rank * n_local, (rank + 1) * n_local)
        return ExpertWeights(*(getattr(self, f"routed_{n}")[sl] for n in ExpertWeights._fields))


@dataclass(frozen=True)
class Inputs:
    """Per-rank activations: x_hc [R,B,S,hc,D] BF16, input_ids [R,B,S] INT64, layer_id."""

    x_hc: torch.Tensor
    input_ids: torch.Tensor
    layer_id: int


def make_tid2eid(seed: int, vocab: int, n_experts: int, k: int) -> torch.Tensor:
    """[V, K] INT32 hash table with K distinct experts per token (spec §5.1, a94b8f34)."""
    keys = torch.rand(vocab, n_experts, generator=generator(seed, "tid2eid"))
    return torch.argsort(keys, dim=1)[:, :k].to(torch.int32)


def make_gate_weights(cfg: ModelConfig, seed: int = 0) -> GateWeights:
    """The hc_pre and gate weights alone (hc_fn, hc_scale, hc_base, norm_w, gate_w,
    gate_bias, tid2eid): what routing needs, without building any expert."""
    d, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    if cfg.mix_hc == len(HC_FFN_BASE):
        base = torch.tensor(HC_FFN_BASE, dtype=torch.float32)
    else:  # no published base for this hc_mult: same mean and spread, seeded
        ref = torch.tensor(HC_FFN_BASE)
        base = ref.mean() + ref.std() * _randn(seed, "hc_base", cfg.mix_hc)
    return GateWeights(
        hc_fn=_randn(seed, "hc_fn", cfg.mix_hc, cfg.hc_dim) * HC_FN_STD,
        hc_scale=torch.tensor(HC_FFN_SCALE, dtype=torch.float32),
        hc_base=base.to(torch.float32),
        norm_w=torch.ones(d, dtype=torch.float32),
        gate_w=_randn(seed, "gate_w", e, d) / math.sqrt(d),
        gate_bias=_randn(seed, "gate_bias", e) * GATE_BIAS_STD,
        tid2eid=make_tid2eid(seed, cfg.vocab_size, e, k))


#: Routed matrices per expert, in generation order: (name, rows, columns) as functions of
#: (I, D). Each expert's matrix draws from its own generator "routed_<name>[<expert>]".
_ROUTED = (("w1", "i", "d"), ("w3", "i", "d"), ("w2", "d", "i"))
#: Fixture threads: torch releases the GIL in its kernels, so two threads halve the wall
#: time on 2 cores; each tensor has its own generator, so the bytes do not depend on
#: scheduling.
GEN_WORKERS = 2


def make_routed_weights(cfg: ModelConfig, seed: int = 0,
                        experts: range | None = None) -> ExpertWeights:
    """The routed weights of global experts `experts` (default all E), leading axis over
    those experts: w1/w3 [n, I, D] INT8, w2 [n, D, I] INT8, scales [n, I] / [n, D] FP32.

    Expert e's matrices depend only on (seed, e), so the shard of rank r,
    range(r·NL, (r+1)·NL), equals the slice of the full tensors. Each expert is quantized
    straight into a preallocated tensor: the peak is the INT8 result plus a few FP32
    matrices per thread, never a second copy of all experts.
    """
    experts = range(cfg.n_routed_experts) if experts is None else experts
    if experts.step != 1 or not 0 <= experts.start <= experts.stop <= cfg.n_routed_experts:
        raise ConfigError(f"experts must be a contiguous range within [0, "
                          f"{cfg.n_routed_experts}), got {experts}")
    dims = {"i": cfg.moe_intermediate_size, "d": cfg.hidden_size}
    n = len(experts)
    out: dict[str, torch.Tensor] = {}
    for name, rows, cols in _ROUTED:
        out[name] = torch.empty(n, dims[rows], dims[cols], dtype=torch.int8)
        out[f"{name}_scale"] = torch.empty(n, dims[rows], dtype=torch.float32)

    def job(pos: int, name: str) -> None:
        w = out[name]
        q, s = quantized_weight(seed, f"routed_{name}[{experts.start + pos}]",
                                w.shape[1], w.shape[2])
        w[pos].copy_(q)
        out[f"{name}_scale"][pos].copy_(s)

    with ThreadPoolExecutor(max_workers=GEN_WORKERS) as pool:
        for f in [pool.submit(job, pos, name) for pos in range(n) for name, _, _ in _ROUTED]:
            f.result()
    return ExpertWeights(**{f: out[f] for f in ExpertWeights._fields})


def make_routed_shard(cfg: ModelConfig, seed: int, rank: int, n_local: int) -> ExpertWeights:
    """Rank `rank`'s routed experts [rank·NL, (rank+1)·NL) alone: equal to
    `make_weights(cfg, seed).routed_shard(rank, n_local)`, without the other experts."""
    return make_routed_weights(cfg, seed, range(rank * n_local, (rank + 1) * n_local))


def make_weights(cfg: ModelConfig, seed: int = 0) -> Weights:
    """All layer weights for preset `cfg`, deterministic in `seed`."""
    d, i_dim = cfg.hidden_size, cfg.moe_intermediate_size
    routed = make_routed_weights(cfg, seed)
    sw1, sw1s = quantized_weight(seed, "shared_w1", i_dim, d)
    sw3, sw3s = quantized_weight(seed, "shared_w3", i_dim, d)
    sw2, sw2s = quantized_weight(seed, "shared_w2", d, i_dim)
    return Weights(
        **make_gate_weights(cfg, seed).to_dict(),
        shared_w1=sw1, shared_w1_scale=sw1s, shared_w3=sw3, shared_w3_scale=sw3s,
        shared_w2=sw2, shared_w2_scale=sw2s,
        **{f"routed_{n}": getattr(routed, n) for n in ExpertWeights._fields})


def make_inputs(run: RunConfig, seed: int = 0) -> Inputs:
    """x_hc and input_ids for every rank (distinct per rank), deterministic in `seed`."""
    cfg = run.model
    shape = (run.ranks, run.batch, run.seq, cfg.hc_mult, cfg.hidden_size)
    x_hc = _randn(seed, "x_hc", *shape).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (run.ranks, run.batch, run.seq),
                        generator=generator(seed, "input_ids"), dtype=torch.int64)
    return Inputs(x_hc=x_hc, input_ids=ids, layer_id=run.layer_id)
