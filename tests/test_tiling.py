"""Tile helpers: tiles cover an axis exactly, or the error names the axis, size and tile."""
import pytest

from moe_kernels.pto.tiling import TilingError, check_tile, divisor_tile


@pytest.mark.parametrize("size,want,expect", [(128, 16, 16), (96, 64, 48), (7, 4, 1),
                                              (4096, 512, 512), (8, 32, 8)])
def test_divisor_tile_is_the_largest_divisor_not_above_want(size, want, expect):
    t = divisor_tile("tokens", size, want)
    assert t == expect and size % t == 0


def test_divisor_tile_refuses_below_min_tile_naming_the_axis():
    with pytest.raises(TilingError, match=r"'tokens' of size 14 .*\[4, 6\]"):
        divisor_tile("tokens", 14, 6, min_tile=4)


@pytest.mark.parametrize("size,tile", [(10, 4), (0, 1), (8, 0)])
def test_check_tile_refuses_a_tile_that_does_not_divide(size, tile):
    with pytest.raises(TilingError, match=rf"tile {tile} .*'hidden' of size {size}"):
        check_tile("hidden", size, tile)


def test_check_tile_accepts_a_divisor():
    assert check_tile("hidden", 4096, 512) == 512
