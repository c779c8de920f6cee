"""Row formats shared by the transports: padded scalar tiles and packed wire rows.

The scalar channels travel as 8-column rows (value in column 0, zeros after) so that each
route's scale / weight / r_route is one 32-byte tile (spec §2.5). Over torch.distributed
the four dispatch channels of one route travel as ONE contiguous byte row
``[x_i8: D][scale: 32][weight: 32][r_route: 32]`` so a dispatch is a single all-to-all;
combine rows are ``[y: D BF16][r_route: INT32 as 2 BF16]``.
"""
from __future__ import annotations

import torch

from ..backend import PackedRoutes
from .layout import PAD_BYTES, PAD_COLS

#: Extra BF16 columns carrying the INT32 route id in a combine wire row.
ROUTE_TAG_COLS = 2


def pad_column(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N] -> [N, PAD_COLS] of `dtype`: v in column 0, zeros elsewhere."""
    out = torch.zeros(v.numel(), PAD_COLS, dtype=dtype)
    out[:, 0] = v.reshape(-1).to(dtype)
    return out


def dispatch_row_bytes(d_model: int) -> int:
    """Bytes of one packed dispatch row: D + 3 padded 32-byte tiles."""
    return d_model + 3 * PAD_BYTES


def pack_dispatch(packed: PackedRoutes) -> torch.Tensor:
    """PackedRoutes of N routes -> [N, D + 96] UINT8 wire rows."""
    n, d = packed.x.shape
    return torch.cat([
        packed.x.reshape(n, d).view(torch.uint8),
        pad_column(packed.scale, torch.float32).view(torch.uint8),
        pad_column(packed.weight, torch.float32).view(torch.uint8),
        pad_column(packed.route, torch.int32).view(torch.uint8)], dim=1)


def unpack_dispatch(rows: torch.Tensor, d_model: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, D + 96] UINT8 -> (x [N,D] INT8, scale [N] FP32, weight [N] FP32, route [N] INT32)."""
    d, p = d_model, PAD_BYTES
    x = rows[:, :d].contiguous().view(torch.int8)
    scale = rows[:, d:d + p].contiguous().view(torch.float32)[:, 0]
    weight = rows[:, d + p:d + 2 * p].contiguous().view(torch.float32)[:, 0]
    route = rows[:, d + 2 * p:d + 3 * p].contiguous().view(torch.int32)[:, 0]
    return x, scale, weight, route


def pack_combine(y: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """y [N,D] BF16 and route [N] INT32 -> [N, D + 2] BF16 wire rows (route bit-cast)."""
    tag = route.to(torch.int32).reshape(-1, 1).contiguous().view(torch.bfloat16)
    return torch.cat([y, tag], dim=1)


def unpack_combine(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D + 2] BF16 -> (y [N,D] BF16, route [N] INT64)."""
    y = rows[:, :-ROUTE_TAG_COLS]
    route = rows[:, -ROUTE_TAG_COLS:].contiguous().view(torch.int32).reshape(-1)
    return y, route.to(torch.int64)
