"""Notebook parameter validation, and the cheap gate inputs vs the full fixtures."""
import pytest
import torch

from moe_kernels.analysis.gate_inputs import GateWeights, gate_weights, route_tokens
from moe_kernels.analysis.params import (
    REPO_ROOT,
    ParameterError,
    resolve_figures_dir,
    validate_params,
)
from moe_kernels.config import RunConfig, get_preset
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.layer import reference_layer

GOOD = dict(preset="tiny", ranks=2, batch=4, seq=2, seed=0, figures_dir="build/f",
            routing="hash", topk=None, skew=0.5, capacity_factor=4.0, transport="local",
            backend="torch", redundant_slots=2)


def test_good_parameters_build_configs():
    p = validate_params(**GOOD)
    assert p.run.ranks == 2 and p.run.tokens == 8 and p.run.recv_safety == 4
    assert p.figures_dir == REPO_ROOT / "build" / "f"
    d = p.as_dict()
    assert d["topk"] == 2 and d["skew"] == 0.5 and "figures_dir" not in d
    p = validate_params(**{**GOOD, "topk": 4, "capacity_factor": 1.5})
    # T*K/NL * factor = 8*4/8 * 1.5 = 6
    assert p.model.num_experts_per_tok == 4 and p.run.recv_max == 6


@pytest.mark.parametrize("name,value,allowed", [
    ("preset", "huge", "demo"),
    ("ranks", 3, "[1, 2, 4, 8, 16]"),
    ("ranks", 0, "divisor"),
    ("batch", 0, "positive integer"),
    ("seq", 1.5, "positive integer"),
    ("topk", 17, "[1, 16]"),
    ("routing", "top", "['hash', 'sort']"),
    ("skew", -0.1, ">= 0"),
    ("capacity_factor", 0, "> 0"),
    ("transport", "mpi", "['local', 'gloo']"),
    ("backend", "cuda", "['torch', 'pypto']"),
    ("seed", -1, ">= 0"),
    ("figures_dir", "", "non-empty"),
    ("redundant_slots", 3, "multiple of ranks"),
])
def test_bad_parameter_names_parameter_value_and_allowed(name, value, allowed):
    with pytest.raises(ParameterError) as err:
        validate_params(**{**GOOD, name: value})
    msg = str(err.value)
    assert f"{name}={value!r}" in msg and allowed in msg and err.value.name == name


def test_resolve_figures_dir_absolute(tmp_path):
    assert resolve_figures_dir(tmp_path) == tmp_path


@pytest.mark.parametrize("seed", [0, 3])
def test_gate_weights_match_make_weights(seed):
    cfg = get_preset("tiny")
    full, cheap = make_weights(cfg, seed), gate_weights(cfg, seed)
    for f in GateWeights.__dataclass_fields__:
        assert torch.equal(getattr(full, f), getattr(cheap, f)), f


@pytest.mark.parametrize("routing", ["hash", "sort"])
def test_route_tokens_matches_reference_layer(routing):
    run = RunConfig(get_preset("tiny"), batch=2, seq=2, ranks=2, routing=routing)
    ref = reference_layer(run, make_inputs(run, 1), make_weights(run.model, 1))
    sample = route_tokens(run, 1)
    assert torch.equal(sample.indices(routing), ref.stages["indices"])
    assert torch.equal(sample.weights(routing), ref.stages["weights"])
    assert sample.score.shape == (2, 4, 16)
