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
from .tiling import divisor_tile

# Tuning constants; what was measured for each is in docs/kernel-tuning.md.
#: hc_pre RMS tiles: 4 tokens x one 4096-column chunk, so each row sum stays in one tile.
TOKEN_TILE = 4
RMS_COL_TILE = 4096
#: x_mixed tiles: 32 tokens x 512 columns -> one wave of tasks on the 48 vector cores.
COL_TILE = 512
XMIX_TOKEN_TILE = 32
#: hc_post tile [tokens, hc, columns] = 1 x hc x 4096: the largest that fits the unified
#: buffer beside the FP32 copy of the hc streams.
POST_TOKEN_TILE, POST_COL_TILE = 1, 4096
#: hc_post tiles merged per vector task: 128 tiles -> 43 tasks, one wave on 48 cores.
POST_TILES_PER_TASK = 3
#: hc_post coefficients (comb[i, o] o-major, then post[o]) each padded to one 32-byte FP32
#: row, so one DMA per tile brings them all and each [tokens, hc, 1] slice is an aligned UB
#: view; a strided view of a GM input is one DMA each (~0.8 us): 31.9 -> 20.2 us at demo.
COEF_ROW = 8
#: Mix matmul [2·mix, hc·D] x [T, hc·D]^T (hc_fn as BF16 hi + lo): one M tile, long K
#: chunks so the split-K reduction has few partials.
MIX_CUBE_M, MIX_CUBE_K, MIX_CUBE_N, MIX_CUBE_K1 = 48, 256, 16, 4096
#: Merge scope of the Sinkhorn chain: its own task, so x_mixed runs beside it.
SINKHORN_SCOPE = 2
#: pre / post logits per group of PRE_TOKEN_GROUP tokens, each group its own merge scope
#: (PRE_SCOPE + g): 4 tasks that each resolve only their 8 x_mixed successors (the single
#: logits task resolved 32 one after another, ~0.21 us each): 49.0 -> 45.9 us at demo R=2
#: (with the comb logits moved into the Sinkhorn task and its 2-D divisions).
PRE_SCOPE = 10
PRE_TOKEN_GROUP = 32


def _logit_rows(pypto, mm_hl, r_row, scale_col, base_col, row0: int, n: int, mix: int,
                t: int):
    """Traced in hc_pre: logits rows [row0, row0 + n) = r·(hi·x + lo·x)·s + b, [n, T]."""
    mm = pypto.add(pypto.view(mm_hl, [n, t], [row0, 0]),                   # hi·x + lo·x
                   pypto.view(mm_hl, [n, t], [mix + row0, 0]))
    return pypto.add(pypto.mul(pypto.mul(r_row, mm), pypto.view(scale_col, [n, 1], [row0, 0])),
                     pypto.view(base_col, [n, 1], [row0, 0]))


def _join_rows(pypto, parts: list):
    """Traced in hc_pre: the token groups' [tokens, hc] pre tiles as one [T, hc] tensor."""
    return parts[0] if len(parts) == 1 else pypto.concat(parts, 0)


def _sinkhorn_norm(pypto, c, axis: int, hc: int, t: int, eps: float):
    """Traced in hc_pre: c / (sum(c, axis) + eps) on C[i, j, t]. The sum stays 3-D; +eps
    and the division run on 2-D views of the same UB tiles (free reshapes): the model
    prices a [4, 4, 128] division at 262 cycles, the same floats as [16, 128] at 114."""
    pypto.set_vec_tile_shapes(hc, hc, t)
    s = pypto.sum(c, axis, keepdim=True)
    shp = [hc, 1, t] if axis == 1 else [1, hc, t]
    pypto.set_vec_tile_shapes(hc, t)
    s2 = pypto.add(pypto.reshape(s, [hc, t], inplace=True), eps)
    pypto.set_vec_tile_shapes(hc, hc, t)
    den = pypto.expand_clone(pypto.reshape(s2, shp, inplace=True), [hc, hc, t])
    pypto.set_vec_tile_shapes(hc * hc, t)
    q = pypto.div(pypto.reshape(c, [hc * hc, t], inplace=True),
                  pypto.reshape(den, [hc * hc, t], inplace=True))
    pypto.set_vec_tile_shapes(hc, hc, t)
    return pypto.reshape(q, [hc, hc, t], inplace=True)


@functools.lru_cache(maxsize=16)
def _hc_pre_kernel(t: int, hc: int, d: int, iters: int, rms_eps: float, hc_eps: float):
    pypto = rt.ensure_ready()
    mix = (2 + hc) * hc
    hd = hc * d
    tt = divisor_tile("tokens", t, TOKEN_TILE)
    xt = divisor_tile("tokens", t, XMIX_TOKEN_TILE)
    rc = divisor_tile("hc*hidden", hd, RMS_COL_TILE)
    ct = divisor_tile("hidden", d, COL_TILE)
    kt = divisor_tile("hc*hidden", hd, MIX_CUBE_K)
    kt1 = divisor_tile("hc*hidden", hd, MIX_CUBE_K1)
    nt = min(MIX_CUBE_N, -(-t // 16) * 16)  # cube N tiles must be 16-aligned
    mm_m = min(MIX_CUBE_M, 2 * mix)
    logit_rows, norm, join = _logit_rows, _sinkhorn_norm, _join_rows
    tgp = divisor_tile("tokens", t, PRE_TOKEN_GROUP)
    gp = t // tgp

    @pypto.frontend.jit(**rt.jit_options())
    def hc_pre_k(x: pypto.Tensor((t, hd), pypto.DT_BF16),
                 fn_hl: pypto.Tensor((2 * mix, hd), pypto.DT_BF16),
                 scale_col: pypto.Tensor((mix, 1), pypto.DT_FP32),
                 base_col: pypto.Tensor((mix, 1), pypto.DT_FP32),
                 x_mixed: pypto.Tensor((t, d), pypto.DT_BF16),
                 post_t: pypto.Tensor((hc, t), pypto.DT_FP32),
                 comb_t: pypto.Tensor((hc, hc, t), pypto.DT_FP32)):
        """r = rsqrt(mean(X²)+eps); logits = r·(X fn^T)·s + b; pre/post = σ; comb = sinkhorn;
        x_mixed = bf16(Σ_h pre_h · x_h). Logits are kept token-minor ([mix, T]) so every
        reduction runs over a 32-byte aligned last axis (pypto needs that; hc = 4 FP32 is 16 B)."""
        pypto.set_vec_tile_shapes(tt, rc)
        pypto.set_cube_tile_shapes([mm_m, mm_m], [kt, kt1], [nt, nt], True)
        # Σ x² per token as hd/rc chunk sums, each over one whole tile row (a reduction
        # split across tiles would write FP32 partials to GM), added in chunk order.
        ssq = None
        for j in range(hd // rc):
            xc = pypto.cast(pypto.view(x, [t, rc], [0, j * rc]), pypto.DT_FP32)
            part = pypto.sum(pypto.mul(xc, xc), -1, keepdim=True)
            ssq = part if ssq is None else pypto.add(ssq, part)
        r = pypto.rsqrt(pypto.add(pypto.div(ssq, float(hd)), rms_eps))
        mm_hl = pypto.matmul(fn_hl, x, pypto.DT_FP32, b_trans=True)   # [2·mix, T]
        # Reshapes are inplace (views of the same storage): a copying reshape ran as 128
        # tiny serial tasks in the model (kernel 94.0 -> 78.3 us).
        r_row = pypto.reshape(r, [1, t], inplace=True)
        # pre / post per token group, each its own task: the x_mixed tasks of a group wait
        # for (and are resolved by) that group's task only
        pypto.set_vec_tile_shapes(2 * hc, tgp)
        pre_parts = []
        for g in range(gp):
            pypto.set_pass_options(sg_set_scope=PRE_SCOPE + g)
            lg_g = logit_rows(pypto, pypto.view(mm_hl, [2 * mix, tgp], [0, g * tgp]),
                              pypto.view(r_row, [1, tgp], [0, g * tgp]), scale_col, base_col,
                              0, 2 * hc, mix, tgp)
            pre_g = pypto.add(pypto.sigmoid(pypto.view(lg_g, [hc, tgp], [0, 0])), hc_eps)
            pypto.assemble(pypto.mul(pypto.sigmoid(pypto.view(lg_g, [hc, tgp], [hc, 0])), 2.0),
                           [0, g * tgp], post_t)
            pre_parts.append(pypto.transpose(pre_g, 0, 1))
        pypto.set_pass_options(sg_set_scope=-1)
        # x_mixed: FP32 accumulation over streams h = 0..hc-1 in order.
        pypto.set_vec_tile_shapes(xt, ct)
        # (x is read as BF16 and cast here: no FP32 copy of x goes through GM.)
        # pre token-major via a transpose in the logits task, read per stream as a [T, 1]
        # column view: the former inplace reshape of pre[h] ([1, T] -> [T, 1]) still ran as
        # its own copy phase (2 tasks of 1.9 us plus a ~3 us dependency gap on the critical
        # path to x_mixed): hc_pre 55.9 -> 49.0 us at demo R=2 (data movement only: same bits).
        # (Tried and dropped: logits tiled (mix, 32 / 64): RMS and logits merged into 4 / 2
        # tasks of 34 / 66 us, 82.2 / 113.8 us; a merge scope around the logits / the split-K
        # sum: 57.1 / 109.7 us; split-K written out as 4 matmuls + in-order adds: the adds
        # stay their own phase, 48.7 us, not kept (same time, pypto's own reduction kept);
        # XMIX_TOKEN_TILE 16: 50.7 us, 64: compile error.)
        pre_tm = join(pypto, pre_parts)
        acc = pypto.mul(pypto.view(pre_tm, [t, 1], [0, 0]),
                        pypto.cast(pypto.view(x, [t, d], [0, 0]), pypto.DT_FP32))
        for h in range(1, hc):
            pre_h = pypto.view(pre_tm, [t, 1], [0, h])
            acc = pypto.add(acc, pypto.mul(pre_h, pypto.cast(pypto.view(x, [t, d], [0, h * d]),
                                                             pypto.DT_FP32)))
        x_mixed[:] = pypto.cast(acc, pypto.DT_BF16, pypto.CastMode.CAST_RINT)
        pypto.set_pass_options(sg_set_scope=SINKHORN_SCOPE)
        # Sinkhorn on C[i, j, t]: row softmax over j + eps, column norm over i,
        # then (iters - 1) x (row, column) normalisations, each / (sum + eps).
        pypto.set_vec_tile_shapes(hc * hc, t)
        lc = logit_rows(pypto, mm_hl, r_row, scale_col, base_col, 2 * hc, hc * hc, mix, t)
        pypto.set_vec_tile_shapes(hc, hc, t)
        c = pypto.add(pypto.softmax(pypto.reshape(lc, [hc, hc, t], inplace=True), 1), hc_eps)
        c = norm(pypto, c, 0, hc, t, hc_eps)
        for _ in range(iters - 1):
            c = norm(pypto, c, 1, hc, t, hc_eps)
            c = norm(pypto, c, 0, hc, t, hc_eps)
        comb_t[:] = c
        pypto.set_pass_options(sg_set_scope=-1)

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
    # hc_fn (FP32) as BF16 hi + lo rows: hi = bf16(fn), lo = bf16(fn - hi); Σ (hi + lo)·x in
    # FP32 matches the FP32 product to ~2^-17 relative (same bytes as the FP32 weight).
    fn32 = hc_fn.to(torch.float32)
    hi = fn32.to(torch.bfloat16)
    fn_hl = torch.cat([hi, (fn32 - hi.to(torch.float32)).to(torch.bfloat16)]).contiguous()
    lat = rt.launch(k, x_hc.reshape(t, hc * d).contiguous(), fn_hl,
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
    tt = divisor_tile("tokens", t, POST_TOKEN_TILE)
    ct = divisor_tile("hidden", d, POST_COL_TILE)
    # vec_nbuffer_setting {-2: 1, -1: n}: every group of isomorphic vector subgraphs is
    # merged n to a task (pypto's "breadth" graph merge).
    opts = {**rt.jit_options(),
            "pass_options": {"vec_nbuffer_setting": {-2: 1, -1: POST_TILES_PER_TASK}}}

    nc = hc * hc + hc

    @pypto.frontend.jit(**opts)
    def hc_post_k(f: pypto.Tensor((t, 1, d), pypto.DT_BF16),
                  x: pypto.Tensor((t, hc, d), pypto.DT_BF16),
                  coef: pypto.Tensor((t, nc, COEF_ROW), pypto.DT_FP32),
                  out: pypto.Tensor((t, hc, d), pypto.DT_BF16)):
        """out[:, o] = bf16(post_o · f + Σ_i comb[i, o] · x_i), i in order.

        3-D tiles [tokens, hc, columns]: one load of all hc streams and one [tokens, hc, 1]
        load of comb[:, :, o] per output stream (the products comb[i, o]·x_i for all i in
        one broadcast mul), instead of one [tokens, 1] load per (i, o) pair: per-DMA cost,
        not bytes, dominates these tasks in the cost model. Sums stay in the reference's
        order (post·f first, then i = 0..hc-1), so the result is bit-exact. coef[t, o·hc + i]
        = comb[t, i, o], coef[t, hc·hc + o] = post[t, o], loaded once per tile (x·1.0 is
        exact) and sliced in UB."""
        pypto.set_vec_tile_shapes(tt, nc, COEF_ROW)
        cf = pypto.mul(coef, 1.0)
        pypto.set_vec_tile_shapes(tt, hc, ct)
        ff = pypto.cast(f, pypto.DT_FP32)
        xf = pypto.cast(x, pypto.DT_FP32)
        for o in range(hc):
            prod = pypto.mul(pypto.view(cf, [t, hc, 1], [0, o * hc, 0]), xf)  # comb[i,o]·x_i
            acc = pypto.mul(pypto.view(cf, [t, 1, 1], [0, hc * hc + o, 0]), ff)
            for i in range(hc):
                acc = pypto.add(acc, pypto.view(prod, [t, 1, d], [0, i, 0]))
            pypto.assemble(pypto.cast(acc, pypto.DT_BF16, pypto.CastMode.CAST_RINT),
                           [0, o, 0], out)

    return hc_post_k


def hc_post(ffn_out: torch.Tensor, x_hc: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> tuple[torch.Tensor, LatencyRecord | None]:
    """ffn_out [B,S,D] BF16, x_hc [B,S,hc,D] BF16, post [B,S,hc], comb [B,S,hc,hc] FP32 ->
    (x_next [B,S,hc,D] BF16, latency). Math of reference.hc_post.hc_post."""
    b, s, hc, d = x_hc.shape
    if tuple(ffn_out.shape) != (b, s, d):
        raise ValueError(f"ffn_out must be [{b},{s},{d}], got {tuple(ffn_out.shape)}")
    t = b * s
    out = torch.empty(t, hc, d, dtype=torch.bfloat16)
    # coefficient layout of the kernel (a host permute of T·20 floats, like hc_pre's
    # token-minor outputs): comb o-major, then post, each in its own 32-byte row
    coef = torch.zeros(t, hc * hc + hc, COEF_ROW, dtype=torch.float32)
    coef[:, :hc * hc, 0] = comb.to(torch.float32).reshape(t, hc, hc).transpose(1, 2).reshape(
        t, hc * hc)
    coef[:, hc * hc:, 0] = post.to(torch.float32).reshape(t, hc)
    lat = rt.launch(_hc_post_kernel(t, hc, d), ffn_out.reshape(t, 1, d).contiguous(),
                    x_hc.reshape(t, hc, d).contiguous(), coef, out, name="hc_post")
    return out.reshape(b, s, hc, d), lat
