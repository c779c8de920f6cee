"""Re-measure the committed SIM timings whose kernel changed (a maintainer's tool).

    python -m moe_kernels.step.refresh [--kernel hc_pre --kernel hc_post] [--dry-run]

A committed entry (`moe_kernels/data/sim_timings.json`) is stale when its key's source
hash is no longer the current one of its kernel (`cache.KERNEL_MODULES`): a fresh clone
would simulate that shape again on first use. This simulates every stale entry again at
the shape its key names, one child process per entry (pypto keeps GiBs per large compile),
writes the new entry to the committed file and drops the stale one. Entries of the
current source are left as they are. Run it after changing a kernel, then commit the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..atomic import write_atomic
from . import cache
from .child import emit, run_child


def is_stale(entry: dict[str, Any]) -> bool:
    """True when `entry` was measured with a kernel source other than the current one."""
    key = entry["key"]
    kernel = key["kernel"]
    return kernel in cache.KERNEL_MODULES and \
        key["source"] != cache.source_hash(cache.KERNEL_MODULES[kernel])


def measure_entry(key: dict[str, Any]) -> dict[str, Any]:
    """Simulate the kernel of `key` at its shape with the current source; the new entry
    (also stored in the local cache)."""
    kernel, shape = key["kernel"], dict(key["shape"])
    if kernel == "expert_routed" and isinstance(shape.get("rows"), list):
        from . import timing
        entry, _ = timing.routed_entry(shape["rows"], shape["capacity"], shape["hidden"],
                                       shape["intermediate"], shape["swiglu_limit"],
                                       isolate=False)   # this already is a child process
        return entry
    from ..config import ModelConfig, RunConfig
    from ..pto import report
    fields = {k: shape.pop(k) for k in list(shape) if k in ModelConfig.__dataclass_fields__}
    run = RunConfig(ModelConfig(name="committed", **fields), batch=shape.pop("batch"),
                    seq=shape.pop("seq"), ranks=1, routing=shape.pop("routing"))
    entry, _ = report.time_stage(run, kernel)
    if entry["key"]["shape"] != key["shape"]:
        raise RuntimeError(f"{kernel}: the shape rebuilt from the key differs "
                           f"({entry['key']['shape']} vs {key['shape']})")
    return entry


def _measure_in_child(key: dict[str, Any]) -> dict[str, Any]:
    return run_child(["-m", "moe_kernels.step.refresh", "--one", json.dumps(key)],
                     key["kernel"])


def refresh(kernels: set[str] | None = None, dry_run: bool = False) -> int:
    """Re-measure the stale committed entries (of `kernels`, default all); returns how
    many were stale."""
    entries = cache.committed_entries()
    stale = {kid: e for kid, e in entries.items() if is_stale(e)
             and (kernels is None or e["key"]["kernel"] in kernels)}
    print(f"{len(stale)} of {len(entries)} committed entries are stale")
    out = dict(entries)
    for n, (kid, e) in enumerate(sorted(stale.items(), key=lambda kv: kv[1]["key"]["kernel"])):
        print(f"[{n + 1}/{len(stale)}] {e['key']['kernel']} "
              f"{json.dumps(e['key']['shape'], sort_keys=True)[:100]}", flush=True)
        if dry_run:
            continue
        t0 = time.perf_counter()
        new = _measure_in_child(e["key"])
        del out[kid]
        out[cache.key_id(new["key"])] = new
        print(f"    {e['aicore_us']:.2f} -> {new['aicore_us']:.2f} us "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        # written after every entry: an interrupted refresh keeps what it measured
        write_atomic(cache.COMMITTED_PATH, json.dumps(out, sort_keys=True, indent=1) + "\n")
    return len(stale)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="append", choices=sorted(cache.KERNEL_MODULES),
                    help="only this kernel's entries (repeatable; default all)")
    ap.add_argument("--dry-run", action="store_true", help="list the stale entries only")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: measure this key (JSON)
    args = ap.parse_args(argv)
    if args.one:
        emit(measure_entry(json.loads(args.one)))
        return 0
    refresh(set(args.kernel) if args.kernel else None, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
