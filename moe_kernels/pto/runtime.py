"""The one module that touches pypto internals: setup, kernel launch and SIM latency.

Why it exists (measured in shared/notes/pypto-0.2.0-on-cpu.md):

* pypto's CPU interpreter ("calculator", pass verify) is compiled with cmake+g++ into a
  temporary folder in every process (~45 s on 2 cores). We build it once into a
  project-owned cache folder and reuse it across processes (a file lock guards the build).
* pypto 0.2.0's jit path zeroes the verifier's inputs (and the caller's tensors); we
  replace `JitCallableWrapper._setup_verify_data`, only on exactly pypto 0.2.0.
* The simulator runs plotting scripts after every call and writes 4-11 MB per call into
  ./output: we point TILEFWK_CONFIG_PATH at a quiet copy of its config
  (Model.drawPngThresholdCycle=0) and TILE_FWK_OUTPUT_DIR into the cache folder, and
  keep only the last few `output_*` folders.

Nothing happens at import: `ensure_ready()` runs on the first kernel call.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..atomic import write_atomic
from ..paths import CACHE_DIR
from .recovery import reset_after_failed_kernel
from .side_files import check_cache_folder, redirect_side_files
from .swim import CLOCK_MHZ, SwimTable, parse_swim_tasks

#: The only pypto release whose private internals this module was written against.
SUPPORTED_PYPTO_VERSION = "0.2.0"
#: Env var overriding the cache folder (calculator build, quiet config, run outputs).
CACHE_ENV = "MOE_KERNELS_PYPTO_CACHE"
#: output_* run folders kept after each call (each 1-11 MB): enough for one stage report
#: (8 kernels) so its trace paths stay valid for a notebook.
KEEP_OUTPUT_DIRS = 12
#: Simulator arg that turns the per-call plotting scripts off (0.4 s instead of 5 s a call).
QUIET_SIM_ARG = "Model.drawPngThresholdCycle=0"
#: Calculator build marker: written last, so a half-built folder is never reused.
_BUILD_MARKER = "BUILD_OK.json"
_CALC_SO = Path("install/lib/libtile_fwk_calculator.so")


class PyptoVersionError(RuntimeError):
    """The installed pypto is not the release this runtime's workarounds target."""


@dataclass(frozen=True)
class LatencyRecord:
    """SIM latency of one kernel call, from `_simulate.swim.json` (910B / A2A3 cost model).

    aicore_cycles = max(execEnd) - min(execStart) over the AIC and AIV lanes (what pypto
    prints as "AICore End-to-End Time"); aicore_us = aicore_cycles / clock_mhz.
    """

    kernel: str
    aicore_cycles: int
    aicore_us: float
    clock_mhz: float
    utilization: float          # busy cycles / (AICore lanes used · span)
    n_tasks: int                # AICore tasks
    total_cycles_incl_sched: int  # incl. AICPU scheduling before the first AICore task
    swim_path: str              # _simulate.swim.json (cycles per task per core)
    trace_path: str             # Perfetto trace if written, else the swim json
    output_dir: str
    #: The parsed swimlane of this call (pypto prunes run folders as calls arrive, so the
    #: file at swim_path may be gone later); not part of to_dict / equality.
    swim: SwimTable | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "swim"}


# --------------------------------------------------------------------------- paths
def cache_dir() -> Path:
    """$MOE_KERNELS_PYPTO_CACHE, else <project root>/.cache/pypto (read on every call)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser().resolve() if env else CACHE_DIR / "pypto"


def check_cache_dir() -> Path:
    """The cache folder, created and probed; ConfigError naming CACHE_ENV if it cannot be."""
    return check_cache_folder(cache_dir(), CACHE_ENV)


def output_root() -> Path:
    """Where pypto writes its output_<ts>_<pid>_<ip> run folders."""
    return cache_dir() / "output"


def installed_pypto_version() -> str:
    """The installed pypto distribution version (read without importing pypto)."""
    try:
        return metadata.version("pypto")
    except metadata.PackageNotFoundError as err:
        raise PyptoVersionError("pypto is not installed; the pypto backend needs "
                                f"pypto=={SUPPORTED_PYPTO_VERSION}") from err


def check_pypto_version() -> None:
    """Fail loudly unless pypto is exactly the version the workarounds were written for."""
    found = installed_pypto_version()
    if found != SUPPORTED_PYPTO_VERSION:
        raise PyptoVersionError(
            f"pypto version must be {SUPPORTED_PYPTO_VERSION} (moe_kernels.pto.runtime patches "
            f"its private verify path and calculator build), got {found!r}; re-check the "
            f"workarounds in moe_kernels/pto/runtime.py before allowing {found!r}")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock across processes (fcntl), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- setup
def _shipped_lib_dir() -> Path:
    dist = metadata.distribution("pypto")
    return Path(str(dist.locate_file("pypto"))).resolve() / "lib"


def write_quiet_config(cache: Path) -> Path:
    """Our copy of pypto's tile_fwk_config.json with plotting off; returns its path."""
    src = _shipped_lib_dir() / "configs" / "tile_fwk_config.json"
    cfg = json.loads(src.read_text())
    args = cfg["global"]["simulation"].setdefault("args", [])
    if QUIET_SIM_ARG not in args:
        args.append(QUIET_SIM_ARG)
    dst = cache / "tile_fwk_config.json"
    text = json.dumps(cfg, indent=2)
    if not dst.exists() or dst.read_text() != text:
        write_atomic(dst, text)
    return dst


def _torch_build_key() -> dict[str, Any]:
    return {"pypto": installed_pypto_version(), "torch": torch.__version__,
            "cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI), "python": sys.version.split()[0]}


def calculator_dir() -> Path:
    return cache_dir() / "calculator"


def calculator_is_built() -> bool:
    """True when the cached calculator exists and was built for this pypto/torch."""
    d = calculator_dir()
    marker = d / _BUILD_MARKER
    if not (marker.exists() and (d / _CALC_SO).exists()):
        return False
    try:
        return json.loads(marker.read_text()) == _torch_build_key()
    except (OSError, ValueError):
        return False


def build_calculator(jobs: int | None = None) -> Path:
    """Build pypto's CPU interpreter into the cache once (lock-guarded); return the .so path.

    Uses pypto's own BuildOnlineManager cmake helpers, but into our folder instead of a
    TemporaryDirectory, so later processes only load it.
    """
    d = calculator_dir()
    with _file_lock(cache_dir() / "calculator.lock"):
        if calculator_is_built():
            return d / _CALC_SO
        from pypto._utils import BuildOnlineManager  # private: pinned by check_pypto_version
        mgr = BuildOnlineManager()
        tctx = mgr._TorchContext()
        cctx = mgr._CMakeContext()
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        ctx = mgr._CMakeContext.CompileContext(src_dir=Path(mgr.pkg_lib_dir, "calculator"),
                                               tmp_dir=d)
        ctx.cfg_cmd_ext = (f"-DPY3_MOD_TORCH_VERSION={tctx.torch_version}"
                           f" -DPY3_MOD_TORCH_ROOT_PATH={tctx.torch_root_dir}"
                           f" -DPY3_MOD_TORCH_C_GLIBCXX_USE_CXX11_ABI={tctx.torch_c_use_cxx11_abi}")
        ctx.build_job_num = jobs or os.cpu_count() or 2
        cctx.compile(ctx=ctx)
        if not (d / _CALC_SO).exists():
            raise RuntimeError(f"calculator build finished without {d / _CALC_SO}")
        shutil.rmtree(d / "build", ignore_errors=True)  # ~objects; install/ is what we load
        (d / _BUILD_MARKER).write_text(json.dumps(_torch_build_key()))
        return d / _CALC_SO


def load_calculator() -> None:
    """Load the cached calculator and tell pypto it is loaded (so it never rebuilds)."""
    from pypto._utils import BuildOnlineManager
    mgr = BuildOnlineManager()
    if mgr.calculator_loaded:
        return
    so = build_calculator()
    ctypes.CDLL(str(so), mode=ctypes.RTLD_GLOBAL)
    mgr.calculator_loaded = True


def patch_verify_inputs() -> None:
    """Work around pypto 0.2.0's zeroed verify inputs (only on 0.2.0).

    0.2.0's `_setup_verify_data` copies the inputs with CopyToHost into host tensors whose
    torch storage it has just dropped, so the interpreter sees zeros (and the caller's
    tensors get zeroed). In SIM mode the tensors are already on the host: hand them to
    SetVerifyData directly.
    """
    check_pypto_version()
    import pypto
    from pypto import pypto_impl
    from pypto.frontend.parser import entry
    from pypto.runtime import _pto_to_tensor_data, _pto_verify_datas

    def _setup_verify_data(pto_tensors: list) -> None:
        if not pypto.get_verify_options().get("enable_pass_verify"):
            return
        load_calculator()
        pypto_impl.SetVerifyData(_pto_to_tensor_data(pto_tensors), [],
                                 _pto_verify_datas.get_data())

    _setup_verify_data.__moe_kernels_patch__ = True  # type: ignore[attr-defined]
    entry.JitCallableWrapper._setup_verify_data = staticmethod(_setup_verify_data)


_SETUP_LOCK = threading.Lock()
_READY_FOR: dict[str, ModuleType] = {}  # cache folder -> imported pypto (process-local)


def ensure_ready() -> ModuleType:
    """Configure the environment, import pypto, build/load the calculator, patch; idempotent.

    Returns the pypto module. The version is checked on every call (cheap) so that a
    changed environment fails loudly instead of running unpatched.
    """
    check_pypto_version()
    cache = cache_dir()
    key = str(cache)
    with _SETUP_LOCK:
        if key in _READY_FOR:
            return _READY_FOR[key]
        check_cache_dir()
        output_root().mkdir(parents=True, exist_ok=True)
        cfg = write_quiet_config(cache)
        if "pypto" in sys.modules and os.environ.get("TILEFWK_CONFIG_PATH") != str(cfg):
            import warnings
            warnings.warn("pypto was imported before moe_kernels.pto.runtime configured it; "
                          "the quiet simulator config may not apply", RuntimeWarning, 2)
        os.environ["TILEFWK_CONFIG_PATH"] = str(cfg)
        os.environ["TILE_FWK_OUTPUT_DIR"] = str(output_root())
        redirect_side_files(cache)
        root_level = logging.getLogger().level
        import pypto
        # importing pypto lowers the root logger to DEBUG, flooding notebooks with every
        # library's debug lines; restore what the caller had
        logging.getLogger().setLevel(root_level)
        if run_mode_name() == "SIM":
            load_calculator()
        patch_verify_inputs()
        _READY_FOR[key] = pypto
        return pypto


# --------------------------------------------------------------------------- run modes
def npu_available() -> bool:
    """True when torch_npu imports and reports a device (then kernels run with RunMode.NPU)."""
    try:
        import torch_npu  # noqa: F401  pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def run_mode_name() -> str:
    """'NPU' on an Ascend node with torch_npu, else 'SIM' (cost model + CPU interpreter)."""
    return "NPU" if npu_available() else "SIM"


def jit_options(verify: bool = True) -> dict[str, Any]:
    """Keyword options for `@pypto.frontend.jit` in the current run mode.

    SIM: the cost model gives latency and (verify=True) the pass-verify interpreter
    computes the numbers on the tensor graph only (`pass_verify_pass_filter: []`);
    verify=False is for latency-only kernels (calibration), whose outputs stay unwritten.
    NPU: plain device run, no interpreter (UNTESTED here: no NPU on this machine).
    """
    pypto = ensure_ready()
    if run_mode_name() == "NPU":  # --- NPU path: untested in this repository ---
        return {"runtime_options": {"run_mode": pypto.RunMode.NPU}}
    if not verify:
        # explicit False: pypto keeps verify options process-wide, so a kernel without
        # its own would inherit the interpreter from the last verified kernel
        return {"runtime_options": {"run_mode": pypto.RunMode.SIM},
                "verify_options": dict(_NO_VERIFY)}
    return {"runtime_options": {"run_mode": pypto.RunMode.SIM},
            "verify_options": {"enable_pass_verify": True, "pass_verify_pass_filter": []}}


_NO_VERIFY = {"enable_pass_verify": False}
_LATENCY_ONLY = threading.local()


@contextlib.contextmanager
def latency_only() -> Iterator[None]:
    """Within the block, `launch` runs every kernel in the SIM cost model WITHOUT the CPU
    interpreter (latency only: outputs stay unwritten, inputs may be torch.empty).

    Why: the interpreter costs minutes per call at flash/pro shapes and needs real weights
    (6-25 GiB); the cost model does not read tensor values. Thread-local, nestable.
    """
    prev = getattr(_LATENCY_ONLY, "on", False)
    _LATENCY_ONLY.on = True
    try:
        yield
    finally:
        _LATENCY_ONLY.on = prev


def latency_only_active() -> bool:
    """True inside `latency_only()` (this thread)."""
    return bool(getattr(_LATENCY_ONLY, "on", False))


# --------------------------------------------------------------------------- latency
def parse_swim(folder: Path, kernel: str = "", clock_mhz: float = CLOCK_MHZ) -> LatencyRecord:
    """LatencyRecord from <folder>/CostModelSimulationOutput/_simulate.swim.json."""
    swim_path = Path(folder) / "CostModelSimulationOutput" / "_simulate.swim.json"
    if not swim_path.exists():
        raise FileNotFoundError(f"no simulator output at {swim_path}")
    try:
        table = parse_swim_tasks(swim_path, kernel=kernel, clock_mhz=clock_mhz)
    except ValueError as exc:
        raise RuntimeError(f"{swim_path}: {exc}") from None
    span = table.span_cycles
    trace = Path(folder) / "merged_swimlane.json"
    return LatencyRecord(
        kernel=kernel, aicore_cycles=span, aicore_us=span / clock_mhz, clock_mhz=clock_mhz,
        utilization=table.utilization, n_tasks=len(table.tasks),
        total_cycles_incl_sched=table.last_end_cycles, swim_path=str(swim_path),
        trace_path=str(trace if trace.exists() else swim_path), output_dir=str(folder),
        swim=table)


def _output_pid(folder: Path) -> int | None:
    """The pid in pypto's folder name output_<date>_<time>_<us>_<pid>_<ip>, if any."""
    parts = folder.name.split("_")
    return int(parts[4]) if len(parts) >= 6 and parts[4].isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_outputs(keep: int = KEEP_OUTPUT_DIRS) -> int:
    """Bound the cache's output_* folders; returns how many were deleted.

    Keeps the newest `keep` folders of this process and deletes folders of processes that
    have ended. Folders of other live processes are left alone: a concurrent kernel call
    (another notebook, a test worker) may still be reading its swim.json.
    """
    root = output_root()
    if not root.exists():
        return 0
    mine, dead = [], []
    for p in root.glob("output_*"):
        if not p.is_dir():
            continue
        pid = _output_pid(p)
        if pid == os.getpid():
            mine.append(p)
        elif pid is None or not _pid_alive(pid):
            dead.append(p)
    mine.sort(key=lambda p: p.stat().st_mtime)
    doomed = dead + mine[:max(0, len(mine) - keep)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return len(doomed)


def launch(kernel: Callable[..., None], *tensors: torch.Tensor, name: str = ""
           ) -> LatencyRecord | None:
    """Run a jit kernel on `tensors` (outputs included, written in place).

    SIM: returns the cost-model LatencyRecord; the interpreter has written the outputs.
    NPU (UNTESTED here): copies tensors to the NPU and back; returns None (no cost model).
    """
    ensure_ready()
    from pypto import pypto_impl
    name = name or getattr(kernel, "__name__", "kernel")
    if run_mode_name() == "NPU":  # --- NPU path: untested in this repository ---
        dev = [t.to("npu") for t in tensors]
        kernel(*dev)
        torch.npu.synchronize()
        for host, d in zip(tensors, dev, strict=True):
            host.copy_(d.cpu())
        return None
    try:
        _call(kernel, tensors)
    except Exception:
        # a failed compile leaves pypto's function open and its compile thread ended: later
        # kernels would fail ("function nested") or hang (see recovery.py); reset, re-raise
        reset_after_failed_kernel()
        raise
    folder = Path(pypto_impl.LogTopFolder())
    try:
        rec = parse_swim(folder, kernel=name)
    finally:
        clean_outputs()
    return rec


def _call(kernel: Callable[..., None], tensors: tuple[torch.Tensor, ...]) -> None:
    """kernel(*tensors), with the interpreter off inside `latency_only()`."""
    if latency_only_active() and hasattr(kernel, "_verify_options"):
        # pypto 0.2.0 JitCallableWrapper reads _verify_options on every call (compile
        # runs per call), so swapping them for this call turns the interpreter off
        saved = kernel._verify_options
        kernel._verify_options = dict(_NO_VERIFY)
        try:
            kernel(*tensors)
        finally:
            kernel._verify_options = saved
    else:
        kernel(*tensors)
