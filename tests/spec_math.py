"""An independent restatement of spec §2 in NumPy, for the tests.

Written from the spec text, not from moe_kernels: float64 math, per token where the
spec reads per token, rounded only where the spec rounds (BF16 rint, Q8). BF16 rounding
is done on the bit pattern; Q8 in NumPy float32 scalars. Torch is used only to convert
at the boundaries.
"""
from __future__ import annotations

import numpy as np
import torch


def to_np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy().astype(np.float64)
    return t.numpy()


def bf16_rne_bits(x: np.ndarray) -> np.ndarray:
    """float -> nearest BF16 value (ties to even) via the FP32 bit pattern; NaN stays NaN."""
    f = np.asarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    bias = 0x7FFF + ((u >> 16) & 1)
    r = ((u + bias) & 0xFFFF0000).astype(np.uint32)
    out = r.view(np.float32).copy()
    out[np.isnan(f)] = np.nan
    return out.astype(np.float64)


def q8_rows(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec §2.1 with float32 scalars: amax floor 1e-4, qs=127/amax, rint->i32->f16->i8."""
    v = np.asarray(v, dtype=np.float32)
    rows = v.reshape(-1, v.shape[-1])
    q = np.zeros(rows.shape, dtype=np.int8)
    s = np.zeros((rows.shape[0], 1), dtype=np.float32)
    for i, row in enumerate(rows):
        amax = max(np.float32(1e-4), np.abs(row).max() if row.size else np.float32(0))
        qs = np.float32(127.0) / np.float32(amax)
        s[i, 0] = np.float32(1.0) / qs
        r = np.rint(row * qs).astype(np.int32).astype(np.float16)
        q[i] = np.trunc(r).astype(np.int8)
    return q.reshape(v.shape), s.reshape(*v.shape[:-1], 1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def hc_pre(x_hc, fn, scale, base, hc, eps, norm_eps, iters):
    """Per token: r, mix, pre/post/comb with Sinkhorn, x_mixed in float64 (BF16 at the end)."""
    b, s, _, d = x_hc.shape
    x = x_hc.reshape(b * s, hc, d)
    xm = np.zeros((b * s, d))
    post = np.zeros((b * s, hc))
    comb = np.zeros((b * s, hc, hc))
    for t in range(b * s):
        X = x[t].reshape(-1)
        r = 1.0 / np.sqrt((X * X).sum() / X.size + norm_eps)
        mix = r * (fn @ X)
        pre = sigmoid(mix[:hc] * scale[0] + base[:hc]) + eps
        post[t] = 2 * sigmoid(mix[hc:2 * hc] * scale[1] + base[hc:2 * hc])
        L = (mix[2 * hc:] * scale[2] + base[2 * hc:]).reshape(hc, hc)
        e = np.exp(L - L.max(axis=1, keepdims=True))
        C = e / e.sum(axis=1, keepdims=True) + eps
        C = C / (C.sum(axis=0, keepdims=True) + eps)
        for _ in range(iters - 1):
            C = C / (C.sum(axis=1, keepdims=True) + eps)
            C = C / (C.sum(axis=0, keepdims=True) + eps)
        comb[t] = C
        xm[t] = (pre[:, None] * x[t]).sum(axis=0)
    return (bf16_rne_bits(xm).reshape(b, s, d), post.reshape(b, s, hc),
            comb.reshape(b, s, hc, hc))


def gate(x_mixed, norm_w, gate_w, bias, tid2eid, ids, k, scale, eps, hash_route):
    """Returns x_norm (BF16 values), score, biased, indices, weights (float64)."""
    x = x_mixed.reshape(-1, x_mixed.shape[-1])
    inv = 1.0 / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps)
    xn = bf16_rne_bits(x * inv * norm_w)
    z = xn @ gate_w.T
    score = np.sqrt(np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))))
    biased = score + bias
    if hash_route:
        idx = tid2eid[ids.reshape(-1)]
    else:
        idx = np.stack([sorted(range(len(row)), key=lambda e, row=row: (-row[e], e))[:k]
                        for row in biased])
    picked = np.take_along_axis(score, idx, axis=1)
    w = picked / picked.sum(axis=1, keepdims=True) * scale
    return xn, score, biased, idx, w


def ffn(x_i8, xs, w1, s1, w3, s3, w2, s2, limit, row_w=None):
    """W8A8 SwiGLU in float64 with Q8 on h (spec §2.4/§2.7): returns y before BF16."""
    g = (x_i8.astype(np.float64) @ w1.astype(np.float64).T) * xs * s1
    u = (x_i8.astype(np.float64) @ w3.astype(np.float64).T) * xs * s3
    if limit > 0:
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
    h = g * sigmoid(g) * u
    hq, hs = q8_rows(h.astype(np.float32))
    y = (hq.astype(np.float64) @ w2.astype(np.float64).T) * hs * s2
    if row_w is not None:
        y = y * row_w
    return y


def hc_post(ffn_out, x_hc, post, comb):
    """x_next[t,o] = post[o]·f + Σ_i comb[i,o]·x_hc[i] in float64, then BF16."""
    out = post[..., :, None] * ffn_out[..., None, :] + np.einsum("bsio,bsid->bsod", comb, x_hc)
    return bf16_rne_bits(out)


def layer(x_hc, ids, w: dict, cfg, hash_route: bool):
    """The whole single-card layer for one rank's tokens, float64 between the spec's roundings.

    Routed experts are applied per route (t, k) directly: no dispatch buffers at all, which
    is the independent statement of what dispatch + combine must achieve.
    """
    hc, k = cfg.hc_mult, cfg.num_experts_per_tok
    xm, post, comb = hc_pre(x_hc, to_np(w["hc_fn"]), to_np(w["hc_scale"]), to_np(w["hc_base"]),
                            hc, cfg.hc_eps, cfg.rms_norm_eps, cfg.hc_sinkhorn_iters)
    xn, _, _, idx, wts = gate(xm, to_np(w["norm_w"]), to_np(w["gate_w"]), to_np(w["gate_bias"]),
                              to_np(w["tid2eid"]), ids, k, cfg.routed_scaling_factor,
                              cfg.rms_norm_eps, hash_route)
    xq, xs = q8_rows(xn.astype(np.float32))
    n = lambda name: to_np(w[name])  # noqa: E731
    sh = bf16_rne_bits(ffn(xq, xs, n("shared_w1"), n("shared_w1_scale"), n("shared_w3"),
                           n("shared_w3_scale"), n("shared_w2"), n("shared_w2_scale"),
                           cfg.swiglu_limit))
    acc = sh.copy()
    for kk in range(k):
        for t in range(xq.shape[0]):
            e = idx[t, kk]
            y = ffn(xq[t:t + 1], xs[t:t + 1], n("routed_w1")[e], n("routed_w1_scale")[e],
                    n("routed_w3")[e], n("routed_w3_scale")[e], n("routed_w2")[e],
                    n("routed_w2_scale")[e], cfg.swiglu_limit, row_w=wts[t, kk])
            acc[t] += bf16_rne_bits(y)[0]
    ffn_out = bf16_rne_bits(acc).reshape(x_hc.shape[0], x_hc.shape[1], -1)
    return hc_post(ffn_out, x_hc, post, comb), idx
