"""Model presets and run shapes: frozen, validated, passed explicitly.

Spec §1.1 gives the DeepSeek-V4 presets; §1.2-§1.3 the decode shape and the receive
capacity formula. Nothing here is derived at import time from mutable state (the seed's
review finding R3): every size is a property of a frozen object handed to the code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Routing = Literal["hash", "sort"]
ROUTING_MODES: tuple[str, ...] = ("hash", "sort")

#: INT8 quantization constants (spec §1.2, config.py:255-256).
INT8_SCALE_MAX = 127.0
INT8_AMAX_EPS = 1e-4
#: Receive-capacity safety factor over the mean per-expert load (spec §1.2 RECV_SAFETY).
RECV_SAFETY = 4
#: Smallest default receive capacity, in rows per local expert: one cube tile (the
#: Ascend cube unit's 16-row fractal). At decode sizes the spec formula gives 0-4 rows
#: (flash, R=8, T=2: (2·6 // 32)·4 = 0), so one hot expert overflows at once; the
#: reference program's later decode setting also floors the window at one tile.
MIN_RECV_ROWS = 16
#: Upper bound on T = batch · seq tokens per rank. A decode step carries at most a few
#: thousand tokens per rank; at D=4096 every token costs 32 KiB of x_hc alone, so 65536
#: tokens are 2 GiB of input per rank before any stage runs.
MAX_TOKENS_PER_RANK = 65536
#: Seeds are in [0, SEED_LIMIT): torch.Generator.manual_seed takes a signed 64-bit value,
#: so larger seeds would wrap and silently repeat another seed's data.
SEED_LIMIT = 2 ** 63


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the parameter."""


def check_seed(seed: Any, name: str = "seed") -> int:
    """`seed` if it is an integer in [0, 2^63), else ConfigError naming the limit."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in [0, 2^63) (torch seeds are 64-bit "
                          f"signed; larger values would repeat another seed), got {seed!r}")
    return seed


def is_int(value: Any) -> bool:
    """True for a Python or NumPy-free integer; a bool is not an integer here."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` if it is an integer >= `minimum`, else ConfigError naming `name`."""
    if not is_int(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """One DeepSeek-V4 MoE layer's sizes and numerics knobs (spec §1.1)."""

    name: str
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    vocab_size: int = 129280
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    swiglu_limit: float = 0.0
    num_hash_layers: int = 0
    scoring_func: str = "sqrtsoftplus"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                     "num_experts_per_tok", "vocab_size", "hc_mult", "hc_sinkhorn_iters",
                     "n_shared_experts"):
            check_int(name, getattr(self, name))
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok (top-k) must be <= n_routed_experts "
                f"({self.n_routed_experts}), got {self.num_experts_per_tok}")
        if self.n_shared_experts != 1:
            raise ConfigError(f"n_shared_experts must be 1 (one shared expert per token), "
                              f"got {self.n_shared_experts}")
        if self.swiglu_limit < 0:
            raise ConfigError(f"swiglu_limit must be >= 0 (0 disables the clamp), "
                              f"got {self.swiglu_limit}")
        if self.num_hash_layers < 0:
            raise ConfigError(f"num_hash_layers must be >= 0, got {self.num_hash_layers}")
        if self.scoring_func != "sqrtsoftplus":
            raise ConfigError(f"scoring_func must be 'sqrtsoftplus', got {self.scoring_func!r}")
        if not self.routed_scaling_factor > 0:
            raise ConfigError(f"routed_scaling_factor must be > 0, "
                              f"got {self.routed_scaling_factor}")

    @property
    def hc_dim(self) -> int:
        """hc_mult * hidden_size: the flattened width of x_hc per token."""
        return self.hc_mult * self.hidden_size

    @property
    def mix_hc(self) -> int:
        """(2 + hc_mult) * hc_mult mix logits: pre, post and the hc x hc comb matrix."""
        return (2 + self.hc_mult) * self.hc_mult

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The presets of spec §1.1. DEMO carries the effective EP-demo override of §1.3
#: (num_hash_layers 0 -> 1, so layer 0 takes the hash route as in moe_ep.py:55).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", hidden_size=256, moe_intermediate_size=256, n_routed_experts=16,
        num_experts_per_tok=2, vocab_size=1024, routed_scaling_factor=1.5,
        swiglu_limit=10.0, num_hash_layers=1),
    "demo": ModelConfig(
        name="demo", hidden_size=4096, moe_intermediate_size=4096, n_routed_experts=16,
        num_experts_per_tok=2, routed_scaling_factor=1.0, swiglu_limit=0.0,
        num_hash_layers=1),
    "flash": ModelConfig(
        name="flash", hidden_size=4096, moe_intermediate_size=2048, n_routed_experts=256,
        num_experts_per_tok=6, routed_scaling_factor=1.5, swiglu_limit=10.0,
        num_hash_layers=3),
    "pro": ModelConfig(
        name="pro", hidden_size=7168, moe_intermediate_size=3072, n_routed_experts=384,
        num_experts_per_tok=6, routed_scaling_factor=2.5, swiglu_limit=10.0,
        num_hash_layers=3),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with optional field overrides (validated again)."""
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    if not overrides:
        return PRESETS[name]
    unknown = set(overrides) - set(PRESETS[name].to_dict())
    if unknown:
        raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}; "
                          f"valid: {sorted(PRESETS[name].to_dict())}")
    return replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class RunConfig:
    """One decode step of one MoE layer on `ranks` ranks (spec §1.2-§1.3).

    `routing` picks the gate route; the layer id follows the spec's rule
    (hash iff layer_id < num_hash_layers): 0 for hash, num_hash_layers for sort.
    `recv_capacity` overrides the default receive capacity when given; it may not
    exceed R·T, the most rows one expert can receive (every token of every rank).
    Default capacity: clamp((T·K // NL)·recv_safety, MIN_RECV_ROWS, R·T), i.e. the spec
    §1.2 formula, at least one 16-row cube tile, never more than what can arrive.
    T = batch·seq is at most MAX_TOKENS_PER_RANK.
    """

    model: ModelConfig
    batch: int = 64
    seq: int = 2
    ranks: int = 1
    routing: Routing = "hash"
    recv_safety: int = RECV_SAFETY
    recv_capacity: int | None = field(default=None)

    def __post_init__(self) -> None:
        check_int("batch", self.batch)
        check_int("seq", self.seq)
        check_int("ranks", self.ranks)
        check_int("recv_safety", self.recv_safety)
        if self.batch * self.seq > MAX_TOKENS_PER_RANK:
            raise ConfigError(
                f"batch x seq = {self.batch} x {self.seq} = {self.batch * self.seq} tokens "
                f"per rank exceeds the limit {MAX_TOKENS_PER_RANK} (a decode step; each "
                f"token needs hc·D·2 bytes of x_hc per stage)")
        if self.recv_capacity is not None:
            check_int("recv_capacity", self.recv_capacity)
            most = self.ranks * self.batch * self.seq
            if self.recv_capacity > most:
                raise ConfigError(
                    f"capacity (recv_capacity) = {self.recv_capacity} exceeds {most} = "
                    f"ranks x batch x seq, the most rows one expert can receive (every "
                    f"token of every rank); give at most {most}")
        if self.model.n_routed_experts % self.ranks:
            divisors = [r for r in range(1, self.model.n_routed_experts + 1)
                        if self.model.n_routed_experts % r == 0]
            raise ConfigError(
                f"ranks must divide n_routed_experts ({self.model.n_routed_experts}) of "
                f"preset {self.model.name!r}, got {self.ranks}; valid: {divisors}")
        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"routing must be one of {list(ROUTING_MODES)}, "
                              f"got {self.routing!r}")
        if self.routing == "hash" and self.model.num_hash_layers == 0:
            raise ConfigError(f"routing='hash' needs num_hash_layers >= 1, preset "
                              f"{self.model.name!r} has 0; use routing='sort'")

    @property
    def tokens(self) -> int:
        """T = batch * seq tokens per rank."""
        return self.batch * self.seq

    @property
    def n_local(self) -> int:
        """NL: routed experts held by one rank."""
        return self.model.n_routed_experts // self.ranks

    @property
    def layer_id(self) -> int:
        return 0 if self.routing == "hash" else self.model.num_hash_layers

    @property
    def max_arrivals(self) -> int:
        """R·T: the most rows one expert can receive (each token picks an expert once)."""
        return self.ranks * self.tokens

    @property
    def recv_max(self) -> int:
        """Rows per local expert in a receive window: the override, or spec §1.2's
        (T·K // NL)·recv_safety clamped to [MIN_RECV_ROWS, R·T] (at least one cube tile,
        never more rows than can arrive)."""
        if self.recv_capacity is not None:
            return self.recv_capacity
        formula = (self.tokens * self.model.num_experts_per_tok // self.n_local
                   ) * self.recv_safety
        return min(self.max_arrivals, max(MIN_RECV_ROWS, formula))

    def to_dict(self) -> dict[str, Any]:
        """Every preset field and run parameter, flat (the dump's `config`)."""
        d = self.model.to_dict()
        d.update(preset=self.model.name, batch=self.batch, seq=self.seq, ranks=self.ranks,
                 routing=self.routing, layer_id=self.layer_id, tokens=self.tokens,
                 n_local=self.n_local, recv_safety=self.recv_safety,
                 recv_capacity=self.recv_capacity, recv_max=self.recv_max,
                 hc_dim=self.model.hc_dim, mix_hc=self.model.mix_hc)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild from `to_dict()` output (used to replay a dump)."""
        fields = ModelConfig.__dataclass_fields__
        model = ModelConfig(**{k: d[k] for k in fields if k in d})
        return cls(model=model, batch=d["batch"], seq=d["seq"], ranks=d["ranks"],
                   routing=d["routing"], recv_safety=d["recv_safety"],
                   recv_capacity=d["recv_capacity"])
