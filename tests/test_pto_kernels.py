"""Each pypto stage kernel against its torch reference through pypto's CPU interpreter,
on the tiny preset and on one demo-width shape per stage (few tokens / experts to stay
cheap). Bit-exact where integer math makes it so; spec §5.3 tolerances otherwise."""
import pytest
import torch
from bitwise import assert_gate_matches

from moe_kernels.config import RunConfig, get_preset
from moe_kernels.fixtures import generator, make_inputs, make_weights
from moe_kernels.numerics import quantize_rows_int8
from moe_kernels.reference import dispatch_combine as ref_dc
from moe_kernels.reference import expert_routed as ref_er
from moe_kernels.reference import expert_shared as ref_es
from moe_kernels.reference import gate as ref_gate
from moe_kernels.reference import hc_post as ref_hp
from moe_kernels.reference import hc_pre as ref_hpre
from moe_kernels.reference.dispatch_combine import dispatch_single, reduce_routes
from moe_kernels.types import ExpertWeights

pytestmark = pytest.mark.pypto
pto = pytest.importorskip("moe_kernels.pto.backend")
from moe_kernels.pto import ffn, gate, hc, routes, shared_ffn  # noqa: E402

# demo width (D = I = 4096) with few tokens: the demo-sized case of every stage
DEMO_T = (4, 4)          # batch, seq -> 16 tokens


def _allclose_ratio(act, exp, atol, rtol, max_bad=1e-3):
    """Spec's ratio_allclose(atol, rtol): |a - e| <= atol + rtol·|e| on all but max_bad."""
    bad = ((act.double() - exp.double()).abs() > atol + rtol * exp.double().abs()).sum()
    return int(bad) <= max(1, int(max_bad * act.numel()))


def _rand_i8(name, *shape):
    return torch.randint(-127, 128, shape, generator=generator(7, name), dtype=torch.int8)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny")
    return cfg, make_weights(cfg, seed=0)


def _hc_inputs(cfg, b, s):
    run = RunConfig(cfg, batch=b, seq=s, routing="sort" if cfg.num_hash_layers == 0 else "hash")
    return make_inputs(run, seed=3).x_hc[0]


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_hc_pre_and_hc_post(tiny, size):
    cfg, w = tiny
    if size == "demo":
        cfg = get_preset("demo")
        hc_fn = torch.randn(cfg.mix_hc, cfg.hc_dim, generator=generator(1, "fn")) * 0.0635
        hc_scale, hc_base = w.hc_scale, w.hc_base
    else:
        hc_fn, hc_scale, hc_base = w.hc_fn, w.hc_scale, w.hc_base
    x = _hc_inputs(cfg, *((4, 2) if size == "tiny" else DEMO_T))
    (xm, post, comb), lat = hc.hc_pre(x, hc_fn, hc_scale, hc_base, cfg)
    rxm, rpost, rcomb = ref_hpre.hc_pre(x, hc_fn, hc_scale, hc_base, cfg)
    assert xm.dtype == torch.bfloat16 and post.dtype == comb.dtype == torch.float32
    assert _allclose_ratio(xm, rxm, 1e-4, 1 / 128)
    assert _allclose_ratio(post, rpost, 2.5e-5, 5e-3)
    assert _allclose_ratio(comb, rcomb, 2.5e-5, 5e-3)
    assert lat.aicore_us > 0
    # hc_post: FP32 mul/add in the reference's order -> bit-exact
    f = torch.randn(*xm.shape, generator=generator(2, "f")).to(torch.bfloat16)
    xn, lat2 = hc.hc_post(f, x, rpost, rcomb)
    assert torch.equal(xn, ref_hp.hc_post(f, x, rpost, rcomb))
    assert lat2.aicore_us > 0


@pytest.mark.parametrize("routing,size", [("hash", "tiny"), ("sort", "tiny"), ("sort", "demo")])
def test_gate(tiny, routing, size):
    cfg, w = tiny
    b, s = (4, 2) if size == "tiny" else DEMO_T
    if size == "demo":
        cfg = get_preset("demo")
        d, e = cfg.hidden_size, cfg.n_routed_experts
        norm_w = torch.ones(d)
        gate_w = torch.randn(e, d, generator=generator(1, "gw")) / d ** 0.5
        gate_b = torch.randn(e, generator=generator(1, "gb")) * 0.02
        tid = w.tid2eid
    else:
        norm_w, gate_w, gate_b, tid = w.norm_w, w.gate_w, w.gate_bias, w.tid2eid
    xm = torch.randn(b, s, cfg.hidden_size, generator=generator(4, "xm")).to(torch.bfloat16)
    ids = torch.randint(0, tid.shape[0], (b, s), generator=generator(4, "ids"))
    out, lat = gate.gate(xm, norm_w, gate_w, gate_b, tid, ids, cfg, routing)
    ref = ref_gate.gate(xm, norm_w, gate_w, gate_b, tid, ids, cfg, routing)
    assert_gate_matches(out, ref)
    assert lat.aicore_us > 0


def test_gate_rejects_bad_routing(tiny):
    cfg, w = tiny
    xm = torch.zeros(1, 1, cfg.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="routing must be"):
        gate.gate(xm, w.norm_w, w.gate_w, w.gate_bias, w.tid2eid, torch.zeros(1, 1), cfg,
                  "random")


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_expert_shared_bit_exact(tiny, size):
    cfg, w = tiny
    if size == "tiny":
        t, ws = 8, (w.shared_w1, w.shared_w1_scale, w.shared_w3, w.shared_w3_scale,
                    w.shared_w2, w.shared_w2_scale)
        d = cfg.hidden_size
    else:
        t, d, i = 16, 4096, 4096
        ws = (_rand_i8("w1", i, d), torch.full((i,), 1e-3), _rand_i8("w3", i, d),
              torch.full((i,), 1e-3), _rand_i8("w2", d, i), torch.full((d,), 1e-3))
    xq, xs = quantize_rows_int8(torch.randn(t, d, generator=generator(5, "x")))
    sh, lat = shared_ffn.expert_shared(xq, xs, ExpertWeights(*ws), cfg.swiglu_limit)
    assert torch.equal(sh, ref_es.expert_shared(xq, xs, ExpertWeights(*ws), cfg.swiglu_limit))
    assert lat.aicore_us > 0


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_expert_routed_bit_exact_with_dirty_tail(tiny, size):
    cfg, w = tiny
    if size == "tiny":
        nl, t, d = 4, 8, cfg.hidden_size
        sl = slice(0, nl)
        ws = (w.routed_w1[sl], w.routed_w1_scale[sl], w.routed_w3[sl], w.routed_w3_scale[sl],
              w.routed_w2[sl], w.routed_w2_scale[sl])
    else:
        nl, t, d, i = 1, 16, 4096, 4096
        ws = (_rand_i8("rw1", nl, i, d), torch.full((nl, i), 1e-3), _rand_i8("rw3", nl, i, d),
              torch.full((nl, i), 1e-3), _rand_i8("rw2", nl, d, i), torch.full((nl, d), 1e-3))
    xq, xs = quantize_rows_int8(torch.randn(t, d, generator=generator(6, "x")))
    idx = torch.randint(0, nl, (t, 2), generator=generator(6, "idx")).to(torch.int32)
    wts = torch.rand(t, 2, generator=generator(6, "w"))
    rb = dispatch_single(idx, xq, xs, wts, n_local=nl, capacity=2 * t // nl + 2)
    # poison the tail: garbage rows, scales and weights beyond each expert's count
    tail = torch.arange(rb.x.shape[1])[None, :] >= rb.count[:, None]
    rb.x[tail] = 77
    rb.scale[tail] = float("nan")
    rb.weight[tail] = 1e30
    ws = ExpertWeights(*ws)
    y, lat = ffn.expert_routed(rb.x, rb.scale, rb.weight, rb.count, ws, cfg.swiglu_limit)
    ref = ref_er.expert_routed(rb.x, rb.scale, rb.weight, rb.count, ws, cfg.swiglu_limit)
    assert torch.equal(y, ref)
    assert lat.aicore_us > 0


def test_expert_routed_rejects_bad_count(tiny):
    cfg, w = tiny
    x = torch.zeros(1, 4, cfg.hidden_size, dtype=torch.int8)
    with pytest.raises(ValueError, match="recv_count"):
        ffn.expert_routed(x, torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([5]),
                          w.routed_shard(0, 1), 0.0)


@pytest.mark.parametrize("t,d,k", [(8, 256, 2), (16, 4096, 2)])
def test_pack_scatter_reduce_exact(t, d, k):
    g = generator(8, f"routes{t}")
    x = torch.randint(-127, 128, (t, d), generator=g, dtype=torch.int8)
    xs = torch.rand(t, 1, generator=g)
    wts = torch.rand(t, k, generator=g)
    rid = torch.randperm(t * k, generator=g)[: t * k - 3].to(torch.int32)
    packed, lat = routes.pack_routes(x, xs, wts, rid)
    for a, b in zip(packed, ref_dc.pack_routes(x, xs, wts, rid), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert lat.aicore_us > 0
    rows = torch.randn(t * k, d, generator=g).to(torch.bfloat16)
    perm = torch.randperm(t * k, generator=g).to(torch.int32)
    buf, lat = routes.scatter_routes(rows, perm, t * k)
    assert torch.equal(buf, ref_dc.scatter_routes(rows, perm, t * k))
    sh = torch.randn(t, d, generator=g).to(torch.bfloat16)
    out, lat = routes.reduce_routes(sh, buf, k)
    assert torch.equal(out, reduce_routes(sh, buf, k))


def test_routes_validate_on_host():
    with pytest.raises(RuntimeError, match="exactly once"):
        routes.scatter_routes(torch.zeros(2, 16, dtype=torch.bfloat16),
                              torch.tensor([0, 0], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="route_ids must lie"):
        routes.pack_routes(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, 1),
                           torch.zeros(2, 2), torch.tensor([4]))
    empty, lat = routes.pack_routes(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, 1),
                                    torch.zeros(2, 2), torch.tensor([], dtype=torch.int32))
    assert empty.x.shape == (0, 16) and lat is None


def test_expert_routed_uneven_counts_with_zeros(tiny):
    """The kernel is specialised to the received counts (16-row bound per expert, experts
    with none left out): rows that exist are bit-exact, every other row is exactly 0."""
    cfg, w = tiny
    nl, c, d = 4, 20, cfg.hidden_size
    sl = slice(0, nl)
    ws = ExpertWeights(w.routed_w1[sl], w.routed_w1_scale[sl], w.routed_w3[sl],
                       w.routed_w3_scale[sl], w.routed_w2[sl], w.routed_w2_scale[sl])
    x = _rand_i8("ux", nl, c, d)
    scale = torch.rand(nl, c, generator=generator(9, "us")) * 0.02
    wt = torch.rand(nl, c, generator=generator(9, "uw"))
    count = torch.tensor([0, 3, 17, 0])
    y, lat = ffn.expert_routed(x, scale, wt, count, ws, cfg.swiglu_limit)
    assert torch.equal(y, ref_er.expert_routed(x, scale, wt, count, ws, cfg.swiglu_limit))
    assert lat.aicore_us > 0
    assert ffn.routed_rows(count.tolist(), c) == (0, 16, 20, 0)
    _, none = ffn.expert_routed(x, scale, wt, torch.zeros(nl, dtype=torch.int64), ws,
                                cfg.swiglu_limit)
    assert none is None   # nothing received: no kernel, no weights streamed
