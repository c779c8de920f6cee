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
# # 02 · Dispatch layouts: where every route lands
#
# After the gate, every rank knows which `K` experts each of its `T` tokens wants. The
# dispatch (spec §3.4) turns that into rows in the *receive windows* of the ranks that own
# those experts, with no central coordinator: every rank publishes its per-expert counts,
# every rank computes the same prefix sums from the same count table, and each route takes
# `slot = prefix + cursor` in its expert's window. Four payload channels then carry the
# route: the token's INT8 row `x_i8`, its dequant `scale`, the routing `weight` and the
# origin route id `r_route = t·K + k` that the combine uses to send the result back.
#
# This notebook walks through:
#
# 1. the **count tensor** `counts[src, dst, e]` every rank holds after the count exchange;
# 2. the **prefix offsets** `send_offset[src, dst, e] = Σ_{s<src} counts[s, dst, e]`;
# 3. the **slot assignment** and every rank's **receive window**, coloured by source rank;
# 4. the **bytes** each channel moves, per peer;
# 5. **capacity headroom**, and what an **overflow** does (an error, or counted drops).
#
# With `worked_example = True` the routing is the spec's §3.9 worked example (2 ranks,
# 4 tokens, NL = 4, top-2), and the notebook checks every table against the spec.
# All logic lives in `moe_kernels` (tested); this notebook narrates and plots.

# %%
# Only the light validation imports happen before the parameters, so bad values fail fast.
from moe_kernels.analysis.params import validate_factor, validate_flag
from moe_kernels.analysis.params import validate_params

# %% tags=["parameters"]
preset = "tiny"          # tiny | demo | flash | pro (the batch run uses demo)
ranks = 2                # EP ranks; must divide the preset's n_routed_experts
batch = 64               # decode batch per rank
seq = 2                  # tokens per sequence per step (MTP), T is batch x seq per rank
topk = None              # experts per token, None keeps the preset num_experts_per_tok
routing = "hash"         # hash | sort
skew = 0.0               # Zipf exponent of the synthetic hot-expert skew, 0 for none
capacity_factor = 4.0    # receive capacity per expert is factor x mean load (RECV_SAFETY)
overflow_capacity_factor = 1.0  # the overflow demo's reduced capacity, x mean load
worked_example = False   # True: lay out the spec's §3.9 worked example instead
seed = 0                 # fixtures and skew draws
figures_dir = ".cache/figures-scratch"  # git-ignored scratch; `make run` passes figures/

# %%
p = validate_params(preset=preset, ranks=ranks, batch=batch, seq=seq, topk=topk,
                    routing=routing, skew=skew, capacity_factor=capacity_factor,
                    seed=seed, figures_dir=figures_dir)
worked_example = validate_flag("worked_example", worked_example)
overflow_capacity_factor = validate_factor(
    "overflow_capacity_factor", overflow_capacity_factor,
    p.model.n_routed_experts / p.model.num_experts_per_tok, ": E/K, a capacity of R·T rows")
cfg, run = p.model, p.run
print(f"preset {cfg.name}: D={cfg.hidden_size}, E={cfg.n_routed_experts} experts, "
      f"top-K={cfg.num_experts_per_tok}, {run.ranks} ranks x NL={run.n_local}, "
      f"T={run.tokens} tokens per rank, capacity {run.recv_max} rows per expert")
print(f"figures -> {p.figures_dir}")

# %%
from moe_kernels.analysis import ep_plots, plots
from moe_kernels.analysis import layout_views as lv
from moe_kernels.analysis.manifest import FigureWriter
from moe_kernels.ep.examples import check_against_spec

out = FigureWriter(p.figures_dir, "02_dispatch_layouts",
                   {**p.as_dict(), "worked_example": worked_example,
                    "overflow_capacity_factor": overflow_capacity_factor})

# %% [markdown]
# ## 1. The routing and the count tensor
#
# Each rank routes its own tokens (hc_pre and the gate on the seeded fixtures, spec §5.1;
# or the worked example's table). Rank `src` then histograms its `T·K` routes by
# destination bucket `dst·NL + e` and publishes the **full** histogram, zeros included, to
# every rank (the fix of the spec's §3.10 hazard: zero buckets were never written, so a
# stale cell could corrupt the prefix sums). Every rank ends up holding the same count
# tensor; the spec calls its flattened form `pub_counts` (row `src·R + dst`).

# %%
src = lv.layout_inputs(run, seed, p.skew, use_worked_example=worked_example)
layout = src.layout()
R, NL, C, T, K = src.ranks, src.n_local, src.capacity, src.tokens, src.topk
print(f"routing: {src.source}; R={R} ranks, T={T} tokens, K={K}, NL={NL}, capacity C={C}")
if R * R * NL <= 64:
    print(f"pub_counts (row = src·R + dst, columns e0..e{NL - 1}):")
    print(lv.pub_counts(layout))

# %%
fig = ep_plots.plot_expert_matrix(
    layout.counts, f"Count tensor counts[src, dst, e] ({src.source})",
    "routes from src to the expert (count)")
out.show(fig, "02_count_tensor.png")

# %% [markdown]
# ## 2. Prefix offsets: every rank computes the same slots
#
# Within each destination expert, rows are grouped by source rank in ascending order, so
# source `src` starts at `send_offset[src, dst, e] = Σ_{s<src} counts[s, dst, e]` (an
# exclusive prefix sum down each column of the count tensor). The sender uses it as the
# first slot of its rows; the receiver uses the same number to find where a source's rows
# start when it pushes results back. Both read the same count tensor, so they agree
# (spec §3.8). Rank 0 always starts at 0.

# %%
fig = ep_plots.plot_expert_matrix(
    layout.send_offset, f"Prefix offsets send_offset[src, dst, e] ({src.source})",
    "first slot src takes in the expert's window (slot index)")
out.show(fig, "02_prefix_offsets.png")

# %%
print("rows each local expert receives (recv_count, per rank):")
for d in range(R):
    print(f"  rank {d}: {layout.recv_count[d].tolist()}")

# %% [markdown]
# ## 3. Slot assignment and the receive windows
#
# Each rank scans its routes in `t`-major, `k`-minor order and keeps a cursor per bucket:
# `slot = send_offset[src, dst, e] + cursor`, then `cursor += 1`. The route's four channels
# go to window row `e·C + slot` on rank `dst`. Below, the first routes of the last rank,
# whose prefix offsets are non-zero (all routes for the worked example).

# %%
rows = lv.slot_table(layout) if worked_example else lv.slot_table(layout, src=R - 1)[:12]
print("\n".join(str(r_) for r_ in rows))

# %% [markdown]
# Drawing every rank's window as local experts × slots, coloured by the rank that filled
# each slot, shows the src-major grouping directly: within each expert's row, the colours
# come in source-rank order, and the slots past `recv_count` stay empty. They still hold
# whatever an earlier step left there; nothing reads them, because every consumer is
# bounded by the count. When the windows are small the cells carry the `r_route` each
# slot returns its result to.

# %%
src_map, route_map = layout.receive_map()
title = f"Receive windows, coloured by source rank ({src.source})"
fig = ep_plots.plot_receive_windows(src_map, route_map, title)
out.show(fig, "02_receive_windows.png", title)

# %% [markdown]
# For the worked example the windows can be read as the spec lists them, as
# (source rank, r_route) per slot, and every table is compared with the spec's.

# %%
if worked_example:
    print(lv.format_receive_buffers(layout))
    checks = check_against_spec(layout)
    print("matches spec §3.9:", checks)
    assert all(checks.values()), checks
else:
    print("(set worked_example = True to reproduce the spec's §3.9 tables)")

# %% [markdown]
# ## 4. Bytes per peer and per channel
#
# One route moves `D` bytes of `x_i8` and three 32-byte tiles (`scale`, `weight`,
# `r_route`: one FP32 / INT32 value padded to 8 columns, the smallest tile the Ascend
# vector unit moves). The combine sends one BF16 row (`2·D` bytes) back per route, from
# the expert owner to the origin. At DeepSeek sizes `x_i8` and the combine dominate; the
# three side channels add `96 / D` of the payload, but one store each per route.

# %%
per_route = lv.bytes_per_route(src.d_model)
print(f"bytes per route (D={src.d_model}): {per_route}")
cb = lv.channel_bytes(layout, src.d_model)
for row in cb.rows():
    print(f"  {row['channel']:>8}: {row['bytes']:>10,} bytes per step, "
          f"{row['link_bytes']:>10,} of them across links")
print(f"dispatch total {cb.dispatch_total():,} bytes; combine {cb.total('combine'):,} bytes")

# %%
title = f"Bytes per peer and channel (D={src.d_model}, {src.source})"
fig = ep_plots.plot_channel_bytes(cb.per_peer, title)
out.show(fig, "02_bytes_per_peer.png", title)

# %% [markdown]
# ## 5. Capacity headroom
#
# A receive window holds `C` rows per local expert (`RECV_MAX`, spec §1.2: the mean load
# `T·K/NL` times a safety factor). The dashed line is that capacity; each bar is the rows
# routed to one expert. The gap is the headroom a hotter routing may use before the
# window overflows.

# %%
hr = lv.headroom(layout)
print(hr.summary())
fig = plots.plot_expert_load(
    {"rows routed to the expert (demand)": hr.demand.reshape(-1)}, NL,
    f"Receive demand vs capacity per expert ({src.source}, C={C})", capacity=C)
out.show(fig, "02_capacity_headroom.png")

# %% [markdown]
# ## 6. What an overflow does
#
# The spec's kernels never check the capacity on device (§3.8): an over-full expert would
# write past its window. Our layout checks it. Here the same routing is laid out again with
# a reduced capacity, `overflow_capacity_factor` × the mean load. In the default mode,
# `overflow="error"`, the layout raises `CapacityError` naming the rank, the expert
# and the counts. With `overflow="drop"`, the routes beyond capacity (the last ones in
# src-major, scan order) get slot −1, are counted per expert and contribute zero to their
# token's output.

# %%
c_small = lv.capacity_for_factor(T, K, NL, overflow_capacity_factor)
ov = lv.overflow_outcome(src.indices, NL, c_small)
print(ov.summary())

# %%
fig = ep_plots.plot_overflow(ov.placed, ov.dropped, ov.capacity,
                             f"Overflow at capacity {ov.capacity}: placed vs dropped "
                             f"({src.source})")
out.show(fig, "02_overflow_drops.png")

# %% [markdown]
# ## What we saw
#
# * One count tensor, published in full by every rank, fixes every slot: the prefix
#   offsets put source ranks in order inside each expert's window, and the cursor keeps
#   each source's scan order.
# * `x_i8` and the combine carry almost all the bytes; the three padded side channels are
#   small in bytes but cost one store each per route.
# * An over-full window is an error that names the expert, or, when asked, counted drops.
# * Next: `03_per_rank_combine` computes on these windows and pushes the results back.

# %%
print("\n".join(str(path.name) for path in out.written))
