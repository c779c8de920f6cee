"""Synthetic skew: skew 0 is the base routing, K distinct experts, deterministic, and
traffic concentrates on the hot experts as skew grows."""
import pytest
import torch

from moe_kernels.analysis import routing as rt
from moe_kernels.analysis import skew as sk


@pytest.mark.parametrize("r,t,k,e", [(2, 16, 2, 16), (4, 8, 6, 32), (1, 5, 1, 4)])
def test_skew_zero_returns_base_and_results_are_distinct(r, t, k, e):
    base = sk.uniform_routing(r, t, k, e, seed=1)
    assert torch.equal(sk.skew_routing(base, e, 0.0, seed=3), base)
    for s in (0.5, 2.0, 50.0):
        out = sk.skew_routing(base, e, s, seed=3)
        assert out.shape == (r, t, k) and out.dtype == torch.int32
        srt = out.reshape(-1, k).sort(dim=1).values
        assert not bool((srt.diff(dim=1) == 0).any()), "K experts must be distinct"
        assert int(out.min()) >= 0 and int(out.max()) < e


def test_deterministic_in_seed():
    base = sk.uniform_routing(2, 64, 2, 16, seed=0)
    a = sk.skew_routing(base, 16, 1.0, seed=7)
    assert torch.equal(a, sk.skew_routing(base, 16, 1.0, seed=7))
    assert not torch.equal(a, sk.skew_routing(base, 16, 1.0, seed=8))


def test_imbalance_grows_with_skew():
    base = sk.uniform_routing(2, 1024, 2, 16, seed=0)
    stats = sk.skew_sweep(base, 16, 2, (0.0, 0.5, 1.0, 2.0, 4.0), seed=0)
    exp_imb = [s.expert_imbalance for s in stats]
    assert exp_imb == sorted(exp_imb) and exp_imb[-1] > 3 * exp_imb[0]


def test_large_skew_sends_everything_to_the_hottest_experts():
    order = torch.tensor([5, 2, 7, 0, 1, 3, 4, 6])
    base = sk.uniform_routing(1, 50, 2, 8, seed=2)
    out = sk.skew_routing(base, 8, 1e4, seed=0, order=order)
    assert (out[0, :, 0] == 5).all() and (out[0, :, 1] == 2).all()


def test_uniform_base_gives_zipf_sampling():
    # K = 1 on a uniform base: P(e) = w_e^skew / sum w^skew exactly (Gumbel-max).
    e, skew, n = 4, 1.0, 40000
    order = torch.arange(e)
    base = sk.uniform_routing(1, n, 1, e, seed=5)
    out = sk.skew_routing(base, e, skew, seed=6, order=order)
    freq = rt.expert_load(out, e).double() / n
    expect = sk.zipf_popularity(e, skew, order=order)
    assert torch.allclose(freq, expect, atol=0.01)
    assert expect.tolist() == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])


def test_bad_inputs():
    base = sk.uniform_routing(1, 4, 2, 8, seed=0)
    with pytest.raises(ValueError, match="skew"):
        sk.skew_routing(base, 8, -1.0)
    with pytest.raises(ValueError, match="distinct"):
        sk.skew_routing(torch.tensor([[[1, 1]]]), 8, 1.0)
    with pytest.raises(ValueError, match="seed"):
        sk.skew_routing(base, 8, 1.0, seed=-1)
