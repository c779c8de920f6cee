"""Per-stage SIM latency vs roofline (configured A2A3.ini and calibrated) for one run.

    .venv/bin/python benchmarks/stage_roofline.py [--preset demo --ranks 2 --batch 64
                                                   --seq 2 --routing hash --json FILE]

Target (issue 4): at demo, R=2, batch 64, seq 2 every stage <= 1.5x its roofline and the
sum <= 1.3x the summed roofline, in pypto 0.2.0's 910B cost model. A benchmark, not a test:
it takes a few minutes (the demo expert weights are large, and the first run calibrates).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from moe_kernels.config import RunConfig, get_preset

#: Issue 4 performance target.
STAGE_MAX_RATIO, SUM_MAX_RATIO = 1.5, 1.3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=2)
    ap.add_argument("--routing", default="hash", choices=["hash", "sort"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the records (and limits) here")
    a = ap.parse_args(argv)
    from moe_kernels.pto.calibrate import calibration, vector_calibration
    from moe_kernels.pto.report import configured_limits, format_stage_table, stage_report
    run = RunConfig(get_preset(a.preset), batch=a.batch, seq=a.seq, ranks=a.ranks,
                    routing=a.routing)
    t0 = time.time()
    cal, conf, vcal = calibration(), configured_limits(), vector_calibration()
    recs = stage_report(run, seed=a.seed)
    print(f"{a.preset} R={a.ranks} batch={a.batch} seq={a.seq} routing={a.routing}: "
          f"T={run.tokens} tokens/rank, NL={run.n_local} experts/rank, "
          f"{-(-run.tokens * run.model.num_experts_per_tok // run.n_local)} rows/expert")
    print(format_stage_table(recs))
    print(f"configured ({conf.source}): HBM {conf.hbm_bytes_per_s / 1e12:.3f} TB/s, "
          f"INT8 {conf.int8_ops_per_s / 1e12:.0f} TOPS, BF16 {conf.bf16_flops_per_s / 1e12:.0f}"
          f" TFLOPS")
    print(f"calibrated (SIM): HBM {cal.hbm_bytes_per_s / 1e12:.3f} TB/s (vector copy "
          f"{cal.copy_bytes_per_s / 1e12:.3f}, weight stream {cal.stream_bytes_per_s / 1e12:.3f})"
          f", INT8 {cal.int8_ops_per_s / 1e12:.0f} TOPS, BF16 {cal.bf16_flops_per_s / 1e12:.0f}"
          f" TFLOPS")
    print(f"calibrated vector (SIM, extra bound vec_roof, not part of roof): FP32 elementwise "
          f"{vcal.vec_ops_per_s / 1e12:.2f} Tops/s")
    sim = sum(r.sim_us for r in recs)
    roof = sum(r.roofline_us for r in recs)
    bad = [r.stage for r in recs if r.ratio > STAGE_MAX_RATIO]
    print(f"target: every stage <= {STAGE_MAX_RATIO}x (over: {bad or 'none'}); "
          f"sum {sim / roof:.2f}x (target <= {SUM_MAX_RATIO}x)   [{time.time() - t0:.0f} s]")
    bound = sum(max(r.roofline_us, r.vec_roof_us) for r in recs)
    print(f"against max(roof, vec_roof) (information only): sum {sim / bound:.2f}x")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"run": run.to_dict(), "calibration": cal.to_dict(),
                       "vector_calibration": vcal.to_dict(),
                       "configured": conf.__dict__, "stages": [r.to_dict() for r in recs]},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
