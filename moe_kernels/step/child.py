"""Run one SIM measurement in a fresh interpreter and read its JSON result back.

pypto 0.2.0 keeps GiBs per large compile (a 32-expert flash kernel: 5-9 GiB peak) and a
process's RSS grows with every such call, so large SIM runs each get a child process.
subprocess, not multiprocessing: a notebook's or stdin's __main__ cannot be re-imported.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

#: The stdout line a child prints its result on (anything else it prints is ignored).
MARKER = "MOE_CHILD_RESULT "


def emit(result: dict[str, Any]) -> None:
    """In the child: print `result` for `run_child` to read."""
    print(MARKER + json.dumps(result, sort_keys=True), flush=True)


def run_child(args: list[str], what: str) -> dict[str, Any]:
    """Run `python <args>` (a child that calls `emit` once) and return what it emitted;
    RuntimeError naming `what` and the child's last stderr line if it emitted nothing."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{what}: SIM child failed (rc {proc.returncode}): {tail}")
