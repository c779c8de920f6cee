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
# # 03 · Per-rank combine: results back home
#
# Dispatch (notebook 02) left every route's token row in the receive window of the rank
# that owns its expert. Each rank now runs its `NL` local experts on those rows
# (expert_routed, a W8A8 SwiGLU per expert that also multiplies by the routing weight;
# [experts](../docs/design.md#experts)) and must return every result to the rank the
# token came from. The **combine** ([protocol](../docs/design.md#combine)) does it in
# three steps:
#
# 1. **push-back**: the owner writes result row `recv_y[e, slot]` into
#    `routed_y_buf[r_route]` *on the origin rank*, keyed by the `r_route = t·K + k` that
#    travelled with the route;
# 2. **reduce**: each origin sums, per token, the shared expert's output first and then its
#    `K` routed rows in order `k = 0, 1, …` (FP32, one BF16 rounding at the end;
#    [reduce](../docs/design.md#reduce));
# 3. **hc_post**: the hyper-connection **post**-mix of DeepSeek-V4's mHC (the residual is
#    kept as 4 parallel streams; hc_pre folded them into the layer's input, hc_post writes
#    the layer's output back into all 4 with the residual) gives `x_next`
#    ([hc_post](../docs/design.md#hc-post)).
#
# We then check what matters: every rank's `x_next` against the single-card reference;
# the `local` and `gloo` **transports** (an in-process window model, and one process per
# rank over torch.distributed) against each other (they must be bit-identical); a run on
# windows full of garbage (it must not change a bit); and the `pypto` kernels against the
# `torch` reference (within the reference's tolerance,
# [tolerance](../docs/design.md#tolerance)). Footers name each figure's source
# (*computed*: exact CPU computation) and shape.

# %%
# Only the light validation imports happen before the parameters, so bad values fail fast.
from moe_kernels.analysis.params import validate_flag, validate_params, validate_side_run

# %% tags=["parameters"]
preset = "tiny"          # tiny | demo | flash | pro (the batch run uses demo)
ranks = 2                # EP ranks; must divide the preset's n_routed_experts
batch = 64               # decode batch per rank
seq = 2                  # tokens per sequence per step (MTP), T is batch x seq per rank
routing = "hash"         # hash | sort
transport = "local"      # local | gloo: the transport of the run checked against the reference
backend = "torch"        # torch | pypto: the stage backend of that run
compare_gloo = True      # also run the gloo transport (one spawned process per rank)
compare_pypto = False    # also run pypto vs torch on the small shape below (adds ~20 s)
pypto_preset = "tiny"    # preset of the pypto comparison (SIM is slow: keep it small)
pypto_batch = 4          # batch per rank of the pypto comparison
seed = 0                 # fixtures
figures_dir = ".cache/figures-scratch"  # git-ignored scratch; `make run` passes figures/

# %%
p = validate_params(preset=preset, ranks=ranks, batch=batch, seq=seq, routing=routing,
                    transport=transport, backend=backend, seed=seed,
                    figures_dir=figures_dir)
compare_gloo = validate_flag("compare_gloo", compare_gloo)
compare_pypto = validate_flag("compare_pypto", compare_pypto)
p_small = validate_side_run("pypto_", preset=pypto_preset, ranks=ranks, batch=pypto_batch,
                            seq=seq, routing=routing, seed=seed, figures_dir=figures_dir)
cfg, run = p.model, p.run
R, NL, K, T = run.ranks, run.n_local, cfg.num_experts_per_tok, run.tokens
print(f"preset {cfg.name}: D={cfg.hidden_size}, {R} ranks x NL={NL} experts, top-K={K}, "
      f"T={T} tokens per rank; run under test: transport {p.transport}, backend {p.backend}")
print(f"figures -> {p.figures_dir}")

# %%
import torch
from IPython.display import Markdown, display

from moe_kernels.analysis import agreement as ag
from moe_kernels.analysis import combine_views as cv
from moe_kernels.analysis import ep_plots, narrative, plots, review_plots, style
from moe_kernels.analysis.manifest import FigureWriter
from moe_kernels.ep import LocalTransport, run_ep_layer
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.layer import reference_layer
from moe_kernels.reference.hc_post import hc_post

out = FigureWriter(p.figures_dir, "03_per_rank_combine",
                   {**p.as_dict(), "compare_gloo": compare_gloo,
                    "compare_pypto": compare_pypto, "pypto_preset": pypto_preset,
                    "pypto_batch": pypto_batch})
SHAPE = style.run_shape(run)
EP_RUN = f"computed: EP step ({p.transport} transport, {p.backend} stages) on seeded fixtures"

# %% [markdown]
# ## 1. One EP step, and the single-card reference
#
# The seeded fixtures give every rank its tokens and every expert its INT8 weights. The
# reference pushes every rank's tokens through one card holding all experts; the EP run
# splits the experts over `R` ranks and exchanges rows through the `local` transport,
# the symmetric-window model whose windows we can look into afterwards.

# %%
weights = make_weights(cfg, seed)
inputs = make_inputs(run, seed)
ref = reference_layer(run, inputs, weights)
inspectable = LocalTransport()  # kept, so its windows can be read after the step
ep = run_ep_layer(run, inputs, weights, transport=inspectable, backend=p.backend)
layout = ep.layout
print(f"EP step done: {int(layout.placed.sum())} routes placed, "
      f"{int(ep.dropped.sum())} dropped; x_next {tuple(ep.x_next.shape)}")

# %% [markdown]
# ## 2. Push-back: which rows came from where
#
# Every origin rank owns a `routed_y_buf` of `T·K` rows, one per route. Row `t·K + k` is
# written by exactly one rank: the one owning the expert that token `t` picked in its
# `k`-th choice. Below, each origin's buffer as a `K × T` grid, coloured by the rank that
# computed and pushed the row (the same rank colours as in every figure; cells carry the
# global expert when there are few).

# %%
sources = cv.row_sources(layout)
title = "routed_y_buf rows, coloured by the rank that computed and returned them"
fig = ep_plots.plot_row_sources(sources.owner, sources.expert, title)
out.show(fig, "03_pushback_rows.png", title, source=EP_RUN, shape=SHAPE)

# %%
moved = sources.rows_from()
for o in range(R):
    print(f"origin rank {o}: rows pushed back by each rank {moved[o].tolist()} "
          f"(from itself: {int(moved[o, o])}, across links: "
          f"{int(moved[o].sum() - moved[o, o])})")

# %% [markdown]
# The owner walks its window exactly as the protocol's push-back does: for each origin
# rank in order, each local expert, the slots `[src_off, src_off + n)` that origin's
# routes took (the same prefix offsets as the dispatch), and sends each row to the
# `r_route` stored beside it. The first rows of rank 0's walk:

# %%
walk = cv.pushback_rows(layout, 0)
print("\n".join(str(row) for row in walk[:12]))
print(f"... {len(walk)} rows in all" if len(walk) > 12 else "")

# %% [markdown]
# ## 3. routed_y_buf and the reduce
#
# After the combine barrier each rank's `routed_y_buf` is complete: every row was written
# in this step, so the buffer needs no clearing. The reduce adds, per token, the shared
# expert's output and the `K` routed rows (each already scaled by its routing weight).
# Their sizes per token on rank 0:

# %%
bufs = torch.stack([inspectable.windows.local(r_, "routed_y_buf").clone() for r_ in range(R)])
sh = ep.stages["sh"]
terms = cv.reduce_terms(sh[0], bufs[0], K)
n_show = min(T, ep_plots.TOKENS_SHOWN)
series = {"shared expert sh": terms[:n_show, 0].tolist()}
series.update({f"routed k={j}": terms[:n_show, 1 + j].tolist() for j in range(K)})
share = float(terms[:, 0].mean() / terms[:, 1:].mean())
fig = plots.plot_lines(range(n_show), series,
                       f"Reduce terms on rank 0: the shared expert's is {share:.1f}x a "
                       f"routed one (mean RMS)",
                       xlabel="token t on rank 0", ylabel="RMS over D of the term (BF16 units)")
out.show(fig, "03_reduce_terms.png", source=EP_RUN, shape=SHAPE)

# %% [markdown]
# The reduce is part of the contract: `ffn_out = bf16(sh + y_0 + … + y_{K−1})`, summed
# in FP32 in that order and rounded to BF16 once. Recomputing it from the buffers
# reproduces the EP run's `ffn_out` bit for bit. The two variants beside it show what the
# contract protects against: a different summation order (with FP32 partial sums and
# one final rounding this rarely, if ever, changes a BF16 result) and BF16 accumulation,
# rounding after every add, which changes a large share of the elements. A backend must
# accumulate in FP32 and round once, in the contract's order, to stay bit-identical.

# %%
checks = [cv.reduce_check(sh[r_], bufs[r_], K, ep.stages["ffn_out"][r_]) for r_ in range(R)]
for r_, chk in enumerate(checks):
    print(f"rank {r_}: {chk.summary()}")

# %% [markdown]
# Last, hc_post mixes `ffn_out` back into the 4 hyper-connection streams with the
# residual `x_hc`: `x_next[o] = bf16(post[o]·ffn_out + Σ_i comb[i,o]·x_hc[i])`.

# %%
for r_ in range(R):
    again = hc_post(ep.stages["ffn_out"][r_], inputs.x_hc[r_], ep.stages["post"][r_],
                    ep.stages["comb"][r_])
    print(f"rank {r_}: hc_post(ffn_out, x_hc, post, comb) == x_next: "
          f"{torch.equal(again, ep.x_next[r_])}")

# %% [markdown]
# ## 4. Agreement: the EP run, the transports, poisoned windows and the backends
#
# * **EP vs reference**: the EP program must give the single-card answer on every rank.
# * **gloo**: one spawned process per rank, torch.distributed collectives instead of
#   windows. It moves the same rows, so its `x_next` must be bit-identical to `local`'s.
# * **poisoned windows**: the `local` transport fills every window with garbage first
#   (NaN / huge payloads, random counts, stale epochs). The protocol reads only what it
#   wrote in this step, so nothing may change.
# * **pypto vs torch**: the pypto stage kernels (CPU interpreter, SIM mode) against the
#   torch reference on a small shape, within the `x_next` tolerance of the reference's
#   comparator `ratio_reldiff` (`diff_thd = 0.003`, at most `pct_thd = 5 %` of the
#   elements over it).
#
# One figure holds all of them as a **margin to the tolerance**: each dot is one rank's
# worst element, its error divided by the comparator's threshold (1 = the threshold).
# Bit-identical runs have no error at all and sit at the left edge.

# %%
under_test = ep if p.transport == "local" else run_ep_layer(
    run, inputs, weights, transport=p.transport, backend=p.backend)
comparisons = [ag.compare(f"EP ({p.transport}, {p.backend}) vs reference",
                          under_test.x_next, ref.x_next)]
if compare_gloo or p.transport == "gloo":
    gloo = under_test if p.transport == "gloo" else run_ep_layer(
        run, inputs, weights, transport="gloo", backend=p.backend)
    comparisons.append(ag.compare("gloo vs local", gloo.x_next, ep.x_next))
poisoned = run_ep_layer(run, inputs, weights, transport=LocalTransport(poison=True),
                        backend=p.backend)
comparisons.append(ag.compare("poisoned windows vs clean", poisoned.x_next, ep.x_next))
for c in comparisons:
    print(c.summary())

# %% [markdown]
# The pypto comparison runs the whole EP step twice on the small shape (`pypto_preset`,
# `pypto_batch`): once with the torch stages, once with the pypto kernels in SIM mode,
# whose CPU interpreter takes a second or two per stage call. It is off by default to
# keep interactive runs fast (the batch run turns it on). Its first use on a machine
# also builds pypto's CPU interpreter (about a minute, cached afterwards). Its figure
# shows every element's error as a share of the threshold.

# %%
if compare_pypto:
    run_s = p_small.run
    w_s, in_s = make_weights(p_small.model, seed), make_inputs(run_s, seed)
    torch_s = run_ep_layer(run_s, in_s, w_s, backend="torch")
    pypto_s = run_ep_layer(run_s, in_s, w_s, backend="pypto")
    vs_pypto = ag.compare(f"pypto vs torch ({run_s.model.name}, B={run_s.batch})",
                          pypto_s.x_next, torch_s.x_next)
    comparisons.append(vs_pypto)
    print(vs_pypto.summary())
    ratio = ag.error_ratio(pypto_s.x_next, torch_s.x_next, ag.X_NEXT_DIFF_THD)
    exact = int((ratio == 0).sum())
    fig = review_plots.plot_error_ratio_hist(
        ratio, f"pypto vs torch: {exact:,} of {ratio.numel():,} x_next elements exact, "
               f"the worst at {float(ratio.max()):.2g}x the threshold", ag.X_NEXT_PCT_THD)
    out.show(fig, "03_pypto_vs_torch.png",
             source="computed: pypto kernels (CPU interpreter) vs torch reference",
             shape=style.run_shape(run_s))
else:
    print("(compare_pypto = False: pypto comparison skipped)")

# %%
print(ag.comparison_table(comparisons))
fig = review_plots.plot_agreement_margin(
    comparisons, "Agreement: every comparison's worst error against the tolerance")
out.show(fig, "03_agreement_margin.png", source=EP_RUN, shape=SHAPE)

# %%
display(Markdown(narrative.combine_findings(comparisons, checks, moved.tolist())))

# %%
print("\n".join(str(path.name) for path in out.written))
