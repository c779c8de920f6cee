"""The `gloo` transport (one process per rank, torch.distributed): bit-identical to the
`local` transport and the reference, poison-proof, capacity handling, and a rank that
never arrives failing within the timeout without leaving processes behind.

Spawning is slow (each child imports torch), so one 2-rank world is reused by the whole
module, and shapes are tiny."""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import pytest
from bitwise import assert_same_result, same_bytes

from moe_kernels.config import RunConfig, get_preset
from moe_kernels.ep import CapacityError, run_ep_layer
from moe_kernels.ep.dist import DistTimeoutError
from moe_kernels.ep.faults import FaultyBackends
from moe_kernels.ep.procs import SpawnedWorld
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.layer import reference_layer


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes only once reaped; check its state
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def weights():
    return make_weights(get_preset("tiny"))


@pytest.fixture(scope="module")
def world():
    with SpawnedWorld(2, timeout=30.0) as w:
        yield w
    assert not any(alive(p) for p in w.pids)


def tiny_run(ranks: int, routing: str = "hash", **kw) -> RunConfig:
    return RunConfig(model=get_preset("tiny"), batch=4, seq=2, ranks=ranks,
                     routing=routing, **kw)


@pytest.mark.parametrize("routing", ["hash", "sort"])
def test_gloo_equals_local_and_reference(world, weights, routing: str) -> None:
    run = tiny_run(2, routing)
    inputs = make_inputs(run, seed=5)
    g1 = run_ep_layer(run, inputs, weights, transport=world)
    g2 = run_ep_layer(run, inputs, weights, transport=world)
    local = run_ep_layer(run, inputs, weights, transport="local")
    assert_same_result(g1, local, layouts=True)
    assert_same_result(g1, g2, layouts=True)
    ref = reference_layer(run, inputs, weights)
    assert same_bytes(g1.x_next, ref.x_next)


def test_gloo_poison_gives_identical_bytes(world, weights) -> None:
    run = tiny_run(2)
    inputs = make_inputs(run, seed=6)
    assert_same_result(run_ep_layer(run, inputs, weights, transport=world, poison=True),
                       run_ep_layer(run, inputs, weights, transport=world), layouts=True)


def test_gloo_drop_mode_equals_local(world, weights) -> None:
    run = tiny_run(2, recv_capacity=2)
    inputs = make_inputs(run)
    g = run_ep_layer(run, inputs, weights, transport=world, overflow="drop")
    assert int(g.dropped.sum()) > 0
    assert_same_result(g, run_ep_layer(run, inputs, weights, overflow="drop"), layouts=True)


def test_gloo_capacity_error_keeps_the_world(world, weights) -> None:
    run = tiny_run(2, recv_capacity=2)
    with pytest.raises(CapacityError, match=r"rank \d.*count=\d+.*capacity=2"):
        run_ep_layer(run, make_inputs(run), weights, transport=world)
    ok = tiny_run(2)
    run_ep_layer(ok, make_inputs(ok), weights, transport=world)  # still usable


def test_run_ep_layer_gloo_four_ranks(weights) -> None:
    run = tiny_run(4, "sort")
    inputs = make_inputs(run, seed=2)
    assert_same_result(run_ep_layer(run, inputs, weights, transport="gloo", timeout=30.0),
                       run_ep_layer(run, inputs, weights, transport="local"), layouts=True)


def test_rank_that_never_arrives_times_out_and_leaves_no_process(weights) -> None:
    """... nor any temp folder (multiprocessing's pymp-* folders of killed ranks)."""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("pymp-*"))
    timeout = 3.0
    run = tiny_run(2)
    inputs = make_inputs(run)
    w = SpawnedWorld(2, timeout=timeout)
    with w:
        pids, world_tmp = w.pids, w.tmpdir
        t0 = time.monotonic()
        with pytest.raises(DistTimeoutError, match=r"timeout 3 s.*rank 0.*ranks \[1\] never"):
            run_ep_layer(run, inputs, weights, transport=w,
                         backend=FaultyBackends(rank=1, kind="hang"))
        elapsed = time.monotonic() - t0
    assert elapsed < timeout + 10, elapsed
    assert not any(alive(p) for p in pids)
    own = multiprocessing.current_process()._config.get("tempdir")  # removed at our exit
    assert not {str(p) for p in set(tmp.glob("pymp-*")) - before} - {own}
    assert world_tmp and not Path(world_tmp).exists()


@pytest.mark.parametrize("ranks", [1, 8])
def test_gloo_one_and_eight_ranks_poisoned_equal_local_and_reference(weights,
                                                                     ranks: int) -> None:
    run = tiny_run(ranks)
    inputs = make_inputs(run, seed=7)
    g = run_ep_layer(run, inputs, weights, transport="gloo", poison=True, timeout=60.0)
    assert_same_result(g, run_ep_layer(run, inputs, weights), layouts=True)
    assert same_bytes(g.x_next, reference_layer(run, inputs, weights).x_next)


def test_rank_that_exits_fails_the_step_and_leaves_no_process(weights) -> None:
    run = tiny_run(2)
    with SpawnedWorld(2, timeout=10.0) as w:
        pids = w.pids
        with pytest.raises(DistTimeoutError, match=r"rank 1 process exited with code 3"):
            run_ep_layer(run, make_inputs(run), weights, transport=w,
                         backend=FaultyBackends(rank=1, kind="exit"))
        assert not w.procs  # the world closed itself: its group is broken
    assert not any(alive(p) for p in pids)
