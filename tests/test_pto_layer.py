"""The whole layer with pypto stage kernels matches the torch backend within the spec's
x_next tolerance (ratio_reldiff 3e-3 / 5 %, spec §5.3): R=1 single card, R=2 EP."""
import pytest
import torch

from moe_kernels.backend import get_backend
from moe_kernels.config import RunConfig, get_preset
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.layer import reference_layer
from moe_kernels.numerics import ratio_reldiff

pytestmark = pytest.mark.pypto
pytest.importorskip("moe_kernels.pto.backend")

#: spec §5.3, x_next of moe_ep at 60d25e5f and later
X_NEXT_DIFF_THD, X_NEXT_PCT_THD = 3e-3, 0.05


@pytest.fixture(scope="module")
def tiny_weights():
    return make_weights(get_preset("tiny"), seed=0)


@pytest.mark.parametrize("routing", ["hash", "sort"])
def test_layer_r1_pypto_matches_torch(tiny_weights, routing):
    run = RunConfig(get_preset("tiny"), batch=4, seq=2, ranks=1, routing=routing)
    inputs = make_inputs(run, seed=0)
    be = get_backend("pypto")
    got = reference_layer(run, inputs, tiny_weights, backend=be)
    want = reference_layer(run, inputs, tiny_weights)
    assert got.x_next.dtype == torch.bfloat16 and got.x_next.shape == want.x_next.shape
    res = ratio_reldiff(got.x_next, want.x_next, X_NEXT_DIFF_THD, X_NEXT_PCT_THD)
    assert res.passed, str(res)
    # routing is integer work on exact inputs: the same experts are picked
    assert torch.equal(got.stages["indices"], want.stages["indices"])
    stages = [s for s, _ in be.latencies]
    assert {"hc_pre", "gate", "expert_shared", "expert_routed", "scatter_routes",
            "reduce_routes", "hc_post"} <= set(stages)
    assert all(lat is not None and lat.aicore_us > 0 for _, lat in be.latencies)


def test_layer_r2_ep_pypto_matches_torch(tiny_weights):
    ep = pytest.importorskip("moe_kernels.ep")
    run = RunConfig(get_preset("tiny"), batch=4, seq=2, ranks=2, routing="hash")
    inputs = make_inputs(run, seed=1)
    got = ep.run_ep_layer(run, inputs, tiny_weights, transport="local", backend="pypto")
    want = reference_layer(run, inputs, tiny_weights)
    res = ratio_reldiff(got.x_next, want.x_next, X_NEXT_DIFF_THD, X_NEXT_PCT_THD)
    assert res.passed, str(res)
