"""hc_pre (spec §2.2) and hc_post (spec §2.9) as pypto kernels.

Each public function returns (outputs, LatencyRecord | None) and has the dtypes of the
torch reference in moe_kernels/reference/hc_pre.py and hc_post.py.
"""
# No `from __future__ import annotations` here: pypto reads the kernels' tensor
# annotations as objects, not strings.

import functools

import torch

from ..config import ModelConfig
from . import runtime as rt
from .runtime import LatencyRecord

#: hc_pre RMS/cast tiles: 4 tokens x 512 FP32 columns -> 32 row groups for the RMS sum over
#: hc·D = 16K columns (measured: 16 rows 319 us total, 4 rows 185 us, 1 row 264 us).
TOKEN_TILE = 4
#: Columns per tile of the cast + RMS sum over hc·D: 4 x 4096 FP32 = 64 KiB (fewer partial
#: sums per row: 512 -> 141 us, 2048 -> 138 us, 4096 -> 133 us for the whole kernel).
RMS_COL_TILE = 4096
#: Columns per vector tile over D (and over hc·D for the RMS sum): a multiple of the
#: 128-lane vector width; 16 x 512 FP32 = 32 KiB per live tile.
COL_TILE = 512
#: x_mixed tile: 16 tokens x 512 -> 64 tasks over 48 vector cores (measured best of
#: 4/16 rows: per-task cost in the model is dominated by the ops, not the tile size).
XMIX_TOKEN_TILE = 16
#: hc_post vector tile (tokens x columns): 16 x 512 -> 64 tasks (4 x 2048, 32 x 256 and
#: 4 x 1024 measured equal or slower).
POST_TOKEN_TILE, POST_COL_TILE = 16, 512
#: Cube tiles for mix^T = fn @ X^T, [mix_hc, hc·D] x [T, hc·D]^T (FP32): M 16, N <= 32,
#: K 512 in L0 (16·512·4 = 32 KiB) and 2048 per L1 fill, with split-K (GM accumulation):
#: K = 16K is long and M·N tiny, so K chunks are what spread the work over the cube cores
#: (without split-K: 2 tasks of 233 us each).
MIX_CUBE_M, MIX_CUBE_K, MIX_CUBE_N = 16, 512, 32
MIX_CUBE_K1 = 2048


def _tile(n: int, want: int) -> int:
    """The largest divisor of n that is <= want (tiles must cover the axis exactly:
    the interpreter rejects partial tiles for some ops, e.g. sigmoid)."""
    for t in range(min(n, want), 0, -1):
        if n % t == 0:
            return t
    return 1


@functools.lru_cache(maxsize=16)
def _hc_pre_kernel(t: int, hc: int, d: int, iters: int, rms_eps: float, hc_eps: float):
    pypto = rt.ensure_ready()
    mix = (2 + hc) * hc
    hd = hc * d
    tt = _tile(t, TOKEN_TILE)
    xt = _tile(t, XMIX_TOKEN_TILE)
    rc = _tile(hd, RMS_COL_TILE)
    ct = _tile(d, COL_TILE)
    kt = _tile(hd, MIX_CUBE_K)
    kt1 = _tile(hd, MIX_CUBE_K1)
    nt = min(MIX_CUBE_N, -(-t // 16) * 16)  # cube N tiles must be 16-aligned

    @pypto.frontend.jit(**rt.jit_options())
    def hc_pre_k(x: pypto.Tensor((t, hd), pypto.DT_BF16),
                 fn: pypto.Tensor((mix, hd), pypto.DT_FP32),
                 scale_col: pypto.Tensor((mix, 1), pypto.DT_FP32),
                 base_col: pypto.Tensor((mix, 1), pypto.DT_FP32),
                 x_mixed: pypto.Tensor((t, d), pypto.DT_BF16),
                 post_t: pypto.Tensor((hc, t), pypto.DT_FP32),
                 comb_t: pypto.Tensor((hc, hc, t), pypto.DT_FP32)):
        """r = rsqrt(mean(X²)+eps); logits = r·(X fn^T)·s + b; pre/post = σ; comb = sinkhorn;
        x_mixed = bf16(Σ_h pre_h · x_h). Logits are kept token-minor ([mix, T]) so every
        reduction runs over a 32-byte aligned last axis (pypto needs that; hc = 4 FP32 is 16 B)."""
        pypto.set_vec_tile_shapes(tt, rc)
        pypto.set_cube_tile_shapes([MIX_CUBE_M, MIX_CUBE_M], [kt, kt1], [nt, nt], True)
        xf = pypto.cast(x, pypto.DT_FP32)
        ssq = pypto.sum(pypto.mul(xf, xf), -1, keepdim=True)
        r = pypto.rsqrt(pypto.add(pypto.div(ssq, float(hd)), rms_eps))
        mm_t = pypto.matmul(fn, xf, pypto.DT_FP32, b_trans=True)      # [mix, T]
        pypto.set_vec_tile_shapes(mix, t)
        logits = pypto.add(pypto.mul(pypto.mul(pypto.reshape(r, [1, t]), mm_t), scale_col),
                           base_col)
        pre = pypto.add(pypto.sigmoid(pypto.view(logits, [hc, t], [0, 0])), hc_eps)
        post_t[:] = pypto.mul(pypto.sigmoid(pypto.view(logits, [hc, t], [hc, 0])), 2.0)
        # Sinkhorn on C[i, j, t]: row softmax over j + eps, column norm over i,
        # then (iters - 1) x (row, column) normalisations, each / (sum + eps).
        pypto.set_vec_tile_shapes(hc, hc, t)
        lg = pypto.reshape(pypto.view(logits, [hc * hc, t], [2 * hc, 0]), [hc, hc, t])
        c = pypto.add(pypto.softmax(lg, 1), hc_eps)
        c = pypto.div(c, pypto.add(pypto.sum(c, 0, keepdim=True), hc_eps))
        for _ in range(iters - 1):
            c = pypto.div(c, pypto.add(pypto.sum(c, 1, keepdim=True), hc_eps))
            c = pypto.div(c, pypto.add(pypto.sum(c, 0, keepdim=True), hc_eps))
        comb_t[:] = c
        # x_mixed: FP32 accumulation over streams h = 0..hc-1 in order.
        pypto.set_vec_tile_shapes(xt, ct)
        acc = pypto.mul(pypto.reshape(pypto.view(pre, [1, t], [0, 0]), [t, 1]),
                        pypto.view(xf, [t, d], [0, 0]))
        for h in range(1, hc):
            acc = pypto.add(acc, pypto.mul(pypto.reshape(pypto.view(pre, [1, t], [h, 0]), [t, 1]),
                                           pypto.view(xf, [t, d], [0, h * d])))
        x_mixed[:] = pypto.cast(acc, pypto.DT_BF16, pypto.CastMode.CAST_RINT)

    return hc_pre_k


def hc_pre(x_hc: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor,
           hc_base: torch.Tensor, cfg: ModelConfig
           ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], LatencyRecord | None]:
    """x_hc [B,S,hc,D] BF16 -> ((x_mixed [B,S,D] BF16, post [B,S,hc] FP32,
    comb [B,S,hc,hc] FP32), latency). Math of reference.hc_pre.hc_pre."""
    hc, d = cfg.hc_mult, cfg.hidden_size
    if x_hc.dim() != 4 or tuple(x_hc.shape[2:]) != (hc, d) or x_hc.dtype != torch.bfloat16:
        raise ValueError(f"x_hc must be [B,S,{hc},{d}] bfloat16, got {tuple(x_hc.shape)} "
                         f"{x_hc.dtype}")
    b, s = x_hc.shape[:2]
    t = b * s
    mix = cfg.mix_hc
    # Per-column scale: s0 on the hc pre logits, s1 on the hc post logits, s2 on comb.
    sc = hc_scale.to(torch.float32)
    scale_vec = torch.cat([sc[0].repeat(hc), sc[1].repeat(hc), sc[2].repeat(hc * hc)])
    k = _hc_pre_kernel(t, hc, d, cfg.hc_sinkhorn_iters, cfg.rms_norm_eps, cfg.hc_eps)
    x_mixed = torch.empty(t, d, dtype=torch.bfloat16)
    post_t = torch.empty(hc, t, dtype=torch.float32)
    comb_t = torch.empty(hc, hc, t, dtype=torch.float32)
    lat = rt.launch(k, x_hc.reshape(t, hc * d).contiguous(), hc_fn.to(torch.float32).contiguous(),
                    scale_vec.reshape(mix, 1).contiguous(),
                    hc_base.to(torch.float32).reshape(mix, 1).contiguous(),
                    x_mixed, post_t, comb_t, name="hc_pre")
    # Token-minor kernel layout back to the reference's [B,S,hc(,hc)] (a host permute of
    # T·20 floats).
    post = post_t.t().contiguous().reshape(b, s, hc)
    comb = comb_t.permute(2, 0, 1).contiguous().reshape(b, s, hc, hc)
    return (x_mixed.reshape(b, s, d), post, comb), lat


@functools.lru_cache(maxsize=16)
def _hc_post_kernel(t: int, hc: int, d: int):
    pypto = rt.ensure_ready()
    tt = _tile(t, POST_TOKEN_TILE)
    ct = _tile(d, POST_COL_TILE)

    @pypto.frontend.jit(**rt.jit_options())
    def hc_post_k(f: pypto.Tensor((t, d), pypto.DT_BF16),
                  x: pypto.Tensor((t, hc * d), pypto.DT_BF16),
                  post: pypto.Tensor((t, hc), pypto.DT_FP32),
                  comb: pypto.Tensor((t, hc * hc), pypto.DT_FP32),
                  out: pypto.Tensor((t, hc * d), pypto.DT_BF16)):
        """out[:, o] = bf16(post_o · f + Σ_i comb[i, o] · x_i), i in order."""
        pypto.set_vec_tile_shapes(tt, ct)
        ff = pypto.cast(f, pypto.DT_FP32)
        xs = []  # (no comprehensions: pypto evaluates kernel expressions without closures)
        for i in range(hc):
            xs.append(pypto.cast(pypto.view(x, [t, d], [0, i * d]), pypto.DT_FP32))
        for o in range(hc):
            acc = pypto.mul(pypto.view(post, [t, 1], [0, o]), ff)
            for i in range(hc):
                acc = pypto.add(acc, pypto.mul(pypto.view(comb, [t, 1], [0, i * hc + o]), xs[i]))
            pypto.assemble(pypto.cast(acc, pypto.DT_BF16, pypto.CastMode.CAST_RINT),
                           [0, o * d], out)

    return hc_post_k


def hc_post(ffn_out: torch.Tensor, x_hc: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> tuple[torch.Tensor, LatencyRecord | None]:
    """ffn_out [B,S,D] BF16, x_hc [B,S,hc,D] BF16, post [B,S,hc], comb [B,S,hc,hc] FP32 ->
    (x_next [B,S,hc,D] BF16, latency). Math of reference.hc_post.hc_post."""
    b, s, hc, d = x_hc.shape
    if tuple(ffn_out.shape) != (b, s, d):
        raise ValueError(f"ffn_out must be [{b},{s},{d}], got {tuple(ffn_out.shape)}")
    t = b * s
    out = torch.empty(t, hc * d, dtype=torch.bfloat16)
    lat = rt.launch(_hc_post_kernel(t, hc, d), ffn_out.reshape(t, d).contiguous(),
                    x_hc.reshape(t, hc * d).contiguous(),
                    post.to(torch.float32).reshape(t, hc).contiguous(),
                    comb.to(torch.float32).reshape(t, hc * hc).contiguous(), out,
                    name="hc_post")
    return out.reshape(b, s, hc, d), lat
