"""Leave pypto usable after a kernel fails to compile or run (pypto 0.2.0 only).

A failed compile leaves two things half-open (read in hicann/pypto r0.2.0):

* Python: `pypto.function` (pypto/_controller.py) calls `Controller.end_function()` after
  `func.EndFunction()` in a `finally`; when EndFunction raises (every pass error, e.g.
  "Run pass failed"), `Controller.in_function` stays True and every later kernel of the
  process fails with "function nested is not allowed".
* C++: `HostMachine::CompileThreadFunc` (framework/src/interface/machine/host/
  host_machine.cpp) `return`s after a compile error: its only compile thread
  (compileThreadCount_ = 1) ends, the thread object stays in compileThreads_ so it is
  never restarted, and the next kernel's compile waits forever in WaitTaskFinish.

* C++ again: `Program::currentDynamicFunctionPtr_` (interface/program/program.h) keeps
  pointing at the failed, destroyed function. `SetCurrentDynamicFunction` asserts the new
  function differs from it, so when the allocator hands the next kernel's function the
  same address (about one run in six here), that kernel fails with "Under: X X".

`reset_after_failed_kernel()` closes the Python function, clears that stale pointer, and
calls
HostMachine::DestroyThread (joins the finished thread and the idle agent thread; the next
SubTask starts fresh ones through InitThread) and ClearStashFuncQueue (drops any function
of the failed kernel still queued for compilation). Neither entry point is bound in
pypto_impl, so they are called by their exported C++ symbols; both take only `this`.
runtime.check_pypto_version pins the release these symbols were read from.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

#: Itanium-mangled exported symbols of libtile_fwk_interface.so (pypto 0.2.0):
#: HostMachine::GetInstance(), HostMachine::DestroyThread(), HostMachine::ClearStashFuncQueue().
_GET_MACHINE = "_ZN3npu8tile_fwk11HostMachine11GetInstanceEv"
_MACHINE_RESETS = ("_ZN3npu8tile_fwk11HostMachine13DestroyThreadEv",
                   "_ZN3npu8tile_fwk11HostMachine19ClearStashFuncQueueEv")
#: Program::GetInstance() and Program::SetCurrentDynamicFunction(Function*).
_GET_PROGRAM = "_ZN3npu8tile_fwk7Program11GetInstanceEv"
_SET_DYNAMIC = "_ZN3npu8tile_fwk7Program25SetCurrentDynamicFunctionEPNS0_8FunctionE"


def _interface_lib() -> ctypes.CDLL:
    import pypto  # already imported (and version-checked) by the caller's kernel launch
    return ctypes.CDLL(str(Path(pypto.__file__).resolve().parent / "lib"
                           / "libtile_fwk_interface.so"))


def reset_after_failed_kernel() -> None:
    """Close the function a failed kernel left open and restart pypto's compile thread.

    Safe when nothing is half-open (an idle thread is joined and restarted on demand).
    Call it only after the failed kernel call has returned (no compile in flight).
    """
    from pypto._controller import Controller
    Controller.end_function()
    lib = _interface_lib()
    get_machine = getattr(lib, _GET_MACHINE)
    get_machine.restype = ctypes.c_void_p
    machine = get_machine()
    for sym in _MACHINE_RESETS:
        fn = getattr(lib, sym)
        fn.argtypes, fn.restype = [ctypes.c_void_p], None
        fn(machine)
    _clear_dynamic_function(lib)


def _clear_dynamic_function(lib: ctypes.CDLL) -> None:
    """Program's current dynamic function <- nullptr. The setter asserts old != new, and
    its getter is not exported, so go through a sentinel address no Function can have:
    current -> sentinel (differs from any function or null) -> nullptr (differs from the
    sentinel). The sentinel is never dereferenced (the assert message is built only when
    the assert fails)."""
    get_program = getattr(lib, _GET_PROGRAM)
    get_program.restype = ctypes.c_void_p
    program = get_program()
    set_dynamic = getattr(lib, _SET_DYNAMIC)
    set_dynamic.argtypes, set_dynamic.restype = [ctypes.c_void_p, ctypes.c_void_p], None
    sentinel = ctypes.create_string_buffer(16)
    set_dynamic(program, ctypes.addressof(sentinel))
    set_dynamic(program, None)
