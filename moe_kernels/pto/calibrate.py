"""What the simulator's 910B model sustains: HBM bandwidth and INT8 / BF16 matmul peak.

The configured figures (moe_kernels.pto.report.configured_limits, from pypto's A2A3.ini)
are per-core rates times core counts; the cost model's achievable limits are lower
(task overheads, pipe stalls). We measure them with one streaming kernel and one
compute-bound matmul per dtype, latency-only (no interpreter), and cache the result as
JSON in the cache folder keyed by pypto version and the kernel shapes.
"""
# No `from __future__ import annotations`: pypto reads kernel annotations as objects.
import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..atomic import write_atomic
from . import runtime as rt

#: Streaming kernel: [COPY_ROWS, COPY_COLS] BF16 read, scaled by 1, written back:
#: 32 MiB each way, far above the per-task overheads, far below the RAM budget.
COPY_ROWS, COPY_COLS = 4096, 4096
#: Vector tile of the copy: 64 x 512 BF16 = 64 KiB per UB buffer (in + out fit in 192 KiB).
COPY_TILE = (64, 512)
#: Weight-streaming kernel: [STREAM_M, K] x [STREAM_N, K]^T INT8 with few rows, so the
#: [STREAM_N, STREAM_K] weight (96 MiB) is read once through the cube's load path at
#: ~32 ops/byte (memory-bound). The vector copy above is limited by task dispatch in the
#: model (~0.2 us per 64 KiB tile, utilisation ~0.25), not by HBM; decode FFNs stream
#: weights exactly like this kernel, so the sustained bandwidth is the max of the two.
STREAM_M, STREAM_N, STREAM_K = 16, 12288, 8192
#: Its cube tiles (the FFN's): M 16, K 256 (L0) / 1024 (L1), N 128 -> 96 weight panels,
#: 4 full waves over the 24 cube cores (64 panels = 2.7 waves measured only 0.94 TB/s).
STREAM_TILES = (16, 256, 1024, 128)
#: Compute-bound matmul [M, K] x [N, K]^T: 2 M N K = 34 GFLOP on ~12 MiB of operands.
MM_M, MM_N, MM_K = 2048, 2048, 4096
#: Cube tiles for the peak run: big M/N tiles (128x256) to maximise reuse in L0.
MM_TILE_M, MM_TILE_K0, MM_TILE_K1, MM_TILE_N = 128, 128, 512, 256
#: INT8 peak tiles: K0 256 / K1 1024 (INT8 fractals are 32 deep, so the same L0 bytes hold
#: twice the K of BF16). Measured INT8 peaks of the 2048^2 x 4096 kernel (M, K0, K1, N):
#: (128, 128, 512, 256) 280 TOPS (the BF16 tiles, used before), (128, 256, 1024, 256) 332,
#: (256, 128, 512, 128) 261, (128, 512, 1024, 128) 235, (128, 256, 2048, 256) 57. The best
#: found is the honest limit: a lower "peak" would flatter compute-bound stages.
MM_TILES_INT8 = (128, 256, 1024, 256)
#: Vector-throughput kernel: [VEC_ROWS, VEC_COLS] FP32, VEC_OPS chained elementwise ops
#: (alternating mul / add by scalars) per element on tiles that stay in UB, so the vector
#: pipes, not HBM, bound it (~64 ops per 8 bytes moved). 1024 x 4096 x 64 = 268 M ops.
VEC_ROWS, VEC_COLS, VEC_OPS = 1024, 4096, 64
#: Its tile: 16 x 1024 FP32 = 64 KiB (measured 2.39 TFLOP/s; 32 x 1024: 2.23; 128 ops per
#: element: 2.47, so the 64-op run is within 4 % of the asymptote).
VEC_TILE = (16, 1024)
_CACHE_NAME = "calibration.json"
_VEC_CACHE_NAME = "calibration_vector.json"
_VERSION = 1


@dataclass(frozen=True)
class Calibration:
    """Sustained limits of the SIM cost model (at the LatencyRecord clock)."""

    hbm_bytes_per_s: float
    copy_bytes_per_s: float
    stream_bytes_per_s: float
    int8_ops_per_s: float
    bf16_flops_per_s: float
    copy_us: float
    stream_us: float
    int8_mm_us: float
    bf16_mm_us: float
    clock_mhz: float
    key: str

    def to_dict(self) -> dict:
        return asdict(self)


def _key() -> str:
    return json.dumps({"v": _VERSION, "pypto": rt.installed_pypto_version(),
                       "copy": [COPY_ROWS, COPY_COLS, *COPY_TILE],
                       "stream": [STREAM_M, STREAM_N, STREAM_K, *STREAM_TILES],
                       "mm": [MM_M, MM_N, MM_K, MM_TILE_M, MM_TILE_K0, MM_TILE_K1, MM_TILE_N],
                       "mm_int8": list(MM_TILES_INT8)},
                      sort_keys=True)


def _copy_kernel():
    pypto = rt.ensure_ready()
    rows, cols = COPY_ROWS, COPY_COLS
    tr, tc = COPY_TILE

    @pypto.frontend.jit(**rt.jit_options(verify=False))
    def stream_copy_k(x: pypto.Tensor((rows, cols), pypto.DT_BF16),
                      y: pypto.Tensor((rows, cols), pypto.DT_BF16)):
        """y = x · 1 (one HBM read and one HBM write per element)."""
        pypto.set_vec_tile_shapes(tr, tc)
        y[:] = pypto.mul(x, 1.0)

    return stream_copy_k


def _mm_kernel(int8: bool, m: int = MM_M, n: int = MM_N, k: int = MM_K,
               tiles: tuple[int, int, int, int] = (MM_TILE_M, MM_TILE_K0, MM_TILE_K1, MM_TILE_N)):
    pypto = rt.ensure_ready()
    tm, tk0, tk1, tn = tiles
    dt_in = pypto.DT_INT8 if int8 else pypto.DT_BF16
    dt_out = pypto.DT_INT32 if int8 else pypto.DT_FP32

    @pypto.frontend.jit(**rt.jit_options(verify=False))
    def peak_mm_k(a: pypto.Tensor((m, k), dt_in), b: pypto.Tensor((n, k), dt_in),
                  c: pypto.Tensor((m, n), dt_out)):
        """c = a b^T (compute-bound: arithmetic intensity ~ 1000 ops/byte)."""
        pypto.set_cube_tile_shapes([tm, tm], [tk0, tk1], [tn, tn])
        c[:] = pypto.matmul(a, b, dt_out, b_trans=True)

    return peak_mm_k


def measure() -> Calibration:
    """Run the three kernels in SIM (a few seconds each) and derive the limits."""
    import torch
    if rt.run_mode_name() != "SIM":
        raise RuntimeError("calibration measures the SIM cost model; run it without an NPU")
    x = torch.zeros(COPY_ROWS, COPY_COLS, dtype=torch.bfloat16)
    copy = rt.launch(_copy_kernel(), x, torch.empty_like(x), name="calib_copy")
    del x
    stream = rt.launch(_mm_kernel(True, STREAM_M, STREAM_N, STREAM_K, STREAM_TILES),
                       torch.zeros(STREAM_M, STREAM_K, dtype=torch.int8),
                       torch.zeros(STREAM_N, STREAM_K, dtype=torch.int8),
                       torch.empty(STREAM_M, STREAM_N, dtype=torch.int32), name="calib_stream")
    a8 = torch.zeros(MM_M, MM_K, dtype=torch.int8)
    b8 = torch.zeros(MM_N, MM_K, dtype=torch.int8)
    mm8 = rt.launch(_mm_kernel(True, tiles=MM_TILES_INT8), a8, b8,
                    torch.empty(MM_M, MM_N, dtype=torch.int32),
                    name="calib_int8_mm")
    a16 = torch.zeros(MM_M, MM_K, dtype=torch.bfloat16)
    b16 = torch.zeros(MM_N, MM_K, dtype=torch.bfloat16)
    mm16 = rt.launch(_mm_kernel(False), a16, b16, torch.empty(MM_M, MM_N), name="calib_bf16_mm")
    flops = 2.0 * MM_M * MM_N * MM_K
    copy_bw = 2.0 * COPY_ROWS * COPY_COLS * 2 / (copy.aicore_us * 1e-6)
    stream_bytes = STREAM_N * STREAM_K + STREAM_M * STREAM_K + STREAM_M * STREAM_N * 4
    stream_bw = stream_bytes / (stream.aicore_us * 1e-6)
    return Calibration(
        hbm_bytes_per_s=max(copy_bw, stream_bw), copy_bytes_per_s=copy_bw,
        stream_bytes_per_s=stream_bw, stream_us=stream.aicore_us,
        int8_ops_per_s=flops / (mm8.aicore_us * 1e-6),
        bf16_flops_per_s=flops / (mm16.aicore_us * 1e-6),
        copy_us=copy.aicore_us, int8_mm_us=mm8.aicore_us, bf16_mm_us=mm16.aicore_us,
        clock_mhz=copy.clock_mhz, key=_key())


def _load_or_measure(path: str, key: str, cls: type, measure: Callable[[], Any]) -> Any:
    """`cls(**json)` from `path` if its key matches, else `measure()` written there
    atomically; under the cache folder's lock, so concurrent processes measure once."""
    with rt._file_lock(rt.cache_dir() / "calibration.lock"):
        if os.path.exists(path):
            try:
                with open(path) as fh:
                    d = json.load(fh)
                if d.get("key") == key:
                    return cls(**d)
            except (OSError, ValueError, TypeError):
                pass
        cal = measure()
        write_atomic(path, json.dumps(cal.to_dict(), indent=2))
        return cal


@functools.lru_cache(maxsize=4)
def _cached(path: str, key: str) -> Calibration:
    return _load_or_measure(path, key, Calibration, measure)


@dataclass(frozen=True)
class VectorCalibration:
    """Sustained FP32 elementwise vector throughput of the SIM cost model (48 AIV)."""

    vec_ops_per_s: float
    vec_us: float
    clock_mhz: float
    key: str

    def to_dict(self) -> dict:
        return asdict(self)


def _vec_key() -> str:
    return json.dumps({"v": 1, "pypto": rt.installed_pypto_version(),
                       "vec": [VEC_ROWS, VEC_COLS, VEC_OPS, *VEC_TILE]}, sort_keys=True)


def _vec_kernel():
    pypto = rt.ensure_ready()
    rows, cols, n_ops = VEC_ROWS, VEC_COLS, VEC_OPS
    tr, tc = VEC_TILE

    @pypto.frontend.jit(**rt.jit_options(verify=False))
    def vector_peak_k(x: pypto.Tensor((rows, cols), pypto.DT_FP32),
                      y: pypto.Tensor((rows, cols), pypto.DT_FP32)):
        """y = n_ops/2 times (y·0.999 + 0.001): n_ops vector ops per element read once."""
        pypto.set_vec_tile_shapes(tr, tc)
        a = x
        for _ in range(n_ops // 2):
            a = pypto.add(pypto.mul(a, 0.999), 0.001)
        y[:] = a

    return vector_peak_k


def measure_vector() -> VectorCalibration:
    """Run the vector-throughput kernel in SIM (latency only) and derive ops/s."""
    import torch
    if rt.run_mode_name() != "SIM":
        raise RuntimeError("calibration measures the SIM cost model; run it without an NPU")
    rec = rt.launch(_vec_kernel(), torch.zeros(VEC_ROWS, VEC_COLS),
                    torch.empty(VEC_ROWS, VEC_COLS), name="calib_vector")
    ops = float(VEC_ROWS * VEC_COLS * VEC_OPS)
    return VectorCalibration(vec_ops_per_s=ops / (rec.aicore_us * 1e-6), vec_us=rec.aicore_us,
                             clock_mhz=rec.clock_mhz, key=_vec_key())


@functools.lru_cache(maxsize=4)
def _cached_vector(path: str, key: str) -> VectorCalibration:
    return _load_or_measure(path, key, VectorCalibration, measure_vector)


def vector_calibration() -> VectorCalibration:
    """The cached vector calibration (separate file, so the HBM / matmul one is kept)."""
    return _cached_vector(str(rt.cache_dir() / _VEC_CACHE_NAME), _vec_key())


def calibration() -> Calibration:
    """The cached calibration (measured once per cache folder and pypto version)."""
    return _cached(str(rt.cache_dir() / _CACHE_NAME), _key())


# --------------------------------------------------------------------------- fixed costs
#: Fixed-cost microkernels: every tile is one [FIX_ROWS, FIX_COLS] FP32 tile (256 B), so
#: bytes and vector work are negligible and only the per-task / per-DMA / per-op costs of
#: the model remain. Each cost is the slope between two sizes of the same kernel:
#: FIX_TASKS independent tasks (one wave on 48 vector cores: dispatch cost per task),
#: FIX_DMAS tiny loads in one task (MTE_IN cost per DMA), FIX_OPS dependent tiny ops in one
#: task (latency per op), FIX_LINKS tasks each waiting on the previous one (dependency
#: resolution + dispatch per link), FIX_FANOUT consumer tasks of one producer (resolution
#: per successor), and the same FIX_DMAS sizes as stores of one tile (MTE_OUT cost per
#: store). Measured: 0.16 / 0.78 / 0.022 / 2.4 / 0.21 / 0.17 us.
FIX_ROWS, FIX_COLS = 8, 8
FIX_TASKS, FIX_DMAS, FIX_OPS, FIX_LINKS, FIX_FANOUT = (1, 48), (2, 10), (2, 40), (1, 8), (1, 32)
#: Load bytes: the FIX_DMAS kernel on [FIX_ROWS, FIX_BIG_COLS] FP32 tiles (64 KiB, a typical
#: stage tile); the slope minus dma_us, per KiB (the adds overlap the next load).
FIX_BIG_COLS = 2048
_FIX_CACHE_NAME = "calibration_fixed.json"


@dataclass(frozen=True)
class FixedCosts:
    """Fixed costs of the SIM cost model, each from a microkernel of tiny tiles (us).

    task_us: the cheapest task beyond its loads (one tiny op and its store);
    dispatch_us: per extra independent task in a wave (AICPU dispatch);
    link_us: per dependent task link (end of a task -> start of its successor);
    fanout_us: per extra successor of one task (resolved one after another);
    dma_us: per extra tiny load in a task (MTE_IN is one serial pipe per core);
    op_us: per extra dependent tiny vector op in a task;
    load_us_per_kib: per KiB of a load beyond dma_us (one core's MTE_IN rate);
    store_us, store_us_per_kib: the same for stores (MTE_OUT, a pipe of its own).
    """

    task_us: float
    dispatch_us: float
    link_us: float
    fanout_us: float
    dma_us: float
    op_us: float
    load_us_per_kib: float
    store_us: float
    store_us_per_kib: float
    key: str

    def to_dict(self) -> dict:
        return asdict(self)


def _fix_key() -> str:
    return json.dumps({"v": 2, "pypto": rt.installed_pypto_version(),
                       "tile": [FIX_ROWS, FIX_COLS], "tasks": FIX_TASKS, "dmas": FIX_DMAS,
                       "ops": FIX_OPS, "links": FIX_LINKS, "fanout": FIX_FANOUT,
                       "big_cols": FIX_BIG_COLS},
                      sort_keys=True)


def _fixed_kernel(kind: str, n: int, c: int = FIX_COLS):
    """One fixed-cost microkernel of size n (see FIX_*) on [FIX_ROWS, c] tiles, latency
    only; returns (kernel, args)."""
    import torch
    pypto = rt.ensure_ready()
    r = FIX_ROWS
    opts = rt.jit_options(verify=False)
    f32 = pypto.DT_FP32
    if kind == "tasks":
        @pypto.frontend.jit(**opts)
        def fix_tasks_k(x: pypto.Tensor((n * r, c), f32), y: pypto.Tensor((n * r, c), f32)):
            pypto.set_vec_tile_shapes(r, c)
            y[:] = pypto.mul(x, 1.0)
        return fix_tasks_k, (torch.zeros(n * r, c), torch.empty(n * r, c))
    if kind == "dmas":
        @pypto.frontend.jit(**opts)
        def fix_dmas_k(x: pypto.Tensor((r, n * c), f32), y: pypto.Tensor((r, c), f32)):
            pypto.set_vec_tile_shapes(r, c)
            acc = pypto.view(x, [r, c], [0, 0])
            for j in range(1, n):
                acc = pypto.add(acc, pypto.view(x, [r, c], [0, j * c]))
            y[:] = acc
        return fix_dmas_k, (torch.zeros(r, n * c), torch.empty(r, c))
    if kind == "stores":
        @pypto.frontend.jit(**opts)
        def fix_stores_k(x: pypto.Tensor((r, c), f32), y: pypto.Tensor((r, n * c), f32)):
            pypto.set_vec_tile_shapes(r, c)
            a = pypto.mul(x, 0.999)
            for j in range(n):                                # n stores of one tile
                pypto.assemble(a, [0, j * c], y)
        return fix_stores_k, (torch.zeros(r, c), torch.empty(r, n * c))
    if kind == "ops":
        @pypto.frontend.jit(**opts)
        def fix_ops_k(x: pypto.Tensor((r, c), f32), y: pypto.Tensor((r, c), f32)):
            pypto.set_vec_tile_shapes(r, c)
            a = x
            for _ in range(n // 2):
                a = pypto.add(pypto.mul(a, 0.999), 0.001)
            y[:] = a
        return fix_ops_k, (torch.zeros(r, c), torch.empty(r, c))
    if kind == "links":
        @pypto.frontend.jit(**opts)
        def fix_links_k(x: pypto.Tensor((r, c), f32), y: pypto.Tensor((r, c), f32)):
            pypto.set_vec_tile_shapes(r, c)
            a = x
            for j in range(n):
                pypto.set_pass_options(sg_set_scope=j + 1)   # each op its own task
                a = pypto.mul(a, 0.999)
            pypto.set_pass_options(sg_set_scope=-1)
            y[:] = a
        return fix_links_k, (torch.zeros(r, c), torch.empty(r, c))
    if kind == "fanout":
        @pypto.frontend.jit(**opts)
        def fix_fanout_k(x: pypto.Tensor((r, c), f32), z: pypto.Tensor((r, n * c), f32),
                         y: pypto.Tensor((r, n * c), f32)):
            pypto.set_vec_tile_shapes(r, c)
            pypto.set_pass_options(sg_set_scope=1)           # the producer task
            a = pypto.mul(x, 0.999)
            pypto.set_pass_options(sg_set_scope=-1)
            for j in range(n):                                # n consumer tasks
                pypto.assemble(pypto.add(pypto.view(z, [r, c], [0, j * c]), a), [0, j * c], y)
        return fix_fanout_k, (torch.zeros(r, c), torch.zeros(r, n * c), torch.empty(r, n * c))
    raise ValueError(f"kind must be tasks/dmas/ops/links/fanout, got {kind!r}")


def fixed_span_us(kind: str, n: int, cols: int = FIX_COLS) -> float:
    """SIM span (us) of the fixed-cost microkernel `kind` at size n."""
    if rt.run_mode_name() != "SIM":
        raise RuntimeError("calibration measures the SIM cost model; run it without an NPU")
    k, args = _fixed_kernel(kind, n, cols)
    return rt.launch(k, *args, name=f"calib_{kind}{n}").aicore_us


def measure_fixed() -> FixedCosts:
    """Run the fixed-cost microkernels (two sizes each) and take the slopes."""
    def slope(kind: str, sizes: tuple[int, int], cols: int = FIX_COLS) -> tuple[float, float]:
        a, b = (fixed_span_us(kind, n, cols) for n in sizes)
        return a, (b - a) / (sizes[1] - sizes[0])

    one_task, dispatch = slope("tasks", FIX_TASKS)
    _, dma = slope("dmas", FIX_DMAS)
    _, op = slope("ops", FIX_OPS)
    _, link_total = slope("links", FIX_LINKS)
    _, fanout = slope("fanout", FIX_FANOUT)
    _, big_load = slope("dmas", FIX_DMAS, FIX_BIG_COLS)
    kib = FIX_ROWS * (FIX_BIG_COLS - FIX_COLS) * 4 / 1024
    _, store = slope("stores", FIX_DMAS)
    _, big_store = slope("stores", FIX_DMAS, FIX_BIG_COLS)
    # a link's slope holds one more (tiny) task; the task beyond its load is the one-task
    # kernel (1 load, 1 op, 1 store) minus one DMA
    return FixedCosts(task_us=one_task - dma, dispatch_us=dispatch,
                      link_us=link_total - one_task, fanout_us=fanout, dma_us=dma, op_us=op,
                      load_us_per_kib=(big_load - dma) / kib, store_us=store,
                      store_us_per_kib=(big_store - store) / kib, key=_fix_key())


@functools.lru_cache(maxsize=4)
def _cached_fixed(path: str, key: str) -> FixedCosts:
    return _load_or_measure(path, key, FixedCosts, measure_fixed)


def fixed_costs() -> FixedCosts:
    """The cached fixed-cost calibration (its own file: the other calibrations are kept)."""
    return _cached_fixed(str(rt.cache_dir() / _FIX_CACHE_NAME), _fix_key())
