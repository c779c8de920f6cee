# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Latency: what a decode step costs on an Ascend chip
#
# Notebooks 01-03 followed the tokens; this one puts a time on every step. There is no
# NPU on this machine, so the numbers come from three clearly separated places:
#
# * **SIM cost model (Ascend 910B, pypto 0.2.0)**: every stage kernel runs in pypto's SIM
#   mode, whose cost model of the 910B (A2A3) gives the AICore end-to-end span of the
#   kernel in cycles, shown in microseconds at 1.8 GHz (pypto's own conversion). It is a
#   model of the chip, deterministic, not a measurement.
# * **modelled communication (params)**: dispatch and combine cannot run in SIM (pypto's
#   shmem kernels need HCCL), so their time is an alpha-beta model over the bytes the
#   actual dispatch layout moves, with link bandwidth and per-message latency as
#   parameters whose defaults derive from published DeepEP-Ascend figures.
# * **published (source)**: hardware figures from DeepEP-Ascend and the reference
#   program's history (pypto-lib), each shown with its source and settings, never mixed
#   with ours.
#
# We look at: the per-stage latency of every rank of one EP step (stacked bars), one
# kernel's swimlane, latency vs tokens and vs ranks, SIM vs roofline, the communication
# model, and our numbers beside the published ones. All logic lives in
# `moe_kernels.analysis` (tested); this notebook narrates and plots.

# %%
# Only the light validation imports happen before the parameters, so bad values fail fast.
from moe_kernels.analysis.params import (
    validate_choice,
    validate_flag,
    validate_latency_options,
    validate_params,
    validate_side_run,
)

# %% tags=["parameters"]
preset = "tiny"             # tiny | demo | flash | pro: the communication model's shape
ranks = 2                   # EP ranks; must divide the preset's n_routed_experts
batch = 64                  # decode batch per rank
seq = 2                     # tokens per sequence per step (MTP), T is batch x seq per rank
routing = "hash"            # hash | sort
capacity_factor = 4.0       # receive capacity C per expert is factor x mean load (RECV_SAFETY)
seed = 0                    # fixtures
figures_dir = ".cache/figures-scratch"     # git-ignored scratch; `make run` passes figures/
pypto_preset = "tiny"       # preset of the SIM kernel runs (demo: minutes and GBs per call)
pypto_batch = None          # batch per rank of the SIM runs, None: same as batch
swim_stage = "expert_routed"  # the stage whose swimlane is drawn
swim_rank = 0               # ... on this rank
tight_whatif = True         # also SIM expert_routed sized by each rank's received rows
run_sweeps = True           # latency vs tokens and vs ranks (8 SIM kernels per new point)
batch_sweep = [16, 64, 256]  # batch per rank of the tokens sweep (SIM shape otherwise)
ranks_sweep = [1, 2, 8]     # ranks of the ranks sweep (divisors of n_routed_experts)
dispatch_gbps = None        # GB/s per rank for dispatch, None: 196 (A3 UB per 910C die)
dispatch_latency_us = None  # us per message in dispatch, None: 1.0 (assumed, see comm)
combine_gbps = None         # GB/s per rank for combine, None: 196 (A3 UB per 910C die)
combine_latency_us = None   # us per message in combine, None: 1.0 (assumed, see comm)
messages = "peer"           # peer: one message per (src, dst) pair | route: one per route
roofline_shape = "sim"      # sim: rooflines at the SIM shape only | model: also at preset/batch

# %%
p = validate_params(preset=preset, ranks=ranks, batch=batch, seq=seq, routing=routing,
                    capacity_factor=capacity_factor, seed=seed, figures_dir=figures_dir)
ps = validate_side_run("pypto_", preset=pypto_preset, ranks=ranks,
                       batch=batch if pypto_batch is None else pypto_batch, seq=seq,
                       routing=routing, capacity_factor=capacity_factor, seed=seed,
                       figures_dir=figures_dir)
opt = validate_latency_options(
    ranks=ranks, n_experts=ps.model.n_routed_experts, swim_stage=swim_stage,
    swim_rank=swim_rank, run_sweeps=run_sweeps, batch_sweep=batch_sweep,
    ranks_sweep=ranks_sweep, dispatch_gbps=dispatch_gbps,
    dispatch_latency_us=dispatch_latency_us, combine_gbps=combine_gbps,
    combine_latency_us=combine_latency_us, messages=messages)
tight_whatif = validate_flag("tight_whatif", tight_whatif)
roofline_shape = validate_choice("roofline_shape", roofline_shape, ("sim", "model"))
cfg, run = p.model, p.run
scfg, srun = ps.model, ps.run
R, NL, K, T = run.ranks, run.n_local, cfg.num_experts_per_tok, run.tokens
print(f"model shape: preset {cfg.name}, D={cfg.hidden_size}, {R} ranks x NL={NL} experts, "
      f"top-K={K}, T={T} tokens per rank, receive capacity C={run.recv_max}")
print(f"SIM shape:   preset {scfg.name}, D={scfg.hidden_size}, I={scfg.moe_intermediate_size}, "
      f"NL={srun.n_local}, T={srun.tokens} tokens per rank, C={srun.recv_max}")
print(f"sweeps: {'on' if opt.run_sweeps else 'off'}; dispatch link {opt.dispatch_link}; "
      f"combine link {opt.combine_link}")
print(f"figures -> {p.figures_dir}")

# %%
import logging
import time

import torch

# pypto calls logging.basicConfig(DEBUG) on import; configure first so only warnings show.
logging.basicConfig(level=logging.WARNING)

from moe_kernels.analysis import latency_bars as lb
from moe_kernels.analysis import latency_plots as lp
from moe_kernels.analysis import plots, sources
from moe_kernels.analysis import rank_latency as rl
from moe_kernels.analysis.comm import comm_model
from moe_kernels.analysis.gate_inputs import route_tokens
from moe_kernels.analysis.manifest import FigureWriter
from moe_kernels.analysis.published import format_published, published_figures
from moe_kernels.ep import compute_layout
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.pto.report import format_stage_table, stage_report

out = FigureWriter(p.figures_dir, "04_latency",
                   {**p.as_dict(), "pypto_preset": scfg.name, "pypto_batch": srun.batch,
                    "tight_whatif": tight_whatif, "roofline_shape": roofline_shape,
                    **opt.as_dict()})
SIM, MODEL = sources.SIM_SOURCE, sources.MODEL_SOURCE
SHAPE = f"{scfg.name}, {srun.ranks} ranks, T={srun.tokens}/rank, C={srun.recv_max}"
started = time.perf_counter()

# %% [markdown]
# ## 1. One EP step, every kernel attributed to its rank
#
# We run one EP layer step with the `pypto` stage kernels on the `local` transport, at
# the SIM shape (`pypto_preset`, `pypto_batch`: the CPU interpreter that computes the
# kernels' numbers is slow, so this shape is small by default). Each rank gets its own
# `PyptoBackend`, so every kernel call lands on the rank that made it
# (`moe_kernels.analysis.rank_latency.run_ep_per_rank`). The interpreter computes the numbers
# (routing needs the gate's real output), the cost model the time. The first pypto use
# on a machine builds the interpreter (about a minute, cached afterwards).

# %%
s_weights = make_weights(scfg, seed)
s_inputs = make_inputs(srun, seed)
per = rl.run_ep_per_rank(srun, s_inputs, s_weights, keep_swim=(opt.swim_stage,))
s_layout = per.result.layout
bars = lb.per_rank_stage_bars(per.calls, R)
recv = s_layout.recv_count.sum(dim=1).tolist()
print(f"{len(per.calls)} kernel calls in {time.perf_counter() - started:.0f} s")
for r in range(R):
    row = ", ".join(f"{s} {v[r]:.2f}" for s, v in bars.segments.items())
    print(f"rank {r}: {row} us; total {bars.totals[r]:.2f} us; rows received {recv[r]} "
          f"(expert_routed computes NL x C = {srun.n_local * srun.recv_max})")

# %%
notes = {f"rank {r}": f"{recv[r]} rows recv" for r in range(R)}
title = f"Per-stage latency per rank, {SIM} ({SHAPE})"
fig = lp.plot_stacked_bars(bars, title, ylabel="SIM latency (us, AICore span at 1.8 GHz)",
                           notes=notes)
out.show(fig, "04_stage_latency_per_rank.png", title, source="sim", shape=SHAPE)

# %% [markdown]
# The bars are equal across ranks even when the ranks receive different numbers of
# rows. That is a property of the kernels, not of the routing: `expert_routed` works on
# static shapes and computes all `C` = RECV_MAX rows of every local expert (rows past the
# count get scale and weight 0), so its cost follows the capacity, not the traffic. A
# kernel that skipped empty rows would make the busiest rank the slowest; here the
# capacity factor is paid on every rank.
#
# **What if** each rank's `expert_routed` were sized by the rows it actually received?
# Below, the same kernel runs once more per rank (SIM) with its capacity cut to that
# rank's largest per-expert count, `C_r = max_e recv_count[r, e]`, rounded up to a
# multiple of 16 rows (the kernels tile rows by divisors of C: a prime count would force
# 1-row tiles). Ranks with different loads now differ, and the gap to the EP kernel is
# what the capacity padding costs at this shape.

# %%
if tight_whatif:
    tight = rl.tight_capacity_whatif(srun, s_weights, s_layout.recv_count, seed)
    c_r = rl.tight_capacity(s_layout.recv_count)
    title = (f"expert_routed per rank: EP kernel (C={srun.recv_max}) vs sized by rows "
             f"received, {SIM} ({scfg.name}, T={srun.tokens}/rank)")
    fig = plots.plot_rank_load(
        {f"EP kernel, C = RECV_MAX = {srun.recv_max}":
            torch.tensor(bars.segments["expert_routed"]),
         f"what-if, C_r = rows received, rounded up: {c_r}":
            torch.tensor([c.aicore_us for c in tight])},
        lp.wrap_title(title, 55), ylabel="SIM latency (us)")
    out.show(fig, "04_expert_routed_tight_whatif.png", title, source="sim", shape=SHAPE)
else:
    print("(tight_whatif = False: what-if skipped)")

# %% [markdown]
#
# ## 2. Swimlane of one kernel
#
# The simulator's trace (`_simulate.swim.json`) lists every AICore task on every core:
# cube cores (AIC) run the matmuls, vector cores (AIV) quantise, activate and cast. The
# span from the first task's start to the last task's end is the latency above.

# %%
swim = per.swim(opt.swim_stage, opt.swim_rank)
title = f"Swimlane of {opt.swim_stage} on rank {opt.swim_rank}, {SIM} ({SHAPE})"
fig = lp.plot_swimlane(swim, title)
out.show(fig, f"04_swimlane_{opt.swim_stage}.png", title, source="sim", shape=SHAPE)

# %%
print(f"{opt.swim_stage}: {len(swim.tasks)} tasks on {len(swim.lanes)} lanes, span "
      f"{swim.span_us:.2f} us, utilisation {swim.utilization:.0%}")

# %% [markdown]
# ## 3. SIM vs roofline, stage by stage
#
# `stage_report` runs every stage kernel once at the per-rank SIM shape, with
# `expert_routed` at the *mean* load per expert (a balanced layout, no capacity padding),
# and puts each SIM latency beside two rooflines: `max(bytes / HBM bandwidth, FLOPs /
# peak)` at the limits the cost model was calibrated to sustain, and at the nominal
# limits of pypto's `A2A3.ini`. The ratio says how far each kernel is from its bound.

# %%
records = stage_report(srun, seed)
print(format_stage_table(records))
title = (f"SIM latency vs roofline per stage, {SIM} ({scfg.name}, T={srun.tokens}/rank, "
         f"NL={srun.n_local}, mean load per expert)")
fig = lp.plot_roofline(records, title)
out.show(fig, "04_sim_vs_roofline.png", title, source="sim", shape=SHAPE)

# %% [markdown]
# With `roofline_shape = "model"` the same report runs at the model's own shape (the
# batch run: demo, 2 ranks, batch 64, seq 2, the seed's decode step), which is what
# `python -m moe_kernels stages` prints. It takes about a minute and a half here.

# %%
if roofline_shape == "model":
    model_records = stage_report(run, seed)
    print(format_stage_table(model_records))
    title = (f"SIM latency vs roofline per stage, {SIM} ({cfg.name}, T={run.tokens}/rank, "
             f"NL={run.n_local}, mean load per expert)")
    fig = lp.plot_roofline(model_records, title)
    out.show(fig, "04_sim_vs_roofline_model_shape.png", title, source="sim",
             shape=f"{cfg.name} · R={R} · T={T}/rank")

# %% [markdown]
# ## 4. Latency vs tokens and vs ranks
#
# The same report over a sweep around the SIM shape. Tokens per rank grow with the
# decode batch, and every stage's shapes with them: each new point runs every stage
# kernel once. Ranks change only the experts per rank (`NL = E / R`) and the rows each
# local expert sees, so at fixed tokens per rank only `expert_routed` changes shape; the
# ranks sweep reruns that kernel alone and keeps the other stages from the report above.

# %%
known = {srun: records}
if opt.run_sweeps:
    b_runs = lb.batch_sweep_runs(srun, opt.batch_sweep)
    b_series = lb.sweep_series(lb.stage_sweep(b_runs, seed, known=known))
    title = (f"Latency vs tokens per rank, {SIM} ({scfg.name}, {srun.ranks} ranks, "
             f"seq {srun.seq})")
    fig = lp.plot_sweep([r_.tokens for r_ in b_runs], b_series, title,
                        xlabel="tokens per rank T = batch x seq (count)")
    out.show(fig, "04_latency_vs_tokens.png", title, source="sim", shape=SHAPE)
else:
    print("(run_sweeps = False: tokens sweep skipped)")

# %%
if opt.run_sweeps:
    r_runs = lb.ranks_sweep_runs(srun, opt.ranks_sweep)
    routed = [r_ for r_ in records if r_.stage == "expert_routed"]
    r_reports = lb.stage_sweep(r_runs, seed, stages=("expert_routed",),
                                known={srun: routed})
    r_series = lb.sweep_series(r_reports, fixed=records)
    title = f"Latency vs ranks, {SIM} ({scfg.name}, T={srun.tokens}/rank, NL = E / ranks)"
    fig = lp.plot_sweep([r_.ranks for r_ in r_runs], r_series, title,
                        xlabel="EP ranks (count)", ylabel="SIM latency per rank (us)")
    out.show(fig, "04_latency_vs_ranks.png", title, source="sim", shape=SHAPE)
else:
    print("(run_sweeps = False: ranks sweep skipped)")

# %% [markdown]
# ## 5. Dispatch and combine: a communication model
#
# No kernels here, so this runs at the model shape (`preset`, `batch`): the routes come
# from the reference gate on the seeded fixtures, the layout from `compute_layout`. Per
# route, dispatch moves the INT8 row (D bytes) and three 32-byte side tiles (scale,
# weight, r_route), combine one BF16 row (2·D bytes) back. A rank's own experts cost no
# link time. Each rank's phase time is a fixed cost per call plus `max(egress, ingress)`
# with `bytes / bandwidth + messages · latency` per peer (`moe_kernels.analysis.comm`).
# This is a **model**, not a measurement: the bandwidth is the A3 SuperPoD's UB figure
# per 910C die (arXiv:2506.12708), the latency per message an assumption, and only the
# fixed costs are fitted, on DeepEP-Ascend's EP8 point; EP16 and EP32 are held out
# (`python -m moe_kernels comm --validate`).

# %%
layout = compute_layout(route_tokens(run, seed).indices(run.routing), NL, run.recv_max)
cm = comm_model(layout.counts, cfg.hidden_size, opt.dispatch_link, opt.combine_link,
                per=opt.messages)
for row in cm.table():
    print(f"rank {row['rank']}: dispatch {row['dispatch_us']:.2f} us, combine "
          f"{row['combine_us']:.2f} us (model); bytes kept on the rank {row['self_bytes']}")
ep8 = [f for f in published_figures(["communication"]) if f.quantity.endswith("(EP8)")]
title = (f"Dispatch and combine per rank, {MODEL} (alpha-beta, {opt.messages} messages; "
         f"{cfg.name}, {R} ranks, T={T}/rank, D={cfg.hidden_size})")
fig = lp.plot_comm_model(cm, title, published=ep8)
out.show(fig, "04_comm_model.png", title, source="model",
         shape=f"{cfg.name} · R={R} · T={T}/rank")

# %% [markdown]
# Put together at the SIM shape, a rank's step is its SIM compute plus the modelled
# exchanges of the same step (hatched). On hardware parts of them overlap (the pack runs
# while the counts travel); the sum is the serial upper bound.

# %%
s_cm = comm_model(s_layout.counts, scfg.hidden_size, opt.dispatch_link, opt.combine_link,
                  per=opt.messages)
step = lb.add_segments(bars, {"dispatch (model)": s_cm.dispatch.rank_us.tolist(),
                               "combine (model)": s_cm.combine.rank_us.tolist()})
title = (f"Per-rank step: {SIM} stages + {MODEL} (hatched; "
         f"{opt.dispatch_link.bandwidth_gbps:g}/{opt.combine_link.bandwidth_gbps:g} GB/s) "
         f"({SHAPE})")
fig = lp.plot_stacked_bars(step, title, hatched=("dispatch (model)", "combine (model)"))
out.show(fig, "04_step_per_rank.png", title,
         source="sim: stages; dispatch and combine modelled (hatched)", shape=SHAPE)

# %% [markdown]
# ## 6. Beside the published figures
#
# Published numbers from real Ascend hardware, with their sources and settings: the
# DeepEP-Ascend kernels (A3 SuperPOD, 128 tokens, hidden 7168, top-8) and the reference
# program's own history in pypto-lib (910B "a2a3", FLASH shapes). Their shapes are not
# ours, so read them as scale markers, not as a validation.

# %%
pub = published_figures()
print(format_published(pub))
busiest = max(range(R), key=lambda r: bars.totals[r])
ours = [(f"ours: {s}, rank {busiest} [{SIM}; {SHAPE}]", bars.segments[s][busiest], "SIM")
        for s in ("gate", "expert_routed") if s in bars.segments]
ours += [(f"ours: all stages, rank {busiest} [{SIM}; {SHAPE}]", bars.totals[busiest], "SIM"),
         (f"ours: dispatch [{MODEL}; {cfg.name}, T={T}, {opt.dispatch_link.bandwidth_gbps:g}"
          f" GB/s, {opt.dispatch_link.latency_us:g} us/msg]", cm.dispatch.phase_us, "model"),
         (f"ours: combine [{MODEL}; {cfg.name}, T={T}, {opt.combine_link.bandwidth_gbps:g}"
          f" GB/s, {opt.combine_link.latency_us:g} us/msg]", cm.combine.phase_us, "model")]
title = "Our SIM and modelled latencies beside published Ascend figures (sources in labels)"
fig = lp.plot_beside_published(ours, pub, title)
out.show(fig, "04_beside_published.png", title,
         source="published: beside our sim and model figures (sources in labels)",
         shape=SHAPE)

# %% [markdown]
# ## What we saw
#
# * Per rank, the SIM cost of a step is dominated by the expert FFNs and hc_pre;
#   `expert_routed` pays for the full receive capacity on every rank, whatever the
#   routing; sized by the rows actually received (the what-if), ranks with different
#   loads would differ.
# * The swimlane shows how a kernel's tasks spread over the 910B's cube and vector cores.
# * The rooflines bound each kernel; the sweeps show how the cost grows with tokens and
#   how it changes per rank as experts spread over more ranks.
# * Communication is a model here; its defaults lean on published DeepEP-Ascend numbers,
#   and every figure says which numbers are simulated, modelled or published.

# %%
print(f"notebook compute: {time.perf_counter() - started:.0f} s")
print("\n".join(str(path.name) for path in out.written))
