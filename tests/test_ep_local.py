"""The EP layer over the `local` transport: bit-exact against the single-card reference
for R in {1, 2, 4, 8} (tiny) and R = 2 (demo), reproducible, poison-proof, capacity
overflow and drop, and a rank that never signals."""
from __future__ import annotations

import time

import pytest
import torch
from bitwise import assert_same_result, same_bytes

from moe_kernels.config import RunConfig, get_preset
from moe_kernels.ep import (
    TRANSPORTS,
    CapacityError,
    LocalTransport,
    WindowTimeoutError,
    run_ep_layer,
)
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.layer import reference_layer


@pytest.fixture(scope="module")
def tiny_weights():
    return make_weights(get_preset("tiny"))


@pytest.fixture(scope="module")
def demo_weights():
    return make_weights(get_preset("demo"))  # ~800 MB, built once for this module


def tiny_run(ranks: int, routing: str = "hash", **kw) -> RunConfig:
    return RunConfig(model=get_preset("tiny"), batch=4, seq=2, ranks=ranks,
                     routing=routing, **kw)


@pytest.mark.parametrize("routing", ["hash", "sort"])
@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_tiny_matches_reference_bit_for_bit(tiny_weights, ranks: int, routing: str) -> None:
    run = tiny_run(ranks, routing)
    inputs = make_inputs(run)
    ref = reference_layer(run, inputs, tiny_weights)
    ep = run_ep_layer(run, inputs, tiny_weights)
    assert ep.x_next.shape == (ranks, 4, 2, 4, 256)
    assert_same_result(ep, ref)
    assert ep.dropped.shape == (ranks, run.n_local)
    assert int(ep.dropped.sum()) == 0
    assert ep.layout.capacity == run.recv_max


@pytest.mark.parametrize("routing, batch", [("hash", 64), ("sort", 16)])
def test_demo_two_ranks_matches_reference(demo_weights, routing: str, batch: int) -> None:
    run = RunConfig(model=get_preset("demo"), batch=batch, seq=2, ranks=2, routing=routing)
    inputs = make_inputs(run)
    assert_same_result(run_ep_layer(run, inputs, demo_weights),
                       reference_layer(run, inputs, demo_weights))


def test_demo_two_ranks_gloo_matches_local_and_reference(demo_weights) -> None:
    """Demo sizes over gloo (children use the caller's thread count: at D = 4096 the
    reference's FP32 matmuls are not bit-identical across thread counts)."""
    run = RunConfig(model=get_preset("demo"), batch=8, seq=2, ranks=2, routing="sort")
    inputs = make_inputs(run, seed=4)
    gloo = run_ep_layer(run, inputs, demo_weights, transport="gloo", timeout=60.0)
    assert_same_result(gloo, reference_layer(run, inputs, demo_weights))
    assert_same_result(gloo, run_ep_layer(run, inputs, demo_weights, transport="local"))


def test_layout_is_compute_layout_and_runs_are_reproducible(tiny_weights) -> None:
    from moe_kernels.ep import compute_layout
    run = tiny_run(4, "sort")
    inputs = make_inputs(run, seed=3)
    a = run_ep_layer(run, inputs, tiny_weights)
    b = run_ep_layer(run, inputs, tiny_weights)
    assert_same_result(a, b)
    lay = compute_layout(a.stages["indices"], run.n_local, run.recv_max)
    for k, v in lay.to_dump().items():
        assert torch.equal(v, a.layout.to_dump()[k]), k
        assert torch.equal(v, b.layout.to_dump()[k]), k


@pytest.mark.parametrize("ranks", [2, 4])
def test_poisoned_windows_give_identical_bytes(tiny_weights, ranks: int) -> None:
    run = tiny_run(ranks)
    inputs = make_inputs(run, seed=1)
    assert_same_result(run_ep_layer(run, inputs, tiny_weights, poison=True),
                       run_ep_layer(run, inputs, tiny_weights))


def test_reused_windows_never_leak_between_steps(tiny_weights) -> None:
    """One transport, several steps with different routings on the same windows
    (review findings R1/R2: stale counts and signals must not pass)."""
    run = tiny_run(4, "sort")
    tr = LocalTransport(timeout=5.0)
    for seed in (0, 1, 2):
        inputs = make_inputs(run, seed=seed)
        assert_same_result(run_ep_layer(run, inputs, tiny_weights, transport=tr),
                           reference_layer(run, inputs, tiny_weights))
    assert tr.epoch == 3


def test_capacity_overflow_error_names_rank_expert_count_capacity(tiny_weights) -> None:
    run = tiny_run(2, recv_capacity=2)
    inputs = make_inputs(run)
    with pytest.raises(CapacityError) as ei:
        run_ep_layer(run, inputs, tiny_weights)
    msg = str(ei.value)
    for word in ("rank ", "local expert ", "count=", "capacity=2"):
        assert word in msg


def test_drop_mode_counts_drops_and_zeroes_their_contribution(tiny_weights) -> None:
    cap = 2
    run = tiny_run(2, recv_capacity=cap)
    inputs = make_inputs(run)
    ep = run_ep_layer(run, inputs, tiny_weights, overflow="drop")
    ref = reference_layer(run, inputs, tiny_weights)
    lay = ep.layout
    total = lay.counts.sum(0)
    assert torch.equal(ep.dropped, torch.clamp(total - cap, min=0))
    assert int(ep.dropped.sum()) > 0
    assert int((lay.slot < 0).sum()) == int(ep.dropped.sum())
    # tokens with no dropped route are exactly the reference; the others lose only the
    # dropped routes (checked against the full-capacity EP run's routed outputs below)
    hit = (lay.slot < 0).any(-1).reshape(2, run.batch, run.seq)
    assert same_bytes(ep.x_next[~hit], ref.x_next[~hit])
    assert not same_bytes(ep.x_next[hit], ref.x_next[hit])
    # ffn_out of a token with all routes dropped is its shared expert output, rounded
    all_dropped = (lay.slot < 0).all(-1).reshape(-1)
    sh = ep.stages["sh"].reshape(-1, 256)
    ffn = ep.stages["ffn_out"].reshape(-1, 256)
    assert same_bytes(ffn[all_dropped], sh[all_dropped].float().to(torch.bfloat16))


def test_silent_rank_times_out_with_clear_error(tiny_weights) -> None:
    run = tiny_run(2)
    inputs = make_inputs(run)
    t0 = time.monotonic()
    with pytest.raises(WindowTimeoutError, match=r"timeout.*rank 0 waits for count_done\[1\]"):
        run_ep_layer(run, inputs, tiny_weights,
                     transport=LocalTransport(timeout=0.3, silent_rank=1))
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("kwargs, match", [
    ({"transport": "mpi"}, "transport must be one of"),
    ({"overflow": "spill"}, "overflow must be one of"),
    ({"timeout": 0}, "timeout"),
    ({"backend": "cuda"}, "backend must be one of"),
])
def test_bad_arguments_fail_fast(tiny_weights, kwargs: dict, match: str) -> None:
    run = tiny_run(2)
    with pytest.raises(ValueError, match=match):
        run_ep_layer(run, make_inputs(run), tiny_weights, **kwargs)
    assert TRANSPORTS == ("local", "gloo")


def test_inputs_shape_mismatch_fails_fast(tiny_weights) -> None:
    with pytest.raises(ValueError, match="x_hc"):
        run_ep_layer(tiny_run(4), make_inputs(tiny_run(2)), tiny_weights)


def test_per_rank_backends_sequence_and_factory(tiny_weights) -> None:
    """One backend per rank (a sequence or a factory rank -> backend): each rank's
    stages go to its own backend, and the result does not change."""
    from moe_kernels.backend import TorchBackend

    class Counting(TorchBackend):
        def __init__(self) -> None:
            self.calls = 0

        def hc_pre(self, *args, **kwargs):
            self.calls += 1
            return TorchBackend.hc_pre(*args, **kwargs)

    run = tiny_run(4)
    inputs = make_inputs(run, seed=8)
    ref = run_ep_layer(run, inputs, tiny_weights)
    backends = [Counting() for _ in range(4)]
    assert_same_result(run_ep_layer(run, inputs, tiny_weights, backend=backends), ref)
    assert [b.calls for b in backends] == [1, 1, 1, 1]
    made: list[int] = []
    assert_same_result(run_ep_layer(run, inputs, tiny_weights,
                                    backend=lambda r: made.append(r) or TorchBackend()), ref)
    assert made == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="one backend per rank"):
        run_ep_layer(run, inputs, tiny_weights, backend=backends[:3])
