"""The per-rank local parts of dispatch and combine (spec §2.5, §2.8, §3.6) as pypto kernels:
pack_routes (gather the four channels of a list of routes), scatter_routes (write expert
rows back to their route rows) and reduce_routes (sh + Σ_k routed rows, FP32 -> BF16).

The cross-rank exchange itself stays in the transport; only the local data movement and
the reduction run here. Index arithmetic on route ids (token = route // K) and the
"every route exactly once" check are host work on [N] integers.
"""
# No `from __future__ import annotations`: pypto reads kernel annotations as objects.
import functools

import torch

from ..types import PackedRoutes
from . import runtime as rt
from .runtime import LatencyRecord
from .tiling import divisor_tile

# Tuning constants; what was measured for each is in docs/kernel-tuning.md.
#: Rows per vector tile for row gathers/scatters: 16 x 4096 INT8 = 64 KiB.
ROW_TILE = 16
#: Columns per BF16/FP32 tile: input, accumulator and output tiles fit 192 KiB of UB.
COL_TILE = 1024
#: Row tiles merged per vector task: these short copies are dominated by per-task cost.
#: pack_routes: one x tile per task (16 tasks; a task is one 64 KiB store, MTE_OUT is
#: serial per core, so merged tiles only queue their stores): 3.57 -> 3.04 us.
PACK_TILES_PER_TASK, SCATTER_TILES_PER_TASK = 1, 3
#: Rows per tile of pack_routes' scale / weight gathers: all routes in one tile each
#: ([N, 1] FP32 is tiny), 2 tasks instead of 2·N/16: 3.67 -> 3.57 us at demo R=2.
PACK_SIDE_ROW_TILE = 256


def _merge_opts(tiles_per_task: int) -> dict:
    """jit options with `tiles_per_task` isomorphic vector tiles merged into one task."""
    return {**rt.jit_options(),
            "pass_options": {"vec_nbuffer_setting": {-2: 1, -1: tiles_per_task}}}


@functools.lru_cache(maxsize=32)
def _pack_kernel(t: int, d: int, k: int, n: int):
    pypto = rt.ensure_ready()
    rt_ = divisor_tile("routes", n, ROW_TILE)
    st_ = divisor_tile("routes", n, PACK_SIDE_ROW_TILE)

    @pypto.frontend.jit(**_merge_opts(PACK_TILES_PER_TASK))
    def pack_routes_k(x: pypto.Tensor((t, d), pypto.DT_INT8),
                      xs: pypto.Tensor((t, 1), pypto.DT_FP32),
                      w: pypto.Tensor((t * k, 1), pypto.DT_FP32),
                      tok: pypto.Tensor((n,), pypto.DT_INT32),
                      route: pypto.Tensor((n,), pypto.DT_INT32),
                      out_x: pypto.Tensor((n, d), pypto.DT_INT8),
                      out_s: pypto.Tensor((n, 1), pypto.DT_FP32),
                      out_w: pypto.Tensor((n, 1), pypto.DT_FP32)):
        """out_x[i] = x[tok_i]; out_s[i] = xs[tok_i]; out_w[i] = w[route_i]."""
        pypto.set_vec_tile_shapes(rt_, d)
        out_x[:] = pypto.index_select(x, 0, tok)
        pypto.set_vec_tile_shapes(st_, 1)
        out_s[:] = pypto.index_select(xs, 0, tok)
        out_w[:] = pypto.index_select(w, 0, route)

    return pack_routes_k


def pack_routes(x_norm_i8: torch.Tensor, x_norm_scale: torch.Tensor, weights: torch.Tensor,
                route_ids: torch.Tensor) -> tuple[PackedRoutes, LatencyRecord | None]:
    """x_norm_i8 [T,D] INT8, x_norm_scale [T,1] FP32, weights [T,K] FP32, route_ids [N] ->
    (PackedRoutes x [N,D] INT8, scale [N], weight [N] FP32, route [N] INT32; latency)."""
    t, d = x_norm_i8.shape
    k = weights.shape[1]
    r = route_ids.reshape(-1).to(torch.int64)
    n = r.numel()
    if n and (int(r.min()) < 0 or int(r.max()) >= t * k):
        raise ValueError(f"route_ids must lie in [0, T*K={t * k}), got range "
                         f"[{int(r.min())}, {int(r.max())}]")
    if n == 0:  # nothing to send: no kernel launch
        return PackedRoutes(torch.empty(0, d, dtype=torch.int8), torch.empty(0),
                            torch.empty(0), torch.empty(0, dtype=torch.int32)), None
    out = (torch.empty(n, d, dtype=torch.int8), torch.empty(n, 1), torch.empty(n, 1))
    lat = rt.launch(_pack_kernel(t, d, k, n), x_norm_i8.contiguous(),
                    x_norm_scale.to(torch.float32).reshape(t, 1).contiguous(),
                    weights.to(torch.float32).reshape(t * k, 1).contiguous(),
                    (r // k).to(torch.int32), r.to(torch.int32), *out, name="pack_routes")
    return PackedRoutes(out[0], out[1].reshape(n), out[2].reshape(n), r.to(torch.int32)), lat


@functools.lru_cache(maxsize=32)
def _scatter_kernel(n: int, d: int):
    pypto = rt.ensure_ready()
    rt_ = divisor_tile("routes", n, ROW_TILE)
    ct = divisor_tile("hidden", d, COL_TILE)

    @pypto.frontend.jit(**_merge_opts(SCATTER_TILES_PER_TASK))
    def scatter_routes_k(rows: pypto.Tensor((n, d), pypto.DT_BF16),
                         src_of: pypto.Tensor((n,), pypto.DT_INT32),
                         out: pypto.Tensor((n, d), pypto.DT_BF16)):
        """out[r] = rows[src_of[r]], i.e. out[route_i] = rows[i] (route ids are a permutation)."""
        pypto.set_vec_tile_shapes(rt_, ct)
        out[:] = pypto.index_select(rows, 0, src_of)

    return scatter_routes_k


def scatter_routes(rows: torch.Tensor, route_ids: torch.Tensor, n_routes: int
                   ) -> tuple[torch.Tensor, LatencyRecord | None]:
    """routed_y_buf [n_routes, D]: row route_ids[i] <- rows[i]; each route exactly once.

    Every route appears exactly once (checked), so the scatter is a row permutation and is
    run as a gather through the inverse permutation: pypto 0.2.0's 2-D scatter_update
    requires one tile to span all source rows, which does not fit UB at decode sizes.
    """
    r = route_ids.reshape(-1).to(torch.int64)
    if r.numel() != n_routes or not torch.equal(torch.sort(r).values, torch.arange(n_routes)):
        raise RuntimeError(f"scatter_routes needs every route in [0, {n_routes}) exactly "
                           f"once, got {r.numel()} rows")
    d = rows.shape[-1]
    out = torch.zeros(n_routes, d, dtype=rows.dtype)
    if n_routes == 0:
        return out, None
    if rows.dtype != torch.bfloat16:
        raise ValueError(f"rows must be bfloat16 (expert outputs), got {rows.dtype}")
    src_of = torch.empty(n_routes, dtype=torch.int32)
    src_of[r] = torch.arange(n_routes, dtype=torch.int32)
    lat = rt.launch(_scatter_kernel(n_routes, d), rows.contiguous(), src_of, out,
                    name="scatter_routes")
    return out, lat


@functools.lru_cache(maxsize=16)
def _reduce_kernel(t: int, d: int, k: int):
    pypto = rt.ensure_ready()
    rt_ = divisor_tile("tokens", t, ROW_TILE)
    ct = divisor_tile("hidden", d, COL_TILE)

    @pypto.frontend.jit(**rt.jit_options())
    def reduce_routes_k(sh: pypto.Tensor((t, d), pypto.DT_BF16),
                        buf: pypto.Tensor((t, k * d), pypto.DT_BF16),
                        out: pypto.Tensor((t, d), pypto.DT_BF16)):
        """out = bf16(FP32(sh) + Σ_{j<K} FP32(buf[:, j]))."""
        pypto.set_vec_tile_shapes(rt_, ct)
        acc = pypto.cast(sh, pypto.DT_FP32)
        for j in range(k):
            acc = pypto.add(acc, pypto.cast(pypto.view(buf, [t, d], [0, j * d]), pypto.DT_FP32))
        out[:] = pypto.cast(acc, pypto.DT_BF16, pypto.CastMode.CAST_RINT)

    return reduce_routes_k


def reduce_routes(sh: torch.Tensor, routed_y_buf: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, LatencyRecord | None]:
    """sh [T,D] BF16, routed_y_buf [T·K, D] BF16 -> (ffn_out [T,D] BF16, latency)."""
    t, d = sh.shape
    if tuple(routed_y_buf.shape) != (t * k, d):
        raise ValueError(f"routed_y_buf must be [{t * k}, {d}], got {tuple(routed_y_buf.shape)}")
    out = torch.empty(t, d, dtype=torch.bfloat16)
    lat = rt.launch(_reduce_kernel(t, d, k), sh.to(torch.bfloat16).contiguous(),
                    routed_y_buf.to(torch.bfloat16).reshape(t, k * d).contiguous(), out,
                    name="reduce_routes")
    return out, lat
