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
# Every decode step, the **gate** (the router) of a DeepSeek-V4 Mixture-of-Experts (MoE)
# layer sends each token to `K` of the `E` routed **experts** (small feed-forward
# networks); one (token, expert) pair is a **route**. With expert parallelism (**EP**)
# over `R` **ranks** (devices), rank `r` holds experts `[r·NL, (r+1)·NL)` (`NL = E / R`),
# so routing decides how many rows every rank must receive and compute. The busiest rank
# sets the pace of the whole step. Each rank decodes `T = batch × seq` tokens per step;
# `seq = 2` because DeepSeek-V4 decodes with multi-token prediction (**MTP**: a draft
# token beside each real one). Terms, shapes and math: [docs/design.md](../docs/design.md).
#
# This notebook walks through:
#
# 1. the gate's scores and routing weights ([gate](../docs/design.md#gate));
# 2. the two routes, **hash** (a fixed token-id → experts table) and **sort** (top-K of the
#    biased scores), and the load each puts on experts and ranks;
# 3. a **synthetic skew** that concentrates traffic on hot experts, what it does to the
#    imbalance factor (max / mean), and how close it brings an expert to its receive
#    **capacity** `C` (the slots per expert in a rank's receive window);
# 4. the **drop rate** that skew and the capacity factor set together;
# 5. an **EPLB-style what-if**: replicate the hottest experts into redundant slots and
#    look at the new per-rank load.
#
# All logic lives in `moe_kernels.analysis` (tested); this notebook narrates and plots.
# Every figure's footer names its source (here: *computed*, exact CPU computation) and
# the shape it plots; figures are written to `figures_dir` and listed in its
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
from IPython.display import Markdown, display

from moe_kernels.analysis import eplb, narrative, plots, review_plots, style, whatif
from moe_kernels.analysis import routing as rt
from moe_kernels.analysis import skew as sk
from moe_kernels.analysis.gate_inputs import route_tokens
from moe_kernels.analysis.manifest import FigureWriter

out = FigureWriter(p.figures_dir, "01_routing", p.as_dict())
SHAPE = style.run_shape(run)
GATE = "computed: torch reference hc_pre + gate on seeded fixtures"
SKEWED = "computed: the gate's routes under a synthetic Zipf skew"

# %% [markdown]
# ## 1. Gate scores and routing weights
#
# Each rank runs **hc_pre** (the hyper-connection pre-mix of DeepSeek-V4's mHC: the
# residual is kept as 4 parallel streams, and hc_pre folds them into the layer's input;
# [hc_pre](../docs/design.md#hc-pre)) and the gate on its own tokens, the seeded
# fixtures; only the hc and gate weights are built, not the experts. The gate scores
# every expert with `score = sqrt(softplus(x_norm · gate_w))`. The **sort** route picks
# the top-K of `score + gate_bias`; the **hash** route ignores the scores and looks the
# experts up by token id. Either way the weights use the *unbiased* scores of the chosen
# experts, normalised to sum to `routed_scaling_factor`.

# %%
sample = route_tokens(run, seed)
fig = plots.plot_gate_scores(
    sample.score[0], sample.sort_indices[0],
    f"Gate scores of rank 0's first tokens; circles: the sort route's top-{K}")
out.show(fig, "01_gate_scores.png", source=GATE, shape=SHAPE)

# %% [markdown]
# The routing weights of the two routes differ. The sort route picks the K experts a
# token scores highest, whose scores tend to be close, so its weights cluster around
# `routed_scaling_factor / K`; the hash route's picks ignore the scores and pair high
# with low ones, so its weights spread much wider.

# %%
fig = plots.plot_weight_hist(
    {"hash route": sample.hash_weights, "sort route": sample.sort_weights},
    "Hash-route weights spread wider than sort-route weights")
out.show(fig, "01_routing_weights.png", source=GATE, shape=SHAPE)

# %% [markdown]
# ## 2. Hash vs sort: load per expert and per rank
#
# Counting routes per global expert over every rank's tokens gives the rows each expert
# receives. The dashed line is the receive capacity `C` per expert (`RECV_MAX`); an expert
# above it would overflow its receive window. Experts within 10 % of it are labelled.

# %%
stats = {r_: rt.routing_stats(sample.indices(r_), E, R) for r_ in ("hash", "sort")}
fig = plots.plot_expert_load(
    {f"{r_} route": s.expert_load for r_, s in stats.items()}, NL,
    "Routes per expert without skew, hash vs sort", capacity=run.recv_max)
out.show(fig, "01_hash_vs_sort_expert_load.png", source=GATE, shape=SHAPE)

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
# replacement with probability ∝ `w_e ** skew`). The labels mark experts that come
# within 10 % of the capacity: one more hot token there and routes overflow.

# %%
base = sample.indices(run.routing)
skewed = sk.skew_routing(base, E, p.skew, seed)
s0, s1 = rt.routing_stats(base, E, R), rt.routing_stats(skewed, E, R)
near = whatif.near_overflow(s1.expert_load, run.recv_max)
fig = plots.plot_expert_load(
    {f"{run.routing} route, skew 0": s0.expert_load,
     f"{run.routing} route, skew {p.skew:g}": s1.expert_load}, NL,
    f"Skew {p.skew:g} piles routes onto the hot experts", capacity=run.recv_max)
out.show(fig, "01_skew_expert_load.png", source=SKEWED, shape=SHAPE)
print(narrative.near_overflow_sentence(near, f"skew {p.skew:g}, C = {run.recv_max}"))

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
    "Imbalance grows with skew, per expert far faster than per rank",
    xlabel="skew (Zipf exponent, unitless)", ylabel="imbalance factor max/mean (unitless)",
    reference=1.0, reference_label="perfect balance")
out.show(fig, "01_imbalance_vs_skew.png", source=SKEWED, shape=SHAPE)

# %%
fig = plots.plot_rank_load(
    {"hash route": stats["hash"].rank_load, "sort route": stats["sort"].rank_load,
     f"{run.routing} route, skew {p.skew:g}": s1.rank_load},
    "Rows each rank receives: the busiest rank sets the step")
out.show(fig, "01_rank_load.png", source=SKEWED, shape=SHAPE)

# %%
print(f"skew {p.skew:g}: {s1.summary()}")
print(f"the busiest rank computes {s1.rank_imbalance:.2f}x the mean rank's rows "
      f"({s1.busiest_load} vs {float(s1.rank_load.double().mean()):.1f})")

# %% [markdown]
# ## 4. Skew and capacity together set the drop rate
#
# The **capacity factor** is `C` divided by the mean rows per expert `T·K/NL`. A window
# sized at factor 4 holds four times the average load; skew decides whether the hottest
# expert needs more. With `overflow="drop"`, every route beyond `C` is dropped (it
# contributes zero to its token), so the drop rate is `Σ_g max(0, load_g − C)` over all
# routes. The outlined cell is this run's skew and factor (when both are on the grid).

# %%
drops = whatif.drop_rate_grid(base, E, R, whatif.SKEW_AXIS, whatif.FACTOR_GRID, seed)
fig = review_plots.plot_drop_heatmap(
    drops, f"Drop rate over skew and capacity factor ({run.routing} route)",
    marked=(p.skew, p.capacity_factor))
out.show(fig, "01_drop_rate_skew_capacity.png", source=SKEWED,
         shape=style.shape_label(cfg.name, R, run.tokens, C="factor x T·K/NL"))

# %% [markdown]
# ## 5. EPLB what-if: redundant experts
#
# DeepSeek's expert-parallel load balancer (**EPLB**) gives the hottest experts extra
# copies in spare slots; each copy then serves an equal share of its expert's rows. Every
# rank gets `redundant_slots / R` spare slots. The expert with the highest load per copy
# gains a copy, repeatedly; then all copies are repacked, heaviest first, onto the
# least-loaded rank with a free slot. A replica that would not lower the busiest rank's
# load is not placed (its slot stays empty), so the busiest rank never gets busier (rules
# in `moe_kernels.analysis.eplb`).

# %%
plan = eplb.eplb_whatif(s1.expert_load, R, p.redundant_slots)
print(plan.summary())
fig = plots.plot_rank_load(
    {"before (home placement, no replicas)": plan.load_before,
     f"after (EPLB, {len(plan.replicated)} of {p.redundant_slots} redundant slots used)":
         plan.load_after},
    f"EPLB what-if: rows per rank before and after (skew {p.skew:g})")
out.show(fig, "01_eplb_rank_load.png", source=SKEWED, shape=SHAPE)

# %%
fig = plots.plot_slot_map(
    plan.placement, plan.per_copy,
    "EPLB what-if: which expert each slot holds, and its rows per copy")
out.show(fig, "01_eplb_placement.png", source=SKEWED,
         shape=style.run_shape(run, slots=f"{NL}+{p.redundant_slots // R}/rank"))

# %%
display(Markdown(narrative.routing_findings(
    cfg.name, stats, run.routing, p.skew, s1, run.recv_max, near, drops,
    p.capacity_factor, plan)))

# %%
print("\n".join(str(path.name) for path in out.written))
