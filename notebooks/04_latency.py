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
# # 04 · Latency: what one EP decode step costs, rank by rank
#
# Notebooks 01-03 followed the tokens; this one puts a time on every part of an EP step,
# on every rank. There is no NPU on this machine, so the numbers come from three clearly
# separated places (the footer of every figure names which):
#
# * **sim**: pypto's SIM cost model of the Ascend 910B (A2A3) for every stage kernel,
#   compiled at the rank's real shape and run without the CPU interpreter; microseconds
#   at 1.8 GHz. `expert_routed` is specialised to the rows each local expert actually
#   received, so a rank that receives more rows computes longer.
# * **model**: the count exchange, dispatch and combine cannot run in SIM, so their time
#   comes from the alpha-beta communication model over the bytes the dispatch layout
#   moves (A3 UB bandwidth, per-call overheads fitted on one published DeepEP-Ascend
#   point; `moe_kernels.analysis.comm`). Drawn hatched.
# * **published**: DeepEP-Ascend's kernels and the reference program's EP8 step, each
#   with its source, set only beside what we model at the same shape.
#
# The step model (`moe_kernels.step.model.ep_step`, also `python -m moe_kernels step`)
# routes every rank's tokens through the gate, lays the routes out as dispatch does, and
# schedules each rank: local stages, then the count exchange, dispatch, expert_routed and
# combine, each behind a barrier where a rank waits for its slowest peer, then the reduce
# and hc_post. We look at two shapes: the seed's (`preset`, `ranks`, `batch`, `seq`; the
# batch run: demo, 2 ranks, T = 128 tokens per rank) and a step at scale (`scale_*`;
# the batch run: DeepSeek-V4-Flash on 8 ranks, T = 32). Terms and shapes:
# [docs/design.md](../docs/design.md). All logic lives in `moe_kernels.analysis`
# (tested); this notebook narrates and plots.

# %%
# Only the light validation import happens before the parameters, so bad values fail fast.
from moe_kernels.analysis.params import validate_latency_options, validate_params

# %% tags=["parameters"]
preset = "tiny"             # tiny | demo | flash | pro: the seed's step (batch run: demo)
ranks = 2                   # EP ranks; must divide the preset's n_routed_experts
batch = 64                  # decode batch per rank
seq = 2                     # tokens per sequence per step (MTP), T is batch x seq per rank
routing = "hash"            # hash | sort
seed = 0                    # fixtures and skew draws
figures_dir = ".cache/figures-scratch"     # git-ignored scratch; `make run` passes figures/
scale_preset = "tiny"       # the step at scale and the sweeps (batch run: flash)
scale_ranks = 8             # ... its ranks (batch run: 8)
scale_batch = 16            # ... its batch per rank (batch run: 16)
scale_seq = 2               # ... its tokens per sequence (batch run: 2)
skew_sweep = [0.0, 0.5, 1.0, 1.5, 2.0]  # synthetic Zipf skews of the skew sweep
eplb_per_rank = 1           # EPLB what-if: redundant expert slots per rank
ranks_sweep = [2, 4, 8, 16]  # ranks of the ranks sweep (T per rank fixed)
tokens_sweep = [8, 32, 128, 512]  # tokens per rank of the tokens sweep (multiples of seq)

# %%
opt = validate_latency_options(
    scale_preset=scale_preset, scale_ranks=scale_ranks, scale_batch=scale_batch,
    scale_seq=scale_seq, routing=routing, seed=seed, skew_sweep=skew_sweep,
    eplb_per_rank=eplb_per_rank, ranks_sweep=ranks_sweep, tokens_sweep=tokens_sweep)
p = validate_params(preset=preset, ranks=ranks, batch=batch, seq=seq, routing=routing,
                    seed=seed, figures_dir=figures_dir)      # creates figures_dir, last
run, srun = p.run, opt.scale.run
for name, r_ in (("seed's step", run), ("step at scale", srun)):
    print(f"{name}: preset {r_.model.name}, D={r_.model.hidden_size}, "
          f"I={r_.model.moe_intermediate_size}, {r_.ranks} ranks x NL={r_.n_local} "
          f"experts, top-K={r_.model.num_experts_per_tok}, T={r_.tokens} tokens per rank")
print(f"figures -> {p.figures_dir}")

# %%
import logging

# pypto calls logging.basicConfig(DEBUG) on import; configure first so only warnings show.
logging.basicConfig(level=logging.WARNING)

from IPython.display import Markdown, display

from moe_kernels.analysis import latency_plots as lp
from moe_kernels.analysis import step_sweeps as ss
from moe_kernels.analysis.comm import published_comparison
from moe_kernels.analysis.manifest import FigureWriter
from moe_kernels.analysis.published import DEEPEP_ASCEND_LL_SHAPE
from moe_kernels.analysis.style import shape_label
from moe_kernels.step.model import ep_step
from moe_kernels.step_cmd import format_step

out = FigureWriter(p.figures_dir, "04_latency", {**p.as_dict(), **opt.as_dict()})
TIGHT_C = "busiest expert's rows (to 16)"
STEP_SOURCE = ("sim: stage kernels (pypto cost model, 910B); model: count exchange, "
               "dispatch, combine (alpha-beta, hatched)")

# %% [markdown]
# ## 1. One step, every rank: a Gantt chart
#
# Each lane is one rank. Serial: every stage in program order, and each exchange starts
# when the last rank is ready for it (a barrier); a rank that is ready early waits (thin
# dark bars). Overlapped (`overlap=True`): `expert_shared` needs neither the counts nor
# the dispatched rows, so it runs beside the count exchange and dispatch (lower half of
# the lane), and `expert_routed` starts when both are done.

# %%
steps = {}
for name, r_ in (("seed", run), ("scale", srun)):
    steps[name] = (ep_step(r_, seed=seed), ep_step(r_, seed=seed, overlap=True))
    print(f"{name}: {ss.step_shape(steps[name][0])}")
    print(format_step(steps[name][0].to_dict()))
    print(f"overlapped: step {steps[name][1].step_us:.1f} us\n")

# %%
for name, fname in (("seed", "04_step_gantt.png"), ("scale", "04_step_gantt_scale.png")):
    serial, overlapped = steps[name]
    pt = ss.step_point(serial)
    top = max(serial.ranks[pt.rank].stages_us, key=serial.ranks[pt.rank].stages_us.get)
    title = (f"One EP step per rank: {top} is the longest stage, communication takes "
             f"{100 * pt.comm_share:.0f} %; expert_shared beside the exchange saves "
             f"{serial.step_us - overlapped.step_us:.0f} us")
    fig = lp.plot_step_gantt({"serial": serial,
                              "overlapped: expert_shared beside count exchange + dispatch":
                                  overlapped}, title)
    display(out.show(fig, fname, title, source=STEP_SOURCE,
                     shape=ss.step_shape(serial)))

# %% [markdown]
# ## 2. Skew: the step waits for the busiest rank
#
# The synthetic Zipf skew (notebook 01) concentrates routes on hot experts. Two effects
# pull against each other. The rank holding the hot experts receives more rows: its
# `expert_routed` computes more, and at the combine barrier every other rank waits for
# it. But fewer experts hold rows at all, and every expert with rows streams its whole
# weight matrices from HBM, which at decode sizes costs more than the rows themselves.
# Which effect wins depends on the shape; the figure shows it at the step at scale. The
# EPLB what-if gives the hottest experts extra copies in `eplb_per_rank` redundant slots
# per rank, so the copies share their rows (and each copy streams its own weights).
# Capacity is R·T rows per expert: every route fits, none is dropped.

# %%
skew_home = ss.skew_sweep(srun, opt.skew_sweep, seed)
skew_eplb = ss.skew_sweep(srun, opt.skew_sweep, seed, eplb_slots=opt.eplb_slots)
for a, b in zip(skew_home, skew_eplb, strict=True):
    print(f"skew {a.x:g}: step {a.step_us:.1f} us (busiest rank {a.rows_imbalance:.2f}x "
          f"the mean rows, {a.active_mean:.1f} experts with rows per rank); with EPLB "
          f"{b.step_us:.1f} us ({b.rows_imbalance:.2f}x, {b.active_mean:.1f})")
cold, hot, flat = skew_home[0], skew_home[-1], skew_eplb[-1]
title = (f"Skew {hot.x:g} takes the step from {cold.step_us:.0f} to {hot.step_us:.0f} us "
         f"(experts holding rows per rank: {cold.active_mean:.0f} -> "
         f"{hot.active_mean:.0f}); with EPLB ({opt.eplb_slots} redundant slots) "
         f"{flat.step_us:.0f} us")
fig = lp.plot_skew_sweep({"home placement": skew_home,
                          f"EPLB, {opt.eplb_per_rank} redundant slot(s) per rank":
                              skew_eplb}, title)
display(out.show(fig, "04_step_vs_skew.png", title, source=STEP_SOURCE + "; serial",
                 shape=shape_label(srun.model.name, srun.ranks, srun.tokens,
                                   f"{srun.ranks * srun.tokens} (R·T)",
                                   skew=f"{cold.x:g}-{hot.x:g}")))

# %% [markdown]
# ## 3. Ranks and tokens per rank
#
# More ranks at a fixed batch per rank: each rank holds fewer experts (`NL = E / R`), so
# its `expert_routed` shrinks, while every rank sends to more peers. More tokens per rank
# at fixed ranks: every stage grows, and so do the bytes on the links. The bars split the
# slowest rank's step into SIM compute, modelled communication and waiting; the right
# panel is communication's share. The receive capacity of each point is its busiest
# expert's rows rounded up to 16 (`step_sweeps.tight_factor`): nothing is dropped, and
# the windows the SIM kernels are compiled for stay small.

# %%
by_ranks = ss.ranks_sweep(srun, opt.ranks_sweep, seed)
a, b = by_ranks[0], by_ranks[-1]
title = (f"From {a.x:g} to {b.x:g} ranks the step goes from {a.step_us:.0f} to "
         f"{b.step_us:.0f} us and communication from {100 * a.comm_share:.0f} % to "
         f"{100 * b.comm_share:.0f} % of it")
fig = lp.plot_step_sweep(by_ranks, title, xlabel="EP ranks R (count)")
r_span = f"{opt.ranks_sweep[0]}-{opt.ranks_sweep[-1]}"
display(out.show(fig, "04_step_vs_ranks.png", title, source=STEP_SOURCE + "; serial",
                 shape=shape_label(srun.model.name, r_span, srun.tokens, TIGHT_C)))

# %%
by_tokens = ss.tokens_sweep(srun, opt.tokens_sweep, seed)
a, b = by_tokens[0], by_tokens[-1]
title = (f"From T = {a.x:g} to {b.x:g} tokens per rank the step goes from "
         f"{a.step_us:.0f} to {b.step_us:.0f} us; communication takes "
         f"{100 * a.comm_share:.0f} % to {100 * b.comm_share:.0f} %")
fig = lp.plot_step_sweep(by_tokens, title, xlabel="tokens per rank T = batch x seq (count)")
t_span = f"{opt.tokens_sweep[0]}-{opt.tokens_sweep[-1]}/rank"
display(out.show(fig, "04_step_vs_tokens.png", title, source=STEP_SOURCE + "; serial",
                 shape=shape_label(srun.model.name, srun.ranks, None, TIGHT_C, T=t_span)))

# %% [markdown]
# ## 4. Stages against their bounds
#
# Each stage of the step at scale, on its busiest rank (the longest `expert_routed`),
# beside its roofline `max(bytes / HBM bandwidth, FLOPs / peak)` at pypto's nominal
# `A2A3.ini` limits, from the stage cost formulas at the rows that rank's experts
# received. The ratio says how far each kernel is from its bound. `python -m moe_kernels
# stages` prints the same comparison per stage with the limits calibrated in the
# simulator and the fixed costs per task and DMA that explain the gap.

# %%
bounds = ss.stage_bounds(steps["scale"][0], srun)
for b_ in bounds:
    print(f"{b_.stage:<15} SIM {b_.sim_us:8.1f} us   roofline {b_.roofline_us:8.1f} us   "
          f"x{b_.ratio:.2f}")
far = max(bounds, key=lambda b_: b_.ratio)
routed = next(b_ for b_ in bounds if b_.stage == "expert_routed")
title = (f"SIM time against the roofline per stage: expert_routed at x{routed.ratio:.1f}, "
         f"{far.stage} furthest (x{far.ratio:.1f})")
fig = lp.plot_stage_bounds(bounds, title)
display(out.show(fig, "04_stages_vs_bounds.png", title,
                 source="sim: stage kernels of the busiest rank; model: rooflines from the "
                        "stage cost formulas at A2A3.ini limits",
                 shape=ss.step_shape(steps["scale"][0])))

# %% [markdown]
# ## 5. Beside the published figures, like for like
#
# A published number is only set beside ours at the same shape. DeepEP-Ascend published
# its low-latency dispatch and combine at 128 tokens per rank, hidden 7168, top-8 on an
# A3 SuperPOD: we run the communication model at exactly that shape (uniform routing).
# Only the EP8 point was used to fit the model's per-call overheads; EP16 and EP32 are
# held out. The reference program (pypto-lib) published its EP8 core time per rank; we
# set our step on 8 ranks beside it (our shape in the footer; the publication does not
# state its batch).

# %%
comm_rows = published_comparison()
for r_ in comm_rows:
    print(f"EP{r_.ep} {r_.phase}: model {r_.model_us:.1f} us, published "
          f"{r_.published_us:.0f} us ({'fitted' if r_.fitted else f'{r_.error_pct:+.1f} %'})")
worst = max((r_ for r_ in comm_rows if not r_.fitted), key=lambda r_: abs(r_.error_pct))
title = (f"Communication model at DeepEP-Ascend's shape: fitted at EP8, the held-out "
         f"points within {abs(worst.error_pct):.0f} % of the published latency")
fig = lp.plot_comm_vs_published(comm_rows, title)
tok, hid, topk = DEEPEP_ASCEND_LL_SHAPE
display(out.show(fig, "04_comm_vs_published.png", title,
                 source="model: alpha-beta at the published shape, beside published "
                        "DeepEP-Ascend latencies (sgl-project/sgl-kernel-npu README)",
                 shape=shape_label("DeepEP-Ascend low-latency", "8/16/32", tok, None,
                                   D=hid, K=topk)))

# %%
vs_pub = ss.step_vs_published(*steps["scale"])
title = (f"Our step on {srun.ranks} ranks: {vs_pub.serial.step_us:.0f} us serial, "
         f"{vs_pub.overlapped_us:.0f} us overlapped, beside the reference's published "
         f"{vs_pub.published.value_us:.0f} us EP8 core time")
fig = lp.plot_step_vs_published(vs_pub, title)
display(out.show(fig, "04_step_vs_published.png", title,
                 source=f"sim: stages; model: exchange (hatched); published: "
                        f"{vs_pub.published.source}",
                 shape=f"{vs_pub.shape}; published: EP8, batch not stated"))

# %%
display(Markdown(ss.step_findings(steps["seed"], steps["scale"], skew_home, skew_eplb,
                                  opt.eplb_slots, by_ranks, by_tokens, comm_rows, vs_pub)))

# %%
print("\n".join(str(path.name) for path in out.written))
