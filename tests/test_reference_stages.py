"""Each torch reference stage against the independent NumPy statement in spec_math.py,
on the tiny preset and a demo-sized shape, several seeds (spec §2, tolerances §5.3)."""
import numpy as np
import pytest
import spec_math as sm
import torch

from moe_kernels.config import get_preset
from moe_kernels.fixtures import make_tid2eid, quantized_weight
from moe_kernels.numerics import quantize_rows_int8, ratio_reldiff
from moe_kernels.reference.dispatch_combine import (
    dispatch_single,
    reduce_routes,
    scatter_routes,
)
from moe_kernels.reference.expert_routed import expert_routed
from moe_kernels.reference.expert_shared import expert_shared
from moe_kernels.reference.gate import gate, select_sort
from moe_kernels.reference.hc_post import hc_post
from moe_kernels.reference.hc_pre import hc_pre
from moe_kernels.types import CapacityError, ExpertWeights

SEEDS = [0, 1, 2]
# (preset, model overrides) -> tiny, and demo-width with fewer experts to stay fast
SHAPES = {"tiny": ("tiny", {}), "demo": ("demo", {"n_routed_experts": 4})}


def allclose_ratio(act, exp, atol, rtol, max_bad_fraction=1e-3):
    """The spec's ratio_allclose(atol, rtol): |a - e| <= atol + rtol·|e| on all but a small
    fraction of points. Our reference accumulates in FP32 and the restatement in FP64, so a
    BF16 output can round the other way (one BF16 ulp) where the FP32 value sits on a
    rounding boundary; those flips are the allowed fraction."""
    a = np.asarray(act, dtype=np.float64)
    e = np.asarray(exp, dtype=np.float64)
    excess = np.abs(a - e) - (atol + rtol * np.abs(e))
    bad = excess > 0
    assert bad.mean() <= max_bad_fraction, (
        f"{bad.sum()} of {bad.size} points out of tolerance; worst excess {excess.max():.3g} "
        f"at {np.unravel_index(excess.argmax(), a.shape)}")


def rand(seed, *shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def hc_inputs(cfg, seed, b=2, s=3):
    x_hc = rand(seed, b, s, cfg.hc_mult, cfg.hidden_size).to(torch.bfloat16)
    fn = rand(seed + 100, cfg.mix_hc, cfg.hc_dim, scale=0.0635)
    scale = torch.tensor([0.11334, 0.035901, 0.058183])
    base = rand(seed + 200, cfg.mix_hc, scale=2.0)
    return x_hc, fn, scale, base


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_hc_pre(shape, seed):
    cfg = get_preset(SHAPES[shape][0], **SHAPES[shape][1])
    x_hc, fn, scale, base = hc_inputs(cfg, seed)
    xm, post, comb = hc_pre(x_hc, fn, scale, base, cfg)
    assert xm.dtype == torch.bfloat16 and post.dtype == comb.dtype == torch.float32
    exm, epost, ecomb = sm.hc_pre(sm.to_np(x_hc), fn.numpy().astype(np.float64),
                                  scale.numpy().astype(np.float64), base.numpy().astype(np.float64),
                                  cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps, cfg.hc_sinkhorn_iters)
    allclose_ratio(sm.to_np(xm), exm, 1e-4, 1 / 128)          # spec §5.3 hc_pre tolerances
    allclose_ratio(post.numpy(), epost, 2.5e-5, 5e-3)
    allclose_ratio(comb.numpy(), ecomb, 2.5e-5, 5e-3)
    # Sinkhorn: columns sum to ~1 after the final column normalisation
    assert np.allclose(comb.sum(dim=-2).numpy(), 1.0, atol=1e-4)


def gate_inputs(cfg, seed, t=6):
    e, d = cfg.n_routed_experts, cfg.hidden_size
    x_mixed = rand(seed, 2, t // 2, d).to(torch.bfloat16)
    norm_w = 1.0 + rand(seed + 1, d, scale=0.1)
    gate_w = rand(seed + 2, e, d, scale=d ** -0.5)
    bias = rand(seed + 3, e, scale=0.05)
    tid2eid = make_tid2eid(seed, cfg.vocab_size, e, cfg.num_experts_per_tok)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, t // 2), generator=gen)
    return x_mixed, norm_w, gate_w, bias, tid2eid, ids


@pytest.mark.parametrize("routing", ["hash", "sort"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_gate(shape, seed, routing):
    cfg = get_preset(SHAPES[shape][0], **SHAPES[shape][1])
    args = gate_inputs(cfg, seed)
    out = gate(*args, cfg, routing)
    xn, score, biased, idx, w = sm.gate(*(sm.to_np(a) for a in args), cfg.num_experts_per_tok,
                                        cfg.routed_scaling_factor, cfg.rms_norm_eps,
                                        routing == "hash")
    allclose_ratio(sm.to_np(out.x_norm), xn, 1e-3, 1 / 128)
    # Q8 of the stage's own x_norm is bit-exact to the spec chain
    q, s = sm.q8_rows(out.x_norm.to(torch.float32).numpy())
    assert np.array_equal(out.x_norm_i8.numpy(), q) and np.array_equal(out.x_norm_scale.numpy(), s)
    assert out.indices.dtype == torch.int32 and out.weights.dtype == torch.float32
    # scores, selection and weights restated from the stage's own x_norm, so a BF16
    # rounding flip in x_norm (allowed above) does not blur the check of what follows
    z = sm.to_np(out.x_norm) @ sm.to_np(args[2]).T
    score = np.sqrt(np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))))
    biased = score + sm.to_np(args[3])
    idx = np.take_along_axis(np.argsort(-biased, axis=1, kind="stable"),
                             np.arange(cfg.num_experts_per_tok)[None], axis=1)
    if routing == "hash":
        idx = sm.to_np(args[4])[sm.to_np(args[5]).reshape(-1)]
    picked = np.take_along_axis(score, idx, axis=1)
    w = picked / picked.sum(axis=1, keepdims=True) * cfg.routed_scaling_factor
    if routing == "hash":
        assert np.array_equal(out.indices.numpy(), idx)
    else:  # exact except where two biased scores are within float32 noise
        srt = np.sort(biased, axis=1)[:, ::-1]
        k = cfg.num_experts_per_tok
        clear = (srt[:, k - 1] - srt[:, k]) > 1e-5
        assert np.array_equal(out.indices.numpy()[clear], idx[clear])
    assert np.allclose(out.weights.numpy(), w, rtol=1e-5, atol=1e-6)
    assert np.allclose(out.weights.sum(dim=1).numpy(), cfg.routed_scaling_factor, rtol=1e-5)


def test_sort_ties_go_to_lower_expert_id():
    biased = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9]])
    assert select_sort(biased, 2).tolist() == [[1, 2]]
    assert select_sort(biased, 3).tolist() == [[1, 2, 4]]


def test_weights_use_unbiased_scores():
    """A large bias selects expert 3, but its weight comes from its own (small) score."""
    cfg = get_preset("tiny")
    x_mixed, norm_w, gate_w, _, tid2eid, ids = gate_inputs(cfg, 0)
    bias = torch.zeros(cfg.n_routed_experts)
    bias[3] = 100.0
    out = gate(x_mixed, norm_w, gate_w, bias, tid2eid, ids, cfg, "sort")
    assert bool((out.indices[:, 0] == 3).all())
    no_bias = gate(x_mixed, norm_w, gate_w, torch.zeros_like(bias), tid2eid, ids, cfg, "sort")
    from moe_kernels.reference.gate import gate_scores
    score, _ = gate_scores(out.x_norm.float(), gate_w, bias)
    picked = torch.gather(score, 1, out.indices.long())
    assert torch.allclose(out.weights, picked / picked.sum(1, keepdim=True) * 1.5)
    assert not torch.equal(out.indices, no_bias.indices)


def test_hash_routing_reads_tid2eid_rows():
    cfg = get_preset("tiny")
    x_mixed, norm_w, gate_w, bias, tid2eid, ids = gate_inputs(cfg, 1)
    out = gate(x_mixed, norm_w, gate_w, bias, tid2eid, ids, cfg, "hash")
    assert torch.equal(out.indices, tid2eid[ids.reshape(-1)])
    with pytest.raises(ValueError, match="input_ids"):
        gate(x_mixed, norm_w, gate_w, bias, tid2eid, ids + cfg.vocab_size, cfg, "hash")


def expert_weights(seed, n, i_dim, d):
    """n experts' INT8 weights via the fixture recipe."""
    ws = {}
    for name, no, ki in (("w1", i_dim, d), ("w3", i_dim, d), ("w2", d, i_dim)):
        qs = [quantized_weight(seed, f"t{name}{e}", no, ki) for e in range(n)]
        ws[name] = torch.stack([q for q, _ in qs])
        ws[name + "_scale"] = torch.stack([s for _, s in qs])
    return ws


def np_ffn(x_i8, xs, ws, e, limit, row_w=None):
    g = lambda k: ws[k][e].numpy()  # noqa: E731
    return sm.ffn(x_i8.numpy(), xs.numpy().astype(np.float64), g("w1"), g("w1_scale"), g("w3"),
                  g("w3_scale"), g("w2"), g("w2_scale"), limit, row_w)


@pytest.mark.parametrize("limit", [0.0, 10.0, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_expert_shared(shape, seed, limit):
    cfg = get_preset(SHAPES[shape][0], **SHAPES[shape][1])
    d, i_dim = cfg.hidden_size, cfg.moe_intermediate_size
    x_i8, xs = quantize_rows_int8(rand(seed, 8, d))
    ws = expert_weights(seed, 1, i_dim, d)
    sh = expert_shared(x_i8, xs, ExpertWeights(*(ws[k][0] for k in ExpertWeights._fields)),
                       limit)
    assert sh.dtype == torch.bfloat16 and sh.shape == (8, d)
    exp = sm.bf16_rne_bits(np_ffn(x_i8, xs, ws, 0, limit))
    r = ratio_reldiff(sh, torch.from_numpy(exp), diff_thd=0.01, pct_thd=0.05)
    assert r.passed, str(r)
    assert r.bad_fraction < 0.01


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_expert_routed_masks_dirty_tail_and_applies_weight_after_w2(shape, seed):
    cfg = get_preset(SHAPES[shape][0], **SHAPES[shape][1])
    d, i_dim, nl, cap = cfg.hidden_size, cfg.moe_intermediate_size, 3, 5
    ws = expert_weights(seed, nl, i_dim, d)
    g = torch.Generator().manual_seed(seed)
    recv_x = torch.randint(-128, 128, (nl, cap, d), generator=g, dtype=torch.int8)  # dirty
    recv_s = torch.rand(nl, cap, generator=g) * 0.05
    recv_w = torch.rand(nl, cap, generator=g)
    count = torch.tensor([cap, 0, 2])
    ew = ExpertWeights(*(ws[k] for k in ExpertWeights._fields))
    y = expert_routed(recv_x, recv_s, recv_w, count, ew, cfg.swiglu_limit)
    assert y.dtype == torch.bfloat16 and y.shape == (nl, cap, d)
    assert int(y[1].abs().sum()) == 0 and int(y[2, 2:].float().abs().sum()) == 0
    for e, n in enumerate(count.tolist()):
        if n == 0:
            continue
        exp = sm.bf16_rne_bits(np_ffn(recv_x[e, :n], recv_s[e, :n, None], ws, e,
                                      cfg.swiglu_limit, recv_w[e, :n, None].numpy()))
        r = ratio_reldiff(y[e, :n], torch.from_numpy(exp), diff_thd=0.01, pct_thd=0.05)
        assert r.passed, f"expert {e}: {r}"


def test_expert_routed_rejects_bad_counts():
    ws = expert_weights(0, 1, 8, 8)
    args = ExpertWeights(*(ws[k] for k in ExpertWeights._fields))
    with pytest.raises(ValueError, match="recv_count"):
        expert_routed(torch.zeros(1, 2, 8, dtype=torch.int8), torch.zeros(1, 2),
                      torch.zeros(1, 2), torch.tensor([3]), args, 0.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_dispatch_places_routes_in_scan_order(seed):
    g = torch.Generator().manual_seed(seed)
    t, k, nl, d = 9, 3, 4, 8
    idx = torch.stack([torch.randperm(nl, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    x_i8 = torch.randint(-128, 128, (t, d), generator=g, dtype=torch.int8)
    xs, w = torch.rand(t, 1, generator=g), torch.rand(t, k, generator=g)
    buf = dispatch_single(idx, x_i8, xs, w, nl, capacity=t)
    # independent restatement: walk routes t-major, k-minor with per-expert cursors
    cursor = [0] * nl
    for tt in range(t):
        for kk in range(k):
            e = int(idx[tt, kk])
            s = cursor[e]
            cursor[e] += 1
            assert torch.equal(buf.x[e, s], x_i8[tt]) and buf.scale[e, s] == xs[tt, 0]
            assert buf.weight[e, s] == w[tt, kk] and buf.route[e, s] == tt * k + kk
    assert buf.count.tolist() == cursor
    for e in range(nl):  # unused slots are zeroed, not left over
        assert int(buf.x[e, cursor[e]:].abs().sum()) == 0
        assert bool((buf.route[e, cursor[e]:] == -1).all())


def test_dispatch_capacity_error_names_expert_count_capacity():
    idx = torch.tensor([[0, 1], [0, 2], [0, 3]], dtype=torch.int32)
    with pytest.raises(CapacityError, match="local expert 0 receives 3 rows, capacity is 2"):
        dispatch_single(idx, torch.zeros(3, 4, dtype=torch.int8), torch.zeros(3, 1),
                        torch.zeros(3, 2), 4, capacity=2)


def test_combine_keeps_both_routes_of_a_duplicated_expert():
    """Token 0 picks expert 1 twice: a token-keyed scratch would lose one (spec §2.8)."""
    d, k = 4, 2
    idx = torch.tensor([[1, 1], [0, 1]], dtype=torch.int32)
    buf = dispatch_single(idx, torch.zeros(2, d, dtype=torch.int8), torch.ones(2, 1),
                          torch.ones(2, k), 2)
    recv_y = torch.zeros(2, buf.x.shape[1], d, dtype=torch.bfloat16)
    # expert output = route id + 1, so the reduce shows which routes arrived
    for e in range(2):
        for s in range(int(buf.count[e])):
            recv_y[e, s] = float(buf.route[e, s]) + 1.0
    sh = torch.full((2, d), 0.5, dtype=torch.bfloat16)
    n = buf.count.tolist()
    rows = torch.cat([recv_y[e, :c] for e, c in enumerate(n)])
    routes = torch.cat([buf.route[e, :c] for e, c in enumerate(n)])
    out = reduce_routes(sh, scatter_routes(rows, routes, sh.shape[0] * k), k)
    assert out[0].tolist() == [0.5 + 1 + 2] * d      # routes 0 and 1 both kept
    assert out[1].tolist() == [0.5 + 3 + 4] * d


def test_reduce_order_is_sh_then_k():
    """FP32 sum order matters: sh first, then k = 0..K-1 (spec §3.6). Here summing the
    routed rows first would give 1 + 2^-8 + 2^-23, which rounds up to BF16 1 + 2^-7;
    the spec order absorbs each 2^-24 into the tie and rounds to 1.0."""
    sh = torch.tensor([[1.0]], dtype=torch.bfloat16)
    ys = torch.tensor([[2.0 ** -8], [2.0 ** -24], [2.0 ** -24]], dtype=torch.bfloat16)
    assert reduce_routes(sh, ys, 3).to(torch.float32).item() == 1.0
    ys_first = (ys.float().sum() + 1.0).to(torch.bfloat16).float().item()
    assert ys_first == 1.0 + 2.0 ** -7


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_hc_post(shape, seed):
    cfg = get_preset(SHAPES[shape][0], **SHAPES[shape][1])
    b, s, hc, d = 2, 2, cfg.hc_mult, cfg.hidden_size
    ffn_out = rand(seed, b, s, d).to(torch.bfloat16)
    x_hc = rand(seed + 1, b, s, hc, d).to(torch.bfloat16)
    post = torch.rand(b, s, hc, generator=torch.Generator().manual_seed(seed)) * 2
    comb = torch.softmax(rand(seed + 2, b, s, hc, hc), dim=-1)
    out = hc_post(ffn_out, x_hc, post, comb)
    exp = sm.hc_post(sm.to_np(ffn_out), sm.to_np(x_hc), post.numpy().astype(np.float64),
                     comb.numpy().astype(np.float64))
    assert out.dtype == torch.bfloat16 and out.shape == (b, s, hc, d)
    allclose_ratio(sm.to_np(out), exp, 1e-3, 1e-3)                   # spec §5.3
    # and almost every point within one BF16 ulp (FP32 accumulation may flip a rounding
    # where the residual terms cancel)
    r = ratio_reldiff(out, torch.from_numpy(exp), diff_thd=2.0 ** -7, pct_thd=1e-3)
    assert r.passed, str(r)
