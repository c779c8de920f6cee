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
# After the gate, every rank knows which `K` experts each of its `T` tokens wants (one
# (token, expert) pair is a **route**). The **dispatch**
# ([protocol](../docs/design.md#dispatch)) turns that into rows in the **receive windows**
# of the ranks that own those experts, with no central coordinator: every rank publishes
# its per-expert counts, every rank computes the same prefix sums from the same count
# table, and each route takes `slot = prefix + cursor` in its expert's window. A window
# holds `C` slots per local expert: the **capacity** (`RECV_MAX`), the mean load `T·K/NL`
# times a safety factor. Four payload channels then carry the route: the token's INT8 row
# `x_i8`, its dequant `scale`, the routing `weight` and the origin route id
# `r_route = t·K + k` that the combine uses to send the result back. Terms and shapes:
# [docs/design.md](../docs/design.md).
#
# This notebook walks through:
#
# 1. the **count tensor** `counts[src, dst, e]` every rank holds after the count exchange;
# 2. the **prefix offsets** `send_offset[src, dst, e] = Σ_{s<src} counts[s, dst, e]`;
# 3. the **slot assignment** and every rank's **receive window**, coloured by source rank;
# 4. the **bytes** each channel moves over links, per peer;
# 5. **capacity headroom under skew**, and what an **overflow** does (an error, or
#    counted drops);
# 6. two what-ifs from shapes alone: the windows' **memory footprint** per rank, and
#    **INT8 + scale against BF16** dispatch payloads.
#
# With `worked_example = True` the routing is the design document's
# [worked example](../docs/design.md#worked-example) (2 ranks, 4 tokens, NL = 4, top-2),
# and the notebook checks every table against it. All logic lives in `moe_kernels`
# (tested); this notebook narrates and plots. Footers name each figure's source
# (*computed*: exact CPU computation; *model*: shapes or the communication model).

# %%
# Only the light validation imports happen before the parameters, so bad values fail fast.
from moe_kernels.analysis.params import (
    validate_factor,
    validate_flag,
    validate_params,
    validate_side_run,
)

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
worked_example = False   # True: lay out the design document's worked example instead
offsets_ranks = 4        # EP size of the prefix-offsets figure (offsets are trivial at 2)
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
p4 = validate_side_run("offsets_", preset=preset, ranks=offsets_ranks, batch=batch, seq=seq,
                       topk=topk, routing=routing, skew=skew,
                       capacity_factor=capacity_factor, seed=seed, figures_dir=figures_dir)
cfg, run = p.model, p.run
print(f"preset {cfg.name}: D={cfg.hidden_size}, E={cfg.n_routed_experts} experts, "
      f"top-K={cfg.num_experts_per_tok}, {run.ranks} ranks x NL={run.n_local}, "
      f"T={run.tokens} tokens per rank, capacity {run.recv_max} rows per expert")
print(f"figures -> {p.figures_dir}")

# %%
from IPython.display import Markdown, display

from moe_kernels.analysis import ep_plots, narrative, review_plots, style, whatif
from moe_kernels.analysis import layout_views as lv
from moe_kernels.analysis.gate_inputs import route_tokens
from moe_kernels.analysis.manifest import FigureWriter
from moe_kernels.config import get_preset
from moe_kernels.ep.examples import check_against_spec

out = FigureWriter(p.figures_dir, "02_dispatch_layouts",
                   {**p.as_dict(), "worked_example": worked_example,
                    "overflow_capacity_factor": overflow_capacity_factor,
                    "offsets_ranks": p4.run.ranks})
COMPUTED = "computed: dispatch layout of the gate's routes"

# %% [markdown]
# ## 1. The routing and the count tensor
#
# Each rank routes its own tokens (hc_pre and the gate on the seeded fixtures, or the
# worked example's table). Rank `src` then histograms its `T·K` routes by destination
# bucket `dst·NL + e` and publishes the **full** histogram, zeros included, to every rank
# (the fix of a hazard in the reference: zero buckets were never written, so a stale cell
# could corrupt the prefix sums; [windows](../docs/design.md#windows)). Every rank ends
# up holding the same count tensor, flattened as `pub_counts` (row `src·R + dst`).

# %%
src = lv.layout_inputs(run, seed, p.skew, use_worked_example=worked_example)
layout = src.layout()
R, NL, C, T, K = src.ranks, src.n_local, src.capacity, src.tokens, src.topk
LABEL = "worked example" if worked_example else cfg.name
SHAPE = style.shape_label(LABEL, R, T, C)
print(f"routing: {src.source}; R={R} ranks, T={T} tokens, K={K}, NL={NL}, capacity C={C}")
if R * R * NL <= 64:
    print(f"pub_counts (row = src·R + dst, columns e0..e{NL - 1}):")
    print(lv.pub_counts(layout))

# %%
fig = ep_plots.plot_expert_matrix(
    layout.counts, "Count tensor counts[src, dst, e]: routes from each rank to each expert",
    "routes from src to the expert (count)")
out.show(fig, "02_count_tensor.png", source=COMPUTED, shape=SHAPE)

# %% [markdown]
# ## 2. Prefix offsets: every rank computes the same slots
#
# Within each destination expert, rows are grouped by source rank in ascending order, so
# source `src` starts at `send_offset[src, dst, e] = Σ_{s<src} counts[s, dst, e]` (an
# exclusive prefix sum down each column of the count tensor). The sender uses it as the
# first slot of its rows; the receiver uses the same number to find where a source's
# rows start when it pushes results back. Both read the same count tensor, so they agree.
# Rank 0 always starts at 0, so with 2 ranks the table is a zero row plus a copy of rank
# 0's counts; the figure therefore lays out the same tokens per rank on
# `offsets_ranks` ranks (4 by default), where the offsets accumulate.

# %%
src4 = src if worked_example else lv.layout_inputs(p4.run, seed, p.skew)
layout4 = src4.layout()
fig = ep_plots.plot_expert_matrix(
    layout4.send_offset,
    f"Prefix offsets send_offset[src, dst, e] at R = {src4.ranks}: each source's first slot",
    "first slot of src (index)")
out.show(fig, "02_prefix_offsets.png", source=COMPUTED,
         shape=style.shape_label(LABEL, src4.ranks, src4.tokens, src4.capacity))

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
# each slot (each rank has the same colour in every figure), shows the src-major grouping
# directly: within each expert's row, the colours come in source-rank order, and the
# slots past `recv_count` stay empty. They still hold whatever an earlier step left
# there; nothing reads them, because every consumer is bounded by the count. When the
# windows are small the cells carry the `r_route` each slot returns its result to.

# %%
src_map, route_map = layout.receive_map()
title = "Receive windows: slots filled in source-rank order, the rest empty"
fig = ep_plots.plot_receive_windows(src_map, route_map, title)
out.show(fig, "02_receive_windows.png", title, source=COMPUTED, shape=SHAPE)

# %% [markdown]
# For the worked example the windows can be read as the design document lists them, as
# (source rank, r_route) per slot, and every table is compared with it.

# %%
if worked_example:
    print(lv.format_receive_buffers(layout))
    checks = check_against_spec(layout)
    print("matches the worked example:", checks)
    assert all(checks.values()), checks
else:
    print("(set worked_example = True to reproduce the worked example's tables)")

# %% [markdown]
# ## 4. Bytes per peer and per channel
#
# One route moves `D` bytes of `x_i8` and three 32-byte tiles (`scale`, `weight`,
# `r_route`: one FP32 / INT32 value padded to 8 columns, the smallest tile the Ascend
# vector unit moves). The combine sends one BF16 row (`2·D` bytes) back per route, from
# the expert owner to the origin. A rank's routes to its own experts never cross a link,
# so the figure leaves them out (the diagonal) and shows link traffic only, in KiB.

# %%
per_route = lv.bytes_per_route(src.d_model)
print(f"bytes per route (D={src.d_model}): {per_route}")
cb = lv.channel_bytes(layout, src.d_model)
for row in cb.rows():
    print(f"  {row['channel']:>8}: {row['bytes']:>10,} bytes per step, "
          f"{row['link_bytes']:>10,} of them across links")
print(f"dispatch total {cb.dispatch_total():,} bytes; combine {cb.total('combine'):,} bytes")

# %%
title = f"Link bytes per peer and channel (D = {src.d_model})"
fig = ep_plots.plot_channel_bytes(cb.per_peer, title)
out.show(fig, "02_bytes_per_peer.png", title, source=COMPUTED, shape=SHAPE)

# %% [markdown]
# ## 5. Capacity headroom under skew
#
# Without skew the busiest expert sits well below `C` (notebook 01 shows the loads per
# expert). The question for sizing the window is how much skew it takes to fill it:
# below, the busiest expert's rows as a share of `C`, for both routes, as the synthetic
# skew of notebook 01 grows. Past 100 % routes overflow.

# %%
hr = lv.headroom(layout)
print(hr.summary())
curves = []
if not worked_example:
    sample = route_tokens(run, seed)
    curves = [whatif.headroom_curve(f"{r_} route", sample.indices(r_).to(src.indices.dtype),
                                    cfg.n_routed_experts, C, whatif.SKEW_AXIS, seed)
              for r_ in ("hash", "sort")]
    fig = review_plots.plot_headroom(curves, "Headroom under skew: when the busiest "
                                             "expert fills its window")
    out.show(fig, "02_capacity_headroom.png",
             source="computed: the gate's routes under a synthetic Zipf skew", shape=SHAPE)
    for c in curves:
        print(f"{c.label}: busiest expert {c.peak_load} rows over skews {c.skews}")

# %% [markdown]
# ## 6. What an overflow does
#
# The reference kernels never check the capacity on device: an over-full expert would
# write past its window. Our layout checks it. Here the same routing is laid out again
# with a reduced capacity, `overflow_capacity_factor` × the mean load. In the default
# mode, `overflow="error"`, the layout raises `CapacityError` naming the rank, the expert
# and the counts. With `overflow="drop"`, the routes beyond capacity (the last ones in
# src-major, scan order) get slot −1, are counted per expert and contribute zero to their
# token's output.

# %%
c_small = lv.capacity_for_factor(T, K, NL, overflow_capacity_factor)
ov = lv.overflow_outcome(src.indices, NL, c_small)
print(ov.summary())

# %%
fig = ep_plots.plot_overflow(ov.placed, ov.dropped, ov.capacity,
                             f"At capacity {ov.capacity}, routes beyond it are dropped")
out.show(fig, "02_overflow_drops.png", source=COMPUTED,
         shape=style.shape_label(LABEL, R, T, ov.capacity))

# %% [markdown]
# ## 7. What-if: memory footprint per rank
#
# Computed from shapes alone (no weights): each rank allocates a receive window of
# `NL · C` rows of `D + 3·32` bytes, and a count table `pub_counts` of `R·R·NL` INT32
# (`= R·E·4` bytes). Because `NL · C = T·K · factor`, the window does not depend on `R`
# until `C` reaches the `R·T` rows that can arrive at all. Below for the demo, flash and
# pro presets at this run's tokens per rank.

# %%
presets = [get_preset(n) for n in whatif.WHATIF_PRESETS]
foot = {(m.name, r_): [whatif.footprint(m, r_, T, f) for f in whatif.FACTOR_GRID]
        for m in presets for r_ in whatif.RANKS_AXIS}
fig = review_plots.plot_footprint(
    foot, whatif.FACTOR_GRID,
    "What-if: the window grows with the capacity factor; the count table with R")
out.show(fig, "02_footprint.png", source="model: window shapes (ep/windows.py), no weights",
         shape=style.shape_label("demo, flash, pro", "2-16", T, C="factor x T·K/NL"))
for m in presets:
    f4 = whatif.footprint(m, 8, T, 4.0)
    print(f"{m.name:>5}, R=8, factor 4: window {f4.window_bytes / 2**20:.1f} MiB, "
          f"count table {f4.count_bytes / 1024:.1f} KiB, routed_y_buf "
          f"{f4.combine_bytes / 2**20:.1f} MiB per rank")

# %% [markdown]
# ## 8. What-if: INT8 + scale against BF16 dispatch
#
# The dispatch sends each route's row as INT8 plus an FP32 scale tile. Sending BF16 rows
# instead would double the row bytes and drop the scale. Bytes are exact; the time is the
# communication model of `moe_kernels.analysis.comm` (A3 SuperPoD UB bandwidth per die, an
# assumed 1 us per message, one message per peer, and a per-call overhead fitted on
# DeepEP-Ascend's EP8 point): a **model**, not a measurement. Uniform routing, this run's
# tokens per rank.

# %%
payload = [whatif.payload_point(m, r_, T) for m in presets for r_ in whatif.RANKS_AXIS]
fig = review_plots.plot_payload(
    payload, "What-if: INT8 + scale halves dispatch bytes, not dispatch time")
out.show(fig, "02_payload_int8_vs_bf16.png",
         source="model: alpha-beta comm (A3 UB 196 GB/s, 1 us/msg, EP8-fitted overhead)",
         shape=style.shape_label("demo, flash, pro", "2-16", T, routing="uniform"))
for pt in payload:
    print(f"{pt.preset:>5} R={pt.ranks:>2}: {pt.int8_bytes / 2**20:6.2f} vs "
          f"{pt.bf16_bytes / 2**20:6.2f} MiB ({pt.bytes_saved_pct:.0f} % fewer), "
          f"{pt.int8_us:6.1f} vs {pt.bf16_us:6.1f} us ({pt.time_saved_pct:.0f} % less)")

# %%
here = next((pt for pt in payload if pt.preset == cfg.name and pt.ranks == R), None)
display(Markdown(narrative.dispatch_findings(src.source, cb, hr, ov, curves, here)))

# %%
print("\n".join(str(path.name) for path in out.written))
