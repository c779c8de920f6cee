"""Data types shared across stages, backends and the EP program.

A leaf module: it imports nothing from the package, so the reference, the pypto kernels
and the exchange can all name the same tuples without importing each other.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class GateOut(NamedTuple):
    """Outputs of the gate stage (T = B·S flattened tokens)."""

    x_norm: torch.Tensor        # [T, D] BF16
    x_norm_i8: torch.Tensor     # [T, D] INT8
    x_norm_scale: torch.Tensor  # [T, 1] FP32
    indices: torch.Tensor       # [T, K] INT32, global expert ids
    weights: torch.Tensor       # [T, K] FP32


class ExpertWeights(NamedTuple):
    """One W8A8 SwiGLU FFN's weights. Shared expert: w1/w3 [I, D], w2 [D, I];
    routed experts carry a leading expert axis ([NL, I, D], ...)."""

    w1: torch.Tensor        # [.., I, D] INT8
    w1_scale: torch.Tensor  # [.., I] FP32 per output channel
    w3: torch.Tensor        # [.., I, D] INT8
    w3_scale: torch.Tensor  # [.., I] FP32
    w2: torch.Tensor        # [.., D, I] INT8
    w2_scale: torch.Tensor  # [.., D] FP32


class PackedRoutes(NamedTuple):
    """The four dispatch channels for a list of routes, in the order given."""

    x: torch.Tensor       # [N, D] INT8: x_norm_i8 of each route's token
    scale: torch.Tensor   # [N] FP32: x_norm_scale of each route's token
    weight: torch.Tensor  # [N] FP32: routing weight of the route
    route: torch.Tensor   # [N] INT32: route id t·K + k on the sender


class RecvBuffers(NamedTuple):
    """One rank's received rows, per local expert, `capacity` slots each."""

    x: torch.Tensor       # [NL, C, D] INT8
    scale: torch.Tensor   # [NL, C] FP32
    weight: torch.Tensor  # [NL, C] FP32
    route: torch.Tensor   # [NL, C] INT32, origin route id t·K + k (-1 in unused slots)
    count: torch.Tensor   # [NL] INT64


class CapacityError(ValueError):
    """A local expert receives more rows than its receive window holds."""
