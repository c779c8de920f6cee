"""hc_pre (spec §2.2) and hc_post (spec §2.9) as pypto kernels.

Each public function returns (outputs, LatencyRecord | None) and has the dtypes of the
torch reference in moe_kernels/reference/hc_pre.py and hc_post.py.
"""
# No `from __future__ import annotations` here: pypto reads the kernels' tensor
# annotations as objects, not strings.

import functools
import itertools

import torch

from ..config import ModelConfig
from . import runtime as rt
from .runtime import LatencyRecord
from .tiling import divisor_tile

# Tuning constants; what was measured for each is in docs/kernel-tuning.md.
#: hc_pre RMS tiles: 4 tokens x one 4096-column chunk, so each row sum stays in one tile.
TOKEN_TILE = 4
RMS_COL_TILE = 4096
#: hc_pre token groups: per group of TOKEN_GROUP tokens one Sinkhorn task and the x_mixed
#: tasks, each computing the group's logits from the mix matmul's K-chunk partials (no
#: split-K reduce phase, no logits phase between the cube and x_mixed): 45.9 -> 31.8 us
#: at demo R=2 with the changes below.
TOKEN_GROUP = 32
#: x_mixed column chunks of COL_TILE (the last one shorter): 32 x 384 -> 44 tasks plus the
#: 4 Sinkhorn tasks fill the 48 vector cores once; 32 x 416 spills the four broadcast
#: `pre` columns' FP32 tiles to GM (~5 us per task).
COL_TILE = 384
#: Merge scopes: SCOPE_BASE + g·(chunks + 1) is group g's Sinkhorn, + 1 + j its j-th
#: x_mixed chunk, each its own task.
SCOPE_BASE = 10
#: hc_pre `pre` broadcast per stream as its own 32-byte FP32 row block, so each stream's
#: [tokens, 1] column is an aligned UB view.
PRE_PAD = 8
#: hc_pre logit scale and base per row in one padded tile: scale at column 0, base at
#: column SB_BASE_COL (a 32-byte row each), one load per task instead of two.
SB_COLS, SB_BASE_COL = 16, 8
#: hc_post tile [tokens, hc, columns] = 1 x hc x 4096: the largest that fits the unified
#: buffer beside the FP32 copy of the hc streams.
POST_TOKEN_TILE, POST_COL_TILE = 1, 4096
#: hc_post tasks: the tokens split evenly over one task per vector core (one wave), larger
#: tasks first, as the model dispatches them in that order (the last ones start ~7-9 us
#: later): demo 32 x 3 + 16 x 2 tokens, 20.2 -> 18.2 us (43 x 3 before); flash 32 x 1, 9.8.
POST_TASKS = 48
#: hc_post tokens per task at most (the task's [tokens, hc·hc + hc, COEF_ROW] coefficient
#: tile, 10 KiB, stays small in UB); more tokens take more waves of POST_TASKS tasks.
POST_MAX_TOKENS = 16
#: hc_post merge scope of task g: POST_SCOPE_BASE + g (pypto's merge of isomorphic tiles,
#: `vec_nbuffer_setting`, packs a fixed count per task and puts the remainder first).
POST_SCOPE_BASE = 10
#: hc_post coefficients (comb[i, o] o-major, then post[o]) each padded to one 32-byte FP32
#: row, so one DMA per task brings them all and each [tokens, hc, 1] slice is an aligned UB
#: view; a strided view of a GM input is one DMA each (~0.8 us): 31.9 -> 20.2 us at demo.
COEF_ROW = 8
#: Mix matmul [2·mix, hc·D] x [T, hc·D]^T (hc_fn as BF16 hi + lo): one M tile, one matmul
#: per K chunk of MIX_CUBE_K1, its FP32 partial written to a GM workspace.
MIX_CUBE_M, MIX_CUBE_K, MIX_CUBE_N, MIX_CUBE_K1 = 48, 256, 16, 4096


def _logit_rows(pypto, parts, r_row, sb, row0: int, sizes: tuple, mix: int, kc: int, t: int):
    """Traced in hc_pre: logits of the row blocks of `sizes` from mix row row0 on, each
    r·(hi·x + lo·x)·s + b as its own [n, T] tile. parts [kc·2·mix, T] holds the matmul's
    kc K-chunk partials (hi rows, then lo rows); they come in one load and are added in
    K order (the order of pypto's split-K reduction: same bits), then hi + lo. The scale
    and base (sb[:, 0], sb[:, SB_BASE_COL]) come in another load (x·1.0 is exact) and are
    sliced in UB: a view of a GM tensor is one load (~0.8 us) each."""
    n_all = sum(sizes)
    pypto.set_vec_tile_shapes(mix, SB_COLS)
    sb_u = pypto.mul(sb, 1.0)
    pypto.set_vec_tile_shapes(kc * 2, n_all, t)
    p = pypto.mul(pypto.view(pypto.reshape(parts, [kc * 2, mix, t], inplace=True),
                             [kc * 2, n_all, t], [0, row0, 0]), 1.0)
    pypto.set_vec_tile_shapes(kc, 2, n_all, t)
    hl = pypto.sum(pypto.reshape(p, [kc, 2, n_all, t], inplace=True), 0)   # Σ_k partial_k
    pypto.set_vec_tile_shapes(2, n_all, t)
    mm = pypto.sum(hl, 0)                                         # hi·x + lo·x
    out, off = [], 0
    for n in sizes:
        pypto.set_vec_tile_shapes(n, t)
        out.append(pypto.add(
            pypto.mul(pypto.mul(r_row, pypto.view(mm, [n, t], [off, 0])),
                      pypto.view(sb_u, [n, 1], [row0 + off, 0])),
            pypto.view(sb_u, [n, 1], [row0 + off, SB_BASE_COL])))
        off += n
    return out


def _sinkhorn_norm(pypto, c, axis: int, hc: int, t: int, eps: float):
    """Traced in hc_pre: c / (sum(c, axis) + eps) on C[i, j, t]. The sum adds the hc
    [hc, t] blocks of a 2-D view of C in order (the bits of pypto's sum): row blocks of
    [hc·hc, t] for the column sum (axis 0), column blocks of [hc, hc·t] for the row sum
    (axis 1); the model prices a 3-D sum of [4, 4, 32] at 154-200 cycles, an add of [4, 32]
    at 43. +eps and the division run on 2-D views too (free reshapes): a [4, 4, 128]
    division costs 262 cycles, the same floats as [16, 128] 114."""
    shp = [hc, 1, t] if axis == 1 else [1, hc, t]
    c2 = pypto.reshape(c, [hc * hc, t] if axis == 0 else [hc, hc * t], inplace=True)
    pypto.set_vec_tile_shapes(hc, t)
    s = pypto.view(c2, [hc, t], [0, 0])
    for i in range(1, hc):
        s = pypto.add(s, pypto.view(c2, [hc, t], [hc * i, 0] if axis == 0 else [0, t * i]))
    s2 = pypto.add(s, eps)
    pypto.set_vec_tile_shapes(hc, hc, t)
    den = pypto.expand_clone(pypto.reshape(s2, shp, inplace=True), [hc, hc, t])
    pypto.set_vec_tile_shapes(hc * hc, t)
    q = pypto.div(pypto.reshape(c, [hc * hc, t], inplace=True),
                  pypto.reshape(den, [hc * hc, t], inplace=True))
    pypto.set_vec_tile_shapes(hc, hc, t)
    return pypto.reshape(q, [hc, hc, t], inplace=True)


def _mix_k_chunks(hd: int) -> int:
    """Number of K chunks of the mix matmul (one partial each in the `parts` workspace)."""
    return hd // divisor_tile("hc*hidden", hd, MIX_CUBE_K1)


def _mix_row_order(hc: int) -> list[int]:
    """The kernel's order of the mix rows: pre, comb, post (spec order pre, post, comb), so
    the Sinkhorn task's comb and post logits are one block from one load."""
    mix = (2 + hc) * hc
    return [*range(hc), *range(2 * hc, mix), *range(hc, 2 * hc)]


@functools.lru_cache(maxsize=16)
def _hc_pre_kernel(t: int, hc: int, d: int, iters: int, rms_eps: float, hc_eps: float):
    pypto = rt.ensure_ready()
    mix = (2 + hc) * hc
    hd = hc * d
    tt = divisor_tile("tokens", t, TOKEN_TILE)
    tg = divisor_tile("tokens", t, TOKEN_GROUP)
    rc = divisor_tile("hc*hidden", hd, RMS_COL_TILE)
    kt = divisor_tile("hc*hidden", hd, MIX_CUBE_K)
    kc = _mix_k_chunks(hd)
    kt1 = hd // kc
    nt = min(MIX_CUBE_N, -(-t // 16) * 16)  # cube N tiles must be 16-aligned
    mm_m = min(MIX_CUBE_M, 2 * mix)
    n_chunks = -(-d // COL_TILE)  # x_mixed column chunks, the last one shorter
    logit_rows, norm = _logit_rows, _sinkhorn_norm

    @pypto.frontend.jit(**rt.jit_options())
    def hc_pre_k(x: pypto.Tensor((t, hd), pypto.DT_BF16),
                 fn_hl: pypto.Tensor((2 * mix, hd), pypto.DT_BF16),
                 sb: pypto.Tensor((mix, SB_COLS), pypto.DT_FP32),
                 x_mixed: pypto.Tensor((t, d), pypto.DT_BF16),
                 post_t: pypto.Tensor((hc, t), pypto.DT_FP32),
                 comb_t: pypto.Tensor((hc, hc, t), pypto.DT_FP32),
                 parts: pypto.Tensor((kc * 2 * mix, t), pypto.DT_FP32)):
        """r = rsqrt(mean(X²)+eps); logits = r·(X fn^T)·s + b; pre/post = σ; comb = sinkhorn;
        x_mixed = bf16(Σ_h pre_h · x_h). Logits are kept token-minor ([mix, T]) so every
        reduction runs over a 32-byte aligned last axis (pypto needs that; hc = 4 FP32 is 16 B).
        Mix rows in _mix_row_order; `parts` is a workspace for the matmul's K-chunk partials."""
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
        # The mix matmul as one matmul per K chunk, each partial written to `parts`; the
        # logits' consumers add them (pypto's split-K reduction was a phase of its own,
        # ~3.4 us plus a ~2.4 us link on the critical path).
        for k in range(kc):
            part = pypto.matmul(pypto.view(fn_hl, [2 * mix, kt1], [0, k * kt1]),
                                pypto.view(x, [t, kt1], [0, k * kt1]), pypto.DT_FP32,
                                b_trans=True)
            if kc == 1:  # an assemble covering the whole tensor fails to compile (0.2.0)
                parts[:] = part
            else:
                pypto.assemble(part, [k * 2 * mix, 0], parts)
        # Reshapes are inplace (views of the same storage): a copying reshape ran as 128
        # tiny serial tasks in the model (kernel 94.0 -> 78.3 us).
        r_row = pypto.reshape(r, [1, t], inplace=True)
        for g0 in range(0, t, tg):
            scope = SCOPE_BASE + g0 // tg * (n_chunks + 1)
            parts_g = pypto.view(parts, [kc * 2 * mix, tg], [0, g0])
            r_g = pypto.view(r_row, [1, tg], [0, g0])
            # Sinkhorn on C[i, j, t] (with post, from the same loads): row softmax over
            # j + eps, column norm over i, then (iters - 1) x (row, column) normalisations,
            # each / (sum + eps).
            pypto.set_pass_options(sg_set_scope=scope)
            lc, lpost = logit_rows(pypto, parts_g, r_g, sb, hc, (hc * hc, hc), mix, kc, tg)
            pypto.set_vec_tile_shapes(hc, tg)
            pypto.assemble(pypto.mul(pypto.sigmoid(lpost), 2.0), [0, g0], post_t)
            pypto.set_vec_tile_shapes(hc, hc, tg)
            c = pypto.add(pypto.softmax(pypto.reshape(lc, [hc, hc, tg], inplace=True), 1),
                          hc_eps)
            c = norm(pypto, c, 0, hc, tg, hc_eps)
            for _ in range(iters - 1):
                c = norm(pypto, c, 1, hc, tg, hc_eps)
                c = norm(pypto, c, 0, hc, tg, hc_eps)
            pypto.assemble(c, [0, 0, g0], comb_t)
            # x_mixed = Σ_h pre_h · x_h, FP32 accumulation over h in order. Each chunk
            # task computes its group's pre (the same ops as one shared logits task, so
            # the same bits), broadcast per stream to a PRE_PAD-wide row block and
            # transposed token-major: one [tokens, 1] UB column per stream. (x is read
            # as BF16 and cast here: no FP32 copy of x goes through GM.)
            # They read r as a UB slice of the whole row (one load either way): waiting on
            # all RMS tasks, they hang off another hub task than the Sinkhorn, whose hub
            # then resolves it first instead of after the group's x_mixed tasks (~2.3 us).
            for c0 in range(0, d, COL_TILE):
                cw = min(COL_TILE, d - c0)  # exact shapes, no partial tiles
                pypto.set_pass_options(sg_set_scope=scope + 1 + c0 // COL_TILE)
                pypto.set_vec_tile_shapes(1, t)
                r_x = pypto.view(pypto.mul(r_row, 1.0), [1, tg], [0, g0])
                lp, = logit_rows(pypto, parts_g, r_x, sb, 0, (hc,), mix, kc, tg)
                pre = pypto.add(pypto.sigmoid(lp), hc_eps)
                pypto.set_vec_tile_shapes(hc, PRE_PAD, tg)
                pre_b = pypto.expand_clone(pypto.reshape(pre, [hc, 1, tg], inplace=True),
                                           [hc, PRE_PAD, tg])
                pypto.set_vec_tile_shapes(hc * PRE_PAD, tg)
                pre_tm = pypto.transpose(
                    pypto.reshape(pre_b, [hc * PRE_PAD, tg], inplace=True), 0, 1)
                pypto.set_vec_tile_shapes(tg, cw)
                acc = None
                for h in range(hc):
                    prod = pypto.mul(pypto.view(pre_tm, [tg, 1], [0, PRE_PAD * h]),
                                     pypto.cast(pypto.view(x, [tg, cw], [g0, h * d + c0]),
                                                pypto.DT_FP32))
                    acc = prod if acc is None else pypto.add(acc, prod)
                pypto.assemble(pypto.cast(acc, pypto.DT_BF16, pypto.CastMode.CAST_RINT),
                               [g0, c0], x_mixed)
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
    rows = _mix_row_order(hc)
    # hc_fn (FP32) as BF16 hi + lo rows: hi = bf16(fn), lo = bf16(fn - hi); Σ (hi + lo)·x in
    # FP32 matches the FP32 product to ~2^-17 relative (same bytes as the FP32 weight).
    fn32 = hc_fn.to(torch.float32)[rows]
    hi = fn32.to(torch.bfloat16)
    fn_hl = torch.cat([hi, (fn32 - hi.to(torch.float32)).to(torch.bfloat16)]).contiguous()
    sb = torch.zeros(mix, SB_COLS, dtype=torch.float32)
    sb[:, 0] = scale_vec[rows]
    sb[:, SB_BASE_COL] = hc_base.to(torch.float32)[rows]
    parts = torch.empty(_mix_k_chunks(hc * d) * 2 * mix, t, dtype=torch.float32)
    lat = rt.launch(k, x_hc.reshape(t, hc * d).contiguous(), fn_hl, sb,
                    x_mixed, post_t, comb_t, parts, name="hc_pre")
    # Token-minor kernel layout back to the reference's [B,S,hc(,hc)] (a host permute of
    # T·20 floats).
    post = post_t.t().contiguous().reshape(b, s, hc)
    comb = comb_t.permute(2, 0, 1).contiguous().reshape(b, s, hc, hc)
    return (x_mixed.reshape(b, s, d), post, comb), lat


def _post_tasks(t: int) -> list[tuple[int, int]]:
    """hc_post's (first token, tokens) per task: t split as evenly as possible over whole
    waves of POST_TASKS tasks (at most POST_MAX_TOKENS each; at most t), larger ones first."""
    n = min(t, POST_TASKS * -(-t // (POST_TASKS * POST_MAX_TOKENS)))
    q, r = divmod(t, n)
    sizes = [q + 1] * r + [q] * (n - r)
    return list(zip(itertools.accumulate(sizes[:-1], initial=0), sizes, strict=True))


@functools.lru_cache(maxsize=16)
def _hc_post_kernel(t: int, hc: int, d: int):
    pypto = rt.ensure_ready()
    ct = divisor_tile("hidden", d, POST_COL_TILE)
    nc = hc * hc + hc
    tasks = _post_tasks(t)

    @pypto.frontend.jit(**rt.jit_options())
    def hc_post_k(f: pypto.Tensor((t, 1, d), pypto.DT_BF16),
                  x: pypto.Tensor((t, hc, d), pypto.DT_BF16),
                  coef: pypto.Tensor((t, nc, COEF_ROW), pypto.DT_FP32),
                  out: pypto.Tensor((t, hc, d), pypto.DT_BF16)):
        """out[:, o] = bf16(post_o · f + Σ_i comb[i, o] · x_i), i in order.

        3-D tiles [1, hc, columns]: one load of all hc streams and, per output stream, the
        products comb[i, o]·x_i for all i in one broadcast mul by a [1, hc, 1] UB slice of
        the coefficients: per-DMA cost, not bytes, dominates these tasks in the cost model.
        Sums stay in the reference's order (post·f first, then i = 0..hc-1), so the result
        is bit-exact. coef[t, o·hc + i] = comb[t, i, o], coef[t, hc·hc + o] = post[t, o],
        loaded once per task (x·1.0 is exact). Each task (_post_tasks) is a merge scope;
        its tokens' tiles share the coefficient tile, so they form one subgraph."""
        for g in range(len(tasks)):
            t0, n = tasks[g]
            pypto.set_pass_options(sg_set_scope=POST_SCOPE_BASE + g)
            pypto.set_vec_tile_shapes(n, nc, COEF_ROW)
            cf = pypto.mul(pypto.view(coef, [n, nc, COEF_ROW], [t0, 0, 0]), 1.0)
            pypto.set_vec_tile_shapes(POST_TOKEN_TILE, hc, ct)
            ff = pypto.cast(pypto.view(f, [n, 1, d], [t0, 0, 0]), pypto.DT_FP32)
            xf = pypto.cast(pypto.view(x, [n, hc, d], [t0, 0, 0]), pypto.DT_FP32)
            for o in range(hc):
                prod = pypto.mul(pypto.view(cf, [n, hc, 1], [0, o * hc, 0]), xf)  # comb[i,o]·x_i
                acc = pypto.mul(pypto.view(cf, [n, 1, 1], [0, hc * hc + o, 0]), ff)
                for i in range(hc):
                    acc = pypto.add(acc, pypto.view(prod, [n, 1, d], [0, i, 0]))
                pypto.assemble(pypto.cast(acc, pypto.DT_BF16, pypto.CastMode.CAST_RINT),
                               [t0, o, 0], out)
        pypto.set_pass_options(sg_set_scope=-1)

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
