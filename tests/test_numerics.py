"""BF16 rounding, the Q8 chain and ratio_reldiff against spec §2.1 / §5.3."""
import math

import numpy as np
import pytest
import torch
from spec_math import bf16_rne_bits, q8_rows

from moe_kernels.numerics import (
    bf16_rint,
    dequantize_rows,
    int8_matmul_i32,
    quantize_rows_int8,
    ratio_reldiff,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7, 33), (16, 256), (4, 4096)])
def test_q8_matches_spec_chain_bit_exact(seed, shape):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(*shape, generator=g) * (10 ** torch.randint(-5, 3, (shape[0], 1), generator=g))
    q, s = quantize_rows_int8(v)
    qe, se = q8_rows(v.numpy())
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0], 1)
    assert np.array_equal(q.numpy(), qe)
    assert np.array_equal(s.numpy().view(np.uint32), se.view(np.uint32))


def test_q8_ties_round_half_to_even():
    # amax = 127 -> qs = 1 exactly, so v*qs = v and the ties are visible
    v = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    q, s = quantize_rows_int8(v)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]
    assert s.item() == 1.0


def test_q8_zero_row_uses_amax_floor():
    q, s = quantize_rows_int8(torch.zeros(2, 8))
    assert int(q.abs().sum()) == 0
    expected = np.float32(1.0) / (np.float32(127.0) / np.float32(1e-4))
    assert np.array_equal(s.numpy(), np.full((2, 1), expected, dtype=np.float32))


def test_q8_amax_floor_applies_to_tiny_rows():
    # max |v| = 5e-5 < 1e-4: the floor sets qs = 1.27e6, so 5e-5 maps to rint(63.5) = 64
    v = torch.tensor([[5e-5, -2.5e-5, 0.0]])
    q, _ = quantize_rows_int8(v)
    qe, _ = q8_rows(v.numpy())
    assert q.tolist() == qe.tolist()
    assert q[0, 0].item() in (63, 64)  # exact value depends on the fp32 product; chain agrees
    assert abs(q[0, 0].item()) <= 64


def test_q8_dequant_error_is_half_step():
    v = torch.randn(32, 512, generator=torch.Generator().manual_seed(3))
    q, s = quantize_rows_int8(v)
    err = (dequantize_rows(q, s) - v).abs()
    assert bool((err <= s * 0.5 + 1e-7).all())
    assert int(q.abs().max()) == 127


def test_bf16_rint_matches_bit_rne():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 100
    assert np.array_equal(bf16_rint(x).to(torch.float32).numpy().astype(np.float64),
                          bf16_rne_bits(x.numpy()))


def test_bf16_ties_to_even_not_away():
    one_plus_half_ulp = 1.0 + 2.0 ** -8           # halfway between 1 and 1 + 2^-7
    three_half_ulps = 1.0 + 3 * 2.0 ** -8         # halfway between 1+2^-7 and 1+2^-6
    x = torch.tensor([one_plus_half_ulp, three_half_ulps, -one_plus_half_ulp])
    assert bf16_rint(x).to(torch.float32).tolist() == [1.0, 1.0 + 2.0 ** -6, -1.0]


def test_bf16_nonfinite_pass_through():
    x = torch.tensor([math.inf, -math.inf, math.nan])
    y = bf16_rint(x).to(torch.float32)
    assert y[0] == math.inf and y[1] == -math.inf and math.isnan(y[2])


def test_bf16_rint_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        bf16_rint(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (5, 256, 17), (16, 4096, 64)])
def test_int8_matmul_exact(m, k, n):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    got = int8_matmul_i32(a, b)
    exp = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64).T
    assert got.dtype == torch.int32 and np.array_equal(got.numpy(), exp)


def test_ratio_reldiff_counts_threshold_exactly():
    exp = torch.ones(1000)
    act = exp.clone()
    act[:50] += 0.5                      # 50 bad points = round(0.05 * 1000): allowed
    r = ratio_reldiff(act, exp, diff_thd=0.01, pct_thd=0.05)
    assert r.passed and r.n_bad == 50 and r.n_allowed == 50
    act[50] += 0.5                       # one more fails
    r = ratio_reldiff(act, exp, diff_thd=0.01, pct_thd=0.05)
    assert not r.passed and r.n_bad == 51


def test_ratio_reldiff_small_abs_diff_is_not_bad():
    # a < diff_thd: rdiff = a, so 0.009 absolute is fine even on tiny values
    exp = torch.full((10,), 1e-6)
    r = ratio_reldiff(exp + 0.009, exp, diff_thd=0.01, pct_thd=0.0)
    assert r.passed and r.n_bad == 0


def test_ratio_reldiff_relative_branch():
    # a = 0.02 >= thd, b = max(|act|, |exp|, 2^-14/thd) = 10.02: rdiff ~ 0.002 -> good
    r = ratio_reldiff(torch.tensor([10.02]), torch.tensor([10.0]), diff_thd=0.01, pct_thd=0.0)
    assert r.passed
    r = ratio_reldiff(torch.tensor([1.5]), torch.tensor([1.0]), diff_thd=0.01, pct_thd=0.0)
    assert not r.passed and r.worst_rdiff == pytest.approx(0.5 / 1.5, rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_ratio_reldiff_nonfinite_fails(bad):
    act = torch.zeros(100)
    act[3] = bad
    r = ratio_reldiff(act, torch.zeros(100), pct_thd=0.5)
    assert not r.passed and r.has_nonfinite


def test_ratio_reldiff_max_diff_hd_and_shape_check():
    act, exp = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    assert ratio_reldiff(act, exp, pct_thd=0.5).passed
    assert not ratio_reldiff(act, exp, pct_thd=0.5, max_diff_hd=0.4).passed
    with pytest.raises(ValueError, match="shape"):
        ratio_reldiff(torch.zeros(2), torch.zeros(3))
