"""Notebook parameter validation: the first code cell of every notebook calls
`validate_params(...)`, which fails with a `ParameterError` naming the parameter, its
value and the allowed values, before anything deep in the package runs."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backend import BACKENDS
from ..config import (
    MAX_TOKENS_PER_RANK,
    PRESETS,
    ROUTING_MODES,
    SEED_LIMIT,
    ConfigError,
    ModelConfig,
    RunConfig,
    get_preset,
    is_int,
)
from ..ep.transport import TRANSPORTS
from ..limits import check_memory
from ..outputs import check_output_dir
from ..paths import REPO_ROOT


class ParameterError(ConfigError):
    """A notebook parameter is invalid; the message names it, its value and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"parameter {name}={value!r} is invalid; allowed: {allowed}")


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


@dataclass(frozen=True)
class NotebookParams:
    """Validated notebook parameters; fields a notebook does not use stay None."""

    model: ModelConfig
    run: RunConfig
    seed: int
    figures_dir: Path
    skew: float | None = None
    capacity_factor: float | None = None
    transport: str | None = None
    backend: str | None = None
    redundant_slots: int | None = None
    topk: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe parameters for the figures manifest (figures_dir left out: it is
        where the manifest lives)."""
        d: dict[str, Any] = {"preset": self.model.name, "ranks": self.run.ranks,
                             "batch": self.run.batch, "seq": self.run.seq,
                             "topk": self.model.num_experts_per_tok,
                             "routing": self.run.routing, "seed": self.seed}
        for k in ("skew", "capacity_factor", "transport", "backend", "redundant_slots"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


def resolve_figures_dir(figures_dir: str | Path) -> Path:
    """Absolute figures folder: relative paths resolve against the repository root."""
    if not isinstance(figures_dir, (str, Path)) or not str(figures_dir).strip():
        raise ParameterError("figures_dir", figures_dir, "a non-empty path string")
    p = Path(figures_dir).expanduser()
    p = p if p.is_absolute() else REPO_ROOT / p
    try:  # a file, or an unwritable place, fails here in the first cell
        return check_output_dir(p, "figures_dir")
    except ConfigError as exc:
        raise ParameterError("figures_dir", figures_dir, f"a writable folder ({exc})") from exc


def validate_params(*, preset: str, ranks: int, batch: int, seq: int, seed: int,
                    figures_dir: str | Path, routing: str = "hash", topk: int | None = None,
                    skew: float | None = None, capacity_factor: float | None = None,
                    transport: str | None = None, backend: str | None = None,
                    redundant_slots: int | None = None) -> NotebookParams:
    """Check every notebook parameter (None = not used by this notebook) and build the
    frozen configs. Raises ParameterError naming the parameter, value and allowed values.

    capacity_factor scales the mean per-expert load into the receive capacity: an
    integral factor is RunConfig.recv_safety (spec §1.2 formula); a fractional one sets
    recv_capacity = max(1, ceil(T·K/NL · factor)).
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ParameterError("preset", preset, f"one of {sorted(PRESETS)}")
    base = PRESETS[preset]
    e = base.n_routed_experts
    divisors = [r for r in range(1, e + 1) if e % r == 0]
    if not is_int(ranks) or ranks not in divisors:
        raise ParameterError("ranks", ranks, f"a divisor of n_routed_experts ({e}) of "
                             f"preset {preset!r}: {divisors}")
    for name, v in (("batch", batch), ("seq", seq)):
        if not is_int(v) or v <= 0:
            raise ParameterError(name, v, "a positive integer")
    if not is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ParameterError("seed", seed, "an integer >= 0 and < 2^63")
    if routing not in ROUTING_MODES:
        raise ParameterError("routing", routing, f"one of {list(ROUTING_MODES)}")
    if topk is not None and (not is_int(topk) or not 1 <= topk <= e):
        raise ParameterError("topk", topk, f"None (preset's {base.num_experts_per_tok}) or "
                             f"an integer in [1, {e}] (n_routed_experts of {preset!r})")
    if skew is not None and (not _is_num(skew) or skew < 0):
        raise ParameterError("skew", skew, "a finite number >= 0 (0 = no skew)")
    if capacity_factor is not None:
        validate_factor("capacity_factor", capacity_factor, max_capacity_factor(
            e, base.num_experts_per_tok if topk is None else topk),
            ": E/K, where the capacity reaches R·T rows, all that can arrive")
    if transport is not None and transport not in TRANSPORTS:
        raise ParameterError("transport", transport, f"one of {list(TRANSPORTS)}")
    if backend is not None and backend not in BACKENDS:
        raise ParameterError("backend", backend, f"one of {list(BACKENDS)}")
    if redundant_slots is not None:
        max_red = e * (ranks - 1)
        if (not is_int(redundant_slots) or redundant_slots < 0
                or redundant_slots % ranks or redundant_slots > max_red):
            raise ParameterError("redundant_slots", redundant_slots,
                                 f"a multiple of ranks ({ranks}) in [0, {max_red}]")
    fdir = resolve_figures_dir(figures_dir)
    try:
        model = get_preset(preset) if topk is None else get_preset(
            preset, num_experts_per_tok=topk)
        kw: dict[str, Any] = {}
        if capacity_factor is not None:
            if float(capacity_factor).is_integer():
                kw["recv_safety"] = int(capacity_factor)
            else:
                k, nl = model.num_experts_per_tok, e // ranks
                kw["recv_capacity"] = max(1, math.ceil(batch * seq * k / nl
                                                       * capacity_factor))
        run = RunConfig(model=model, batch=batch, seq=seq, ranks=ranks, routing=routing,
                        **kw)
        if transport is not None:  # this notebook runs the layer (and its reference)
            check_memory(run, transport=transport, check=True)
    except ParameterError:
        raise
    except ConfigError as exc:  # config.py's own checks; its message names the field
        raise ConfigError(f"invalid notebook parameters: {exc}") from exc
    return NotebookParams(model=model, run=run, seed=seed, figures_dir=fdir,
                          skew=None if skew is None else float(skew),
                          capacity_factor=None if capacity_factor is None
                          else float(capacity_factor),
                          transport=transport, backend=backend,
                          redundant_slots=redundant_slots, topk=topk)


# --------------------------------------------------------------------------- extra checks
def validate_flag(name: str, value: Any) -> bool:
    """`value` if it is a bool, else ParameterError naming `name` and True / False."""
    if not isinstance(value, bool):
        raise ParameterError(name, value, "True or False")
    return value


def validate_factor(name: str, value: Any, maximum: float | None = None,
                    why: str = "") -> float:
    """`value` as a float if it is a finite number > 0 (and <= maximum), else
    ParameterError naming the limit and `why`."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(float(value)) or not value > 0):
        raise ParameterError(name, value, "a finite number > 0")
    if maximum is not None and value > maximum:
        raise ParameterError(name, value, f"a number in (0, {maximum:g}]{why}")
    return float(value)


def max_capacity_factor(n_experts: int, topk: int) -> float:
    """E/K: the factor whose capacity T·K/NL·factor equals R·T, the most rows an expert
    can receive; a larger factor only allocates rows that can never be filled."""
    return n_experts / topk


def validate_side_run(prefix: str, **kwargs: Any) -> NotebookParams:
    """`validate_params(**kwargs)` for a notebook's secondary run (e.g. the small pypto
    comparison); a ParameterError names the parameter with `prefix` ('pypto_preset')."""
    try:
        return validate_params(**kwargs)
    except ParameterError as exc:
        raise ParameterError(f"{prefix}{exc.name}", exc.value, exc.allowed) from None


# --------------------------------------------------------------------------- notebook 04
@dataclass(frozen=True)
class LatencyOptions:
    """Notebook 04's own parameters, validated: the step at scale (its shape, like
    `validate_params`' run) and the sweeps around it."""

    scale: NotebookParams
    skew_sweep: tuple[float, ...]
    eplb_per_rank: int
    ranks_sweep: tuple[int, ...]
    tokens_sweep: tuple[int, ...]

    @property
    def eplb_slots(self) -> int:
        """Redundant expert slots of the EPLB what-if in total (per rank x ranks)."""
        return self.eplb_per_rank * self.scale.run.ranks

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe values for the figures manifest."""
        r = self.scale.run
        return {"scale_preset": r.model.name, "scale_ranks": r.ranks,
                "scale_batch": r.batch, "scale_seq": r.seq,
                "skew_sweep": list(self.skew_sweep), "eplb_per_rank": self.eplb_per_rank,
                "ranks_sweep": list(self.ranks_sweep),
                "tokens_sweep": list(self.tokens_sweep)}


def _int_list(name: str, value: Any, ok: Callable[[int], bool], allowed: str
              ) -> tuple[int, ...]:
    if (not isinstance(value, (list, tuple)) or not value
            or not all(is_int(v) and ok(v)
                       for v in value) or len(set(value)) != len(value)):
        raise ParameterError(name, value, f"a non-empty list of distinct {allowed}")
    return tuple(sorted(int(v) for v in value))


def validate_latency_options(*, scale_preset: str, scale_ranks: int, scale_batch: int,
                             scale_seq: int, routing: str, seed: int, skew_sweep: Any,
                             eplb_per_rank: Any, ranks_sweep: Any, tokens_sweep: Any
                             ) -> LatencyOptions:
    """Check notebook 04's own parameters (before `validate_params`, which creates the
    figures folder last); a ParameterError names the parameter, its value and the allowed
    values. The scale_* parameters are checked like validate_params' (named with the
    prefix; the scale run writes no figures of its own, so its figures_dir is the
    repository root, which exists); ranks_sweep must divide the scale preset's experts,
    tokens_sweep be multiples of scale_seq."""
    scale = validate_side_run("scale_", preset=scale_preset, ranks=scale_ranks,
                              batch=scale_batch, seq=scale_seq, routing=routing, seed=seed,
                              figures_dir=REPO_ROOT)
    if (not isinstance(skew_sweep, (list, tuple)) or not skew_sweep
            or not all(_is_num(v) and v >= 0 for v in skew_sweep)
            or len(set(skew_sweep)) != len(skew_sweep)):
        raise ParameterError("skew_sweep", skew_sweep,
                             "a non-empty list of distinct finite numbers >= 0")
    e, r = scale.model.n_routed_experts, scale.run.ranks
    most = e * (r - 1) // r
    if not is_int(eplb_per_rank) or not 1 <= eplb_per_rank <= most:
        raise ParameterError("eplb_per_rank", eplb_per_rank,
                             f"an integer in [1, {most}] (redundant expert slots per rank)"
                             if most else "none: EPLB needs scale_ranks >= 2")
    divisors = [d for d in range(1, e + 1) if e % d == 0]
    rk = _int_list("ranks_sweep", ranks_sweep, lambda v: v in divisors,
                   f"divisors of n_routed_experts ({e}) of scale_preset: {divisors}")
    seq = scale.run.seq
    tk = _int_list("tokens_sweep", tokens_sweep,
                   lambda v: 0 < v <= MAX_TOKENS_PER_RANK and v % seq == 0,
                   f"multiples of scale_seq ({seq}) up to {MAX_TOKENS_PER_RANK}")
    return LatencyOptions(scale=scale, skew_sweep=tuple(sorted(float(v) for v in skew_sweep)),
                          eplb_per_rank=int(eplb_per_rank), ranks_sweep=rk, tokens_sweep=tk)
