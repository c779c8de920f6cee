"""Row formats shared by the transports: padded scalar tiles and packed wire rows.

The scalar channels live in the symmetric windows as 8-column rows (value in column 0,
zeros after) so that each route's scale / weight / r_route is one 32-byte tile (spec §2.5);
`pad_column` builds them for the `local` transport.

Over torch.distributed the four dispatch channels of one route travel as ONE contiguous
byte row, so a dispatch is a single all-to-all::

    [x_i8: D bytes][scale: FP32][weight: FP32][r_route: INT32][pad: 4 zero bytes]

The tiles' zero padding is not sent (it carries no information; a receiver that wants
32-byte tiles pads locally). Rows are written in place into a preallocated [N, D + 16]
UINT8 buffer through dtype views, and read back the same way (no concatenation).
Combine rows are bare [y: D BF16]: the rows come back in exactly the order they were
sent, so the origin knows every row's r_route without it travelling again.
"""
from __future__ import annotations

import torch

from ..types import PackedRoutes
from .layout import PAD_COLS

#: INT32 words after x_i8 in a dispatch wire row: scale, weight, r_route, zero pad.
TAIL_WORDS = 4
#: Bytes after x_i8 in a dispatch wire row (16: keeps rows 16-byte aligned for D % 16 == 0).
TAIL_BYTES = TAIL_WORDS * 4
#: Word index of each scalar channel in a row's tail.
SCALE_WORD, WEIGHT_WORD, ROUTE_WORD = 0, 1, 2


def pad_column(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N] -> [N, PAD_COLS] of `dtype`: v in column 0, zeros elsewhere."""
    out = torch.zeros(v.numel(), PAD_COLS, dtype=dtype)
    out[:, 0] = v.reshape(-1).to(dtype)
    return out


def dispatch_row_bytes(d_model: int) -> int:
    """Bytes of one packed dispatch wire row: D + 16."""
    return d_model + TAIL_BYTES


def check_wire_width(d_model: int) -> None:
    """The tail's FP32/INT32 views need 4-byte aligned rows: D must be a multiple of 4."""
    if d_model % 4:
        raise ValueError(f"the gloo wire format needs hidden_size % 4 == 0, got {d_model}")


def row_tail(rows: torch.Tensor, d_model: int) -> torch.Tensor:
    """[N, D + 16] UINT8 wire rows -> their tails as an [N, 4] INT32 view (no copy)."""
    return rows[:, d_model:].view(torch.int32)


def pack_dispatch_into(wire: torch.Tensor, packed: PackedRoutes) -> torch.Tensor:
    """Write PackedRoutes of N routes into rows [0, N) of `wire` [>= N, D + 16] UINT8
    (whose pad words are zero) and return that [N, D + 16] view."""
    n, d = packed.x.shape[0], wire.shape[1] - TAIL_BYTES
    rows = wire[:n]
    rows[:, :d].copy_(packed.x.reshape(n, d).view(torch.uint8))
    tail = row_tail(rows, d)
    tail[:, SCALE_WORD].copy_(packed.scale.reshape(-1).to(torch.float32).view(torch.int32))
    tail[:, WEIGHT_WORD].copy_(packed.weight.reshape(-1).to(torch.float32).view(torch.int32))
    tail[:, ROUTE_WORD].copy_(packed.route.reshape(-1).to(torch.int32))
    return rows


def unpack_dispatch(rows: torch.Tensor, d_model: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, D + 16] UINT8 -> views (x [N,D] INT8, scale [N] FP32, weight [N] FP32,
    route [N] INT32) into the rows (no copies)."""
    tail = row_tail(rows, d_model)
    return (rows[:, :d_model].view(torch.int8), tail[:, SCALE_WORD].view(torch.float32),
            tail[:, WEIGHT_WORD].view(torch.float32), tail[:, ROUTE_WORD])


#: Word dtypes by size. Rows move through torch's index kernels as the widest word that
#: divides D: 16-byte words copy about 4x faster than 8-byte ones and 16x faster than
#: bytes (measured on this machine's CPU), and a copy of words moves the same bits.
_WORDS: tuple[tuple[int, torch.dtype], ...] = (
    (16, torch.complex128), (8, torch.int64), (4, torch.int32))


def as_words(rows: torch.Tensor) -> torch.Tensor:
    """[N, W] rows of any dtype (last dim contiguous) as [N, W·itemsize / w] words of
    the widest word size w that divides the row bytes, the row stride and the offset
    (a view, no copy; 4-byte words at least, else the rows are returned as they are)."""
    item = rows.element_size()
    nbytes, stride = rows.shape[-1] * item, rows.stride(0) * item
    offset = rows.storage_offset() * item
    for size, dtype in _WORDS:
        if size > item and nbytes % size == 0 and stride % size == 0 and offset % size == 0:
            return rows.view(dtype)
    return rows


def row_words(rows: torch.Tensor, d_model: int) -> torch.Tensor:
    """The first D bytes of every row of a 1-byte [N, >= D] tensor as words (a view):
    the x_i8 part of wire rows, or [N, D] INT8 activations."""
    return as_words(rows[:, :d_model])
