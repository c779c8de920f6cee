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
# # 01 · Routing: who sends how much to whom
#
# Every decode step, the gate of a DeepSeek-V4 MoE layer sends each token to `K` of the
# `E` routed experts. With expert parallelism (EP) over `R` ranks, rank `r` holds experts
# `[r·NL, (r+1)·NL)` (`NL = E / R`), so routing decides how many rows every rank must
# receive and compute. The busiest rank sets the pace of the whole step.
#
# This notebook walks through:
#
# 1. the gate's scores and routing weights (spec §2.3);
# 2. the two routes, **hash** (a fixed token-id → experts table) and **sort** (top-K of the
#    biased scores), and the load each puts on experts and ranks;
# 3. a **synthetic skew** that concentrates traffic on hot experts, and what it does to
#    the imbalance factor (max / mean) and the busiest rank;
# 4. an **EPLB-style what-if**: replicate the hottest experts into redundant slots and
#    look at the new per-rank load.
#
# All logic lives in `moe_kernels.analysis` (tested); this notebook narrates and plots.
# Figures are written to `figures_dir` under stable names and listed in its
# `manifest.json`.

# %%
# Only the light validation import happens before the parameters, so bad values fail fast.
from moe_kernels.analysis.params import validate_params

# %% tags=["parameters"]
preset = "tiny"          # tiny | demo | flash | pro (the batch run uses demo)
ranks = 2                # EP ranks; must divide the preset's n_routed_experts
batch = 64               # decode batch per rank
seq = 2                  # tokens per sequence per step (MTP), T is batch x seq per rank
topk = None              # experts per token, None keeps the preset num_experts_per_tok
routing = "hash"         # hash | sort: the route used for the load analysis
skew = 1.0               # Zipf exponent of the synthetic hot-expert skew, 0 for none
capacity_factor = 4.0    # receive capacity per expert is factor x mean load (RECV_SAFETY)
redundant_slots = 4      # EPLB what-if: extra expert slots in total, a multiple of ranks
seed = 0                 # fixtures and skew draws
figures_dir = ".cache/figures-scratch"  # git-ignored scratch; `make run` passes figures/

# %%
p = validate_params(preset=preset, ranks=ranks, batch=batch, seq=seq, topk=topk,
                    routing=routing, skew=skew, capacity_factor=capacity_factor,
                    redundant_slots=redundant_slots, seed=seed, figures_dir=figures_dir)
cfg, run = p.model, p.run
E, K, R, NL = cfg.n_routed_experts, cfg.num_experts_per_tok, run.ranks, run.n_local
print(f"preset {cfg.name}: E={E} experts, top-K={K}, {R} ranks x NL={NL} experts, "
      f"T={run.tokens} tokens per rank, receive capacity {run.recv_max} rows per expert")
print(f"figures -> {p.figures_dir}")

# %%
from moe_kernels.analysis import eplb, plots
from moe_kernels.analysis import routing as rt
from moe_kernels.analysis import skew as sk
from moe_kernels.analysis.gate_inputs import route_tokens
from moe_kernels.analysis.manifest import FigureWriter

out = FigureWriter(p.figures_dir, "01_routing", p.as_dict())

# %% [markdown]
# ## 1. Gate scores and routing weights
#
# Each rank runs hc_pre and the gate on its own tokens (the seeded fixtures of spec §5.1;
# only the hc and gate weights are built, not the routed experts). The gate scores every
# expert with `score = sqrt(softplus(x_norm · gate_w))`. The **sort** route picks the
# top-K of `score + gate_bias`; the **hash** route ignores the scores and looks the
# experts up by token id. Either way the weights use the *unbiased* scores of the chosen
# experts, normalised to sum to `routed_scaling_factor`.

# %%
sample = route_tokens(run, seed)
fig = plots.plot_gate_scores(
    sample.score[0], sample.sort_indices[0],
    f"Gate scores on rank 0 ({cfg.name}); circles: sort route's top-{K} of score + bias")
out.show(fig, "01_gate_scores.png")

# %% [markdown]
# The routing weights of the two routes differ. The sort route picks the K experts a
# token scores highest, whose scores tend to be close, so its weights cluster around
# `routed_scaling_factor / K`; the hash route's picks ignore the scores and pair high
# with low ones, so its weights spread much wider.

# %%
fig = plots.plot_weight_hist(
    {"hash route": sample.hash_weights, "sort route": sample.sort_weights},
    f"Routing weights, all ranks ({cfg.name}, top-{K})")
out.show(fig, "01_routing_weights.png")

# %% [markdown]
# ## 2. Hash vs sort: load per expert and per rank
#
# Counting routes per global expert over every rank's tokens gives the rows each expert
# receives. The dashed line is the receive capacity per local expert (`RECV_MAX`); an
# expert above it would overflow its receive window.

# %%
stats = {r_: rt.routing_stats(sample.indices(r_), E, R) for r_ in ("hash", "sort")}
fig = plots.plot_expert_load(
    {f"{r_} route": s.expert_load for r_, s in stats.items()}, NL,
    f"Routes per expert, hash vs sort ({cfg.name}, {R} ranks, T={run.tokens}/rank)",
    capacity=run.recv_max)
out.show(fig, "01_hash_vs_sort_expert_load.png")

# %%
for r_, s in stats.items():
    print(f"{r_:>4} route: {s.summary()}")

# %% [markdown]
# ## 3. Synthetic skew: hot experts
#
# Real traffic is rarely uniform. `skew_routing` gives every expert a Zipf popularity
# `w_e = 1/(1 + rank_e)` over a seeded hot-expert order and re-ranks each token's experts
# by Gumbel keys conditioned on the gate's choice plus `skew · log w_e`. At `skew = 0` the
# routing is the gate's, unchanged; as `skew` grows, traffic drifts toward the hottest
# experts (for a uniform base routing this is exactly sampling K experts without
# replacement with probability ∝ `w_e ** skew`).

# %%
base = sample.indices(run.routing)
skewed = sk.skew_routing(base, E, p.skew, seed)
s0, s1 = rt.routing_stats(base, E, R), rt.routing_stats(skewed, E, R)
fig = plots.plot_expert_load(
    {f"{run.routing} route, skew 0": s0.expert_load,
     f"{run.routing} route, skew {p.skew:g}": s1.expert_load}, NL,
    f"Routes per expert with synthetic skew ({cfg.name}, {R} ranks)",
    capacity=run.recv_max)
out.show(fig, "01_skew_expert_load.png")

# %% [markdown]
# The imbalance factor `max / mean` is what matters for latency: the step waits for the
# busiest rank, so a factor of 1.5 means the busiest rank computes 50 % more rows than a
# balanced split would give it. Per-expert imbalance grows much faster than per-rank
# imbalance, because each rank averages over its NL experts.

# %%
grid = sk.SKEW_GRID
sweep = sk.skew_sweep(base, E, R, grid, seed)
fig = plots.plot_lines(
    grid, {"per rank (max/mean)": [s.rank_imbalance for s in sweep],
           "per expert (max/mean)": [s.expert_imbalance for s in sweep]},
    f"Imbalance vs skew ({cfg.name}, {R} ranks, {run.routing} route)",
    xlabel="skew (Zipf exponent, unitless)", ylabel="imbalance factor max/mean (unitless)",
    reference=1.0, reference_label="perfect balance")
out.show(fig, "01_imbalance_vs_skew.png")

# %%
fig = plots.plot_rank_load(
    {"hash route": stats["hash"].rank_load, "sort route": stats["sort"].rank_load,
     f"{run.routing} route, skew {p.skew:g}": s1.rank_load},
    f"Rows received per rank ({cfg.name}, {R} ranks x {NL} experts)")
out.show(fig, "01_rank_load.png")

# %%
print(f"skew {p.skew:g}: {s1.summary()}")
print(f"the busiest rank computes {s1.rank_imbalance:.2f}x the mean rank's rows "
      f"({s1.busiest_load} vs {float(s1.rank_load.double().mean()):.1f})")

# %% [markdown]
# ## 4. EPLB what-if: redundant experts
#
# DeepSeek's expert-parallel load balancer (EPLB) gives the hottest experts extra copies
# in spare slots; each copy then serves an equal share of its expert's rows. Every rank
# gets `redundant_slots / R` spare slots. The expert with the highest load per copy gains
# a copy, repeatedly; then all copies are repacked, heaviest first, onto the least-loaded
# rank with a free slot. A replica that would not lower the busiest rank's load is not
# placed (its slot stays empty), so the busiest rank never gets busier (rules in
# `moe_kernels.analysis.eplb`).

# %%
plan = eplb.eplb_whatif(s1.expert_load, R, p.redundant_slots)
print(plan.summary())
fig = plots.plot_rank_load(
    {"before (home placement, no replicas)": plan.load_before,
     f"after (EPLB, {len(plan.replicated)} of {p.redundant_slots} redundant slots used)":
         plan.load_after},
    f"EPLB what-if: rows per rank ({cfg.name}, {run.routing} route, skew {p.skew:g})")
out.show(fig, "01_eplb_rank_load.png")

# %%
fig = plots.plot_slot_map(
    plan.placement, plan.per_copy,
    f"EPLB what-if: expert and rows per copy in each slot "
    f"({R} ranks x {NL}+{p.redundant_slots // R} slots)")
out.show(fig, "01_eplb_placement.png")

# %% [markdown]
# ## What we saw
#
# * The figures above were saved into the figures folder with their parameters in
#   `manifest.json`; rerunning with the same parameters writes the same bytes.
# * Next: `02_dispatch_layouts` turns these routes into the per-rank receive windows and
#   the bytes each channel moves.

# %%
print("\n".join(str(path.name) for path in out.written))
