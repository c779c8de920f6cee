"""gate (spec §2.3) as one pypto kernel: RMSNorm, Q8, sqrt-softplus scores, hash or
sort routing, routing weights. Same outputs and dtypes as reference.gate.gate."""
# No `from __future__ import annotations`: pypto reads kernel annotations as objects.
import functools

import torch

from ..config import ModelConfig, Routing
from ..types import GateOut
from . import runtime as rt
from .q8 import quantize_rows_q8
from .runtime import LatencyRecord
from .tiling import divisor_tile

# Tuning constants; what was measured for each is in docs/kernel-tuning.md.
#: Tokens per vector tile: 4 rows keep ~5 live FP32 tiles within the 192 KiB UB.
TOKEN_TILE = 4
#: Columns per vector tile over D: a whole demo row, so RMS and Q8 need no partial sums.
COL_TILE = 4096
#: Cube tiles of z = xg @ gate_w^T: M 32, K 512 in L0, up to 2048 per L1 fill (K1 must be
#: a multiple of K0: pypto FC4000), split-K when E is small. M 32: 8 cube and 4 score
#: tasks at demo (M 16: 16 and 8), fewer for the AICPU to dispatch and resolve.
#: K1 is also numerics: with split-K, z3 is the sum of the K1-chunk partial matmuls.
GATE_CUBE_M, GATE_CUBE_K, GATE_CUBE_K1 = 32, 512, 2048
#: Cube N tile over the 3E stacked weight rows, at most 64 (one N x K0 BF16 tile fills
#: L0B; the whole 3E in one tile overflowed L1 at flash: "Run pass failed").
GATE_CUBE_N = 64
#: Cube cores of the 910B model; with several N tiles, M grows by 16 (to M_MAX, the L1
#: limit) until the M x N tiles fit one wave, and split-K is off.
GATE_CUBE_CORES, GATE_CUBE_M_MAX = 24, 48
#: gate_w (FP32) enters the cube as 3 stacked BF16 pieces (hi, mid, lo; see split_bf16):
#: exact products, FP32-accurate sum, no FP32 copy of x_norm.
GATE_W_SPLIT = 3
#: Token rows per vector tile of the small score / routing tail: one task per cube M tile.
SCORE_TOKEN_TILE = 32


def split_bf16(w: torch.Tensor, parts: int) -> torch.Tensor:
    """FP32 w [R, C] as `parts` BF16 pieces stacked on rows ([parts·R, C]): piece k is the
    BF16 rounding of what pieces 0..k-1 left over, so Σ_k piece_k = w to ~2^-(9·parts)
    relative (3 parts: ~2^-26, below FP32's own 2^-24 rounding)."""
    rest = w.to(torch.float32)
    pieces = []
    for _ in range(parts):
        p = rest.to(torch.bfloat16)
        pieces.append(p)
        rest = rest - p.to(torch.float32)
    return torch.cat(pieces).contiguous()


@functools.lru_cache(maxsize=16)
def _gate_kernel(t: int, d: int, e: int, k: int, vocab: int, routing: str, eps: float,
                 route_scale: float):
    pypto = rt.ensure_ready()
    tt = divisor_tile("tokens", t, TOKEN_TILE)
    ct = divisor_tile("hidden", d, COL_TILE)
    kt = divisor_tile("hidden", d, GATE_CUBE_K)
    kt1 = kt * divisor_tile("hidden / K0", d // kt, max(1, GATE_CUBE_K1 // kt))
    n16 = -(-(GATE_W_SPLIT * e) // 16)          # 3E in 16-row cube blocks (rounded up)
    nt = 16 * divisor_tile("3*experts / 16", n16, GATE_CUBE_N // 16)
    split_k = n16 * 16 == nt                   # one N tile: K chunks are the parallelism
    mt = min(GATE_CUBE_M, -(-t // 16) * 16)
    while (not split_k and mt < min(t, GATE_CUBE_M_MAX)
           and -(-t // mt) * (n16 * 16 // nt) > GATE_CUBE_CORES):
        mt += 16
    q8 = quantize_rows_q8
    e3 = GATE_W_SPLIT * e
    kc = d // kt1 if split_k else 1            # K chunks (partial matmuls) of z3
    st = divisor_tile("tokens", t, SCORE_TOKEN_TILE)

    @pypto.frontend.jit(**rt.jit_options())
    def gate_k(x_mixed: pypto.Tensor((t, d), pypto.DT_BF16),
               norm_w: pypto.Tensor((1, d), pypto.DT_FP32),
               gate_w3: pypto.Tensor((GATE_W_SPLIT * e, d), pypto.DT_BF16),
               gate_bias: pypto.Tensor((1, e), pypto.DT_FP32),
               tid2eid: pypto.Tensor((vocab, k), pypto.DT_INT32),
               ids: pypto.Tensor((t,), pypto.DT_INT32),
               x_norm: pypto.Tensor((t, d), pypto.DT_BF16),
               x_i8: pypto.Tensor((t, d), pypto.DT_INT8),
               x_scale: pypto.Tensor((t, 1), pypto.DT_FP32),
               indices: pypto.Tensor((t, k), pypto.DT_INT32),
               weights: pypto.Tensor((t, k), pypto.DT_FP32)):
        """xn = bf16(x·rsqrt(mean x²+eps)·w); (q, s) = Q8(xn); score = sqrt(softplus(xn W^T));
        idx = hash | top-k(score + bias); weight = score[idx] / Σ score[idx] · scale."""
        pypto.set_vec_tile_shapes(tt, ct)
        pypto.set_cube_tile_shapes([mt, mt], [kt, kt1], [nt, nt], False)
        x = pypto.cast(x_mixed, pypto.DT_FP32)
        ms = pypto.div(pypto.sum(pypto.mul(x, x), -1, keepdim=True), float(d))
        xn = pypto.cast(pypto.mul(pypto.mul(x, pypto.rsqrt(pypto.add(ms, eps))), norm_w),
                        pypto.DT_BF16, pypto.CastMode.CAST_RINT)
        xg = pypto.cast(xn, pypto.DT_FP32)
        xq, xs = q8(pypto, xg)
        # xg = FP32(xn) is exact in BF16, so the cube reads xn (BF16) against the BF16
        # split of gate_w: every product is exact and accumulated in FP32.
        if kc > 1:
            # Split-K written out: one matmul per K chunk, partial c assembled into
            # parts[:, c·3E:], so a score task loads all partials of its rows at once (pypto's
            # own split-K: one load per partial, ~0.8 us each). z3 = p0 + p1 (+ ...) in chunk
            # order, the interpreter's split-K sum (two chunks at demo: bit-identical).
            parts = pypto.tensor([t, kc * e3], pypto.DT_FP32, "parts")
            for c in range(kc):
                pypto.assemble(pypto.matmul(pypto.view(xn, [t, kt1], [0, c * kt1]),
                                            pypto.view(gate_w3, [e3, kt1], [0, c * kt1]),
                                            pypto.DT_FP32, b_trans=True), [0, c * e3], parts)
            pypto.set_vec_tile_shapes(st, kc * e3)
            pp = pypto.mul(parts, 1.0)         # x·1.0 = x: one load, views of it are free
            pypto.set_vec_tile_shapes(st, e3)
            z3 = pypto.view(pp, [t, e3], [0, 0])
            for c in range(1, kc):
                z3 = pypto.add(z3, pypto.view(pp, [t, e3], [0, c * e3]))
        else:
            # x·1.0 = x: the score task loads its [st, 3E] rows once; the hi / mid / lo views
            # below are then free UB views, not one GM load each (flash R=8: 29.7 -> 28.1 us).
            pypto.set_vec_tile_shapes(st, e3)
            z3 = pypto.mul(pypto.matmul(xn, gate_w3, pypto.DT_FP32, b_trans=True), 1.0)
        pypto.set_vec_tile_shapes(st, e)
        z = pypto.add(pypto.view(z3, [t, e], [0, 0]),                   # hi + (mid + lo)
                      pypto.add(pypto.view(z3, [t, e], [0, e]), pypto.view(z3, [t, e], [0, 2 * e])))
        # No pypto.softplus in 0.2.0: softplus(z) = max(z, 0) + log1p(exp(-|z|)).
        sp = pypto.add(pypto.maximum(z, 0.0), pypto.log1p(pypto.exp(pypto.neg(pypto.abs(z)))))
        score = pypto.sqrt(sp)
        if routing == "hash":
            idx = pypto.index_select(tid2eid, 0, ids)                    # [T, K]
        else:
            _, idx = pypto.topk(pypto.add(score, gate_bias), k, -1, True)
        pypto.set_vec_tile_shapes(st, k)
        picked = pypto.gather(score, 1, idx)
        # Σ_j picked[:, j] in j order. Column j is gathered (index j) into its own [T, 1]
        # tile: a view at column j > 0 is not 32-byte aligned in UB, and the model copied it
        # out to GM and back (~1 us on the critical path).
        pypto.set_vec_tile_shapes(st, 1)
        total = pypto.gather(picked, 1, pypto.full([t, 1], 0, pypto.DT_INT32))
        for j in range(1, k):
            total = pypto.add(total,
                              pypto.gather(picked, 1, pypto.full([t, 1], j, pypto.DT_INT32)))
        pypto.set_vec_tile_shapes(st, k)
        weights[:] = pypto.mul(pypto.div(picked, total), route_scale)
        # Outputs last: writing an output then reusing its source crashes 0.2.0's frontend.
        indices[:] = idx
        x_i8[:] = xq
        x_scale[:] = xs
        x_norm[:] = xn

    return gate_k


def gate(x_mixed: torch.Tensor, norm_w: torch.Tensor, gate_w: torch.Tensor,
         gate_bias: torch.Tensor, tid2eid: torch.Tensor, input_ids: torch.Tensor,
         cfg: ModelConfig, routing: Routing) -> tuple[GateOut, LatencyRecord | None]:
    """x_mixed [B,S,D] BF16 -> (GateOut, latency). Math of reference.gate.gate."""
    if routing not in ("hash", "sort"):
        raise ValueError(f"routing must be 'hash' or 'sort', got {routing!r}")
    d, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    if x_mixed.shape[-1] != d or x_mixed.dtype != torch.bfloat16:
        raise ValueError(f"x_mixed must be [B,S,{d}] bfloat16, got {tuple(x_mixed.shape)} "
                         f"{x_mixed.dtype}")
    t = x_mixed.numel() // d
    ids = input_ids.reshape(-1)
    if ids.numel() != t:
        raise ValueError(f"input_ids must hold {t} tokens, got {ids.numel()}")
    vocab = tid2eid.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"input_ids must lie in [0, {vocab}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    kern = _gate_kernel(t, d, e, k, vocab, routing, cfg.rms_norm_eps,
                        float(cfg.routed_scaling_factor))
    out = GateOut(torch.empty(t, d, dtype=torch.bfloat16), torch.empty(t, d, dtype=torch.int8),
                  torch.empty(t, 1, dtype=torch.float32), torch.empty(t, k, dtype=torch.int32),
                  torch.empty(t, k, dtype=torch.float32))
    lat = rt.launch(kern, x_mixed.reshape(t, d).contiguous(),
                    norm_w.to(torch.float32).reshape(1, d).contiguous(),
                    split_bf16(gate_w, GATE_W_SPLIT),
                    gate_bias.to(torch.float32).reshape(1, e).contiguous(),
                    tid2eid.to(torch.int32).contiguous(), ids.to(torch.int32).contiguous(),
                    *out, name=f"gate_{routing}")
    return out, lat
