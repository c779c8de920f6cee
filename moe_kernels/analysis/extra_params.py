"""Checks for notebook-specific parameters that `params.validate_params` does not know
(on/off flags, extra factors); they raise the same ParameterError in the first cell."""
from __future__ import annotations

import math
from typing import Any

from .params import NotebookParams, ParameterError, validate_params


def validate_flag(name: str, value: Any) -> bool:
    """`value` if it is a bool, else ParameterError naming `name` and True / False."""
    if not isinstance(value, bool):
        raise ParameterError(name, value, "True or False")
    return value


def validate_factor(name: str, value: Any) -> float:
    """`value` as a float if it is a finite number > 0, else ParameterError."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(float(value)) or not value > 0):
        raise ParameterError(name, value, "a finite number > 0")
    return float(value)


def validate_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed`, else ParameterError naming `name` and them."""
    if value not in allowed:
        raise ParameterError(name, value, " | ".join(allowed))
    return value


def validate_side_run(prefix: str, **kwargs: Any) -> NotebookParams:
    """`validate_params(**kwargs)` for a notebook's secondary run (e.g. the small pypto
    comparison); a ParameterError names the parameter with `prefix` ('pypto_preset')."""
    try:
        return validate_params(**kwargs)
    except ParameterError as exc:
        raise ParameterError(f"{prefix}{exc.name}", exc.value, exc.allowed) from None
