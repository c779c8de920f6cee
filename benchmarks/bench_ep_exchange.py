"""Benchmark the EP exchange over gloo against the all-to-all lower bound.

On the demo preset (D = 4096, 16 experts) with R ranks over gloo on this machine, in one
run: (1) dispatch + combine of the EP program (count all_gather, slot planning, packing,
one all_to_all_single of packed rows each way, unpacking, gather by route) against two
bare ``all_to_all_single`` calls moving the same wire bytes per peer, with and without a
blocking count all_gather in front (EP cannot skip its count exchange), interleaved,
median of several repetitions, and the ratios (target <= 1.3x); (2) the whole EP layer step
against the single-card reference layer for the same tokens.

    .venv/bin/python benchmarks/bench_ep_exchange.py [--ranks 2] [--batch 64] [--reps 20]

Notes: gloo on CPU supports all_to_all_single (alltoallv), so no fallback is needed.
Each rank gets cores // R intra-op threads (the reference is timed at the caller's
thread count and at 1 thread). All ranks share this machine's cores, so the layer
comparison measures contention as much as parallelism.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layer-reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-layer", action="store_true", help="skip the whole-layer part")
    args = ap.parse_args()
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, repo)

    import torch

    from moe_kernels.config import RunConfig, get_preset
    from moe_kernels.ep import bench
    from moe_kernels.ep.dist import SpawnedWorld
    from moe_kernels.fixtures import make_inputs, make_weights
    from moe_kernels.layer import reference_layer

    run = RunConfig(model=get_preset(args.preset), batch=args.batch, seq=args.seq,
                    ranks=args.ranks)
    t0 = time.perf_counter()
    weights = make_weights(run.model)
    inputs = make_inputs(run)
    print(f"preset {run.model.name}: R={run.ranks} T={run.tokens}/rank "
          f"K={run.model.num_experts_per_tok} D={run.model.hidden_size} NL={run.n_local} "
          f"C={run.recv_max}; fixtures {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")

    import os
    threads = max(1, (os.cpu_count() or 1) // run.ranks)  # same total cores as 1 process
    with SpawnedWorld(run.ranks, timeout=120.0, threads=threads) as world:
        ex = world.call(bench.exchange_rank, run, inputs, weights, args.reps, args.warmup)
        layer = None if args.no_layer else \
            world.call(bench.layer_rank, run, inputs, weights, args.layer_reps)[0]
    ep_med = statistics.median(ex[0]["ep"])
    a2a_med = statistics.median(ex[0]["a2a"])
    a2a_c_med = statistics.median(ex[0]["a2a_counts"])
    print("\n== dispatch + combine vs all_to_all_single of the same bytes "
          f"(median of {args.reps}, slowest rank, interleaved) ==")
    print(f"wire row {ex[0]['row_bytes']} bytes out (spec tiles would be "
          f"{ex[0]['spec_row_bytes']}), {2 * run.model.hidden_size} back")
    for r, e in enumerate(ex):
        print(f"rank {r}: routes out per peer {e['send_routes']}, in {e['recv_routes']}; "
              f"bytes out {e['bytes_out']:,} back {e['bytes_back']:,}")
    rows = [("EP exchange (counts + 2 a2a)", ex[0]["ep"]),
            ("all_to_all x2", ex[0]["a2a"]),
            ("count all_gather + all_to_all x2", ex[0]["a2a_counts"])]
    for name, ts in rows:
        print(f"{name:34s} median {statistics.median(ts) * 1e3:7.3f} ms  "
              f"(min {min(ts) * 1e3:.3f})")
    print(f"ratio EP / all_to_all x2                  = {ep_med / a2a_med:.2f}x  "
          f"(target <= 1.3x)")
    print(f"ratio EP / (count all_gather + a2a x2)    = {ep_med / a2a_c_med:.2f}x  "
          f"(the count exchange is inherent to EP)")
    for r, e in enumerate(ex):
        cols = list(zip(*e["phases"], strict=True))
        print(f"rank {r} phase medians: " + ", ".join(
            f"{name} {statistics.median(c) * 1e3:.2f} ms"
            for name, c in zip(e["phase_names"], cols, strict=True)))

    if layer is None:
        return
    lay_med = statistics.median(layer)
    print(f"\n== whole layer, {run.ranks}x{run.tokens} tokens "
          f"(median of {args.layer_reps}) ==")
    print(f"EP layer over gloo ({run.ranks} processes x {world.threads} thread) "
          f"{lay_med:8.3f} s")
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        ref_t = []
        for _ in range(args.layer_reps):
            t = time.perf_counter()
            reference_layer(run, inputs, weights)
            ref_t.append(time.perf_counter() - t)
        ref_med = statistics.median(ref_t)
        print(f"single-card reference (1 process x {threads} thread) {ref_med:8.3f} s; "
              f"ratio EP / reference = {lay_med / ref_med:.2f}x")


if __name__ == "__main__":
    main()
