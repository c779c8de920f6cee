"""Tile sizes for the pypto kernels: pick a tile that covers an axis exactly, or refuse.

pypto 0.2.0's interpreter rejects partial tiles for some ops (sigmoid on a 5-row tail
fails with DIVOpError), so every kernel tiles each axis with a divisor of its size. A tile
is chosen once, at kernel build time, with the axis named, so an error says which axis of
which kernel could not be tiled.
"""
from __future__ import annotations


class TilingError(ValueError):
    """A tile does not divide its axis, or no divisor of the axis is large enough."""


def check_tile(axis: str, size: int, tile: int) -> int:
    """`tile` if it is a positive divisor of `size`, else TilingError naming the axis."""
    if size <= 0 or tile <= 0 or size % tile:
        raise TilingError(f"tile {tile} does not divide axis {axis!r} of size {size}: "
                          f"pypto kernels here need tiles that cover an axis exactly")
    return tile


def divisor_tile(axis: str, size: int, want: int, min_tile: int = 1) -> int:
    """The largest divisor of `size` that is <= `want` (and >= `min_tile`).

    A prime token count gives 1-row tiles (correct, slow); a caller for whom that is not
    acceptable passes `min_tile`, and gets a TilingError naming the axis instead.
    """
    if size <= 0 or want <= 0:
        raise TilingError(f"axis {axis!r}: size {size} and wanted tile {want} must be > 0")
    for t in range(min(size, want), 0, -1):
        if size % t == 0:
            if t < min_tile:
                break
            return t
    raise TilingError(f"axis {axis!r} of size {size} has no divisor in "
                      f"[{min_tile}, {want}]; choose a size divisible by {min_tile}")
