"""Presets (spec §1.1, §1.3) and validation errors that name the parameter."""
import dataclasses

import pytest

from moe_kernels.config import PRESETS, ConfigError, RunConfig, get_preset


def test_demo_preset_matches_effective_ep_demo_sizes():
    run = RunConfig(get_preset("demo"), batch=64, seq=2, ranks=2)
    assert (run.tokens, run.n_local, run.recv_max) == (128, 8, 128)   # spec §1.3
    assert run.model.mix_hc == 24 and run.model.hc_dim == 16384
    assert run.layer_id == 0 and run.routing == "hash"


def test_flash_recv_max_matches_spec_formula():
    run = RunConfig(get_preset("flash"), batch=64, seq=2, ranks=16, routing="sort")
    assert run.recv_max == 192                                         # spec §1.2
    assert run.layer_id == 3


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["demo"].hidden_size = 1  # type: ignore[misc]


def test_recv_capacity_override():
    assert RunConfig(get_preset("tiny"), batch=2, seq=2, recv_capacity=3).recv_max == 3


@pytest.mark.parametrize("kwargs,needle", [
    ({"ranks": 3}, "ranks must divide n_routed_experts"),
    ({"ranks": 0}, "ranks must be a positive integer"),
    ({"batch": -1}, "batch must be a positive integer"),
    ({"seq": 0}, "seq must be a positive integer"),
    ({"routing": "topk"}, "routing must be one of"),
    ({"recv_capacity": 0}, "recv_capacity must be a positive integer"),
])
def test_run_validation_names_parameter(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(get_preset("tiny"), **kwargs)


def test_ranks_error_lists_valid_values():
    with pytest.raises(ConfigError, match=r"valid: \[1, 2, 4, 8, 16\]"):
        RunConfig(get_preset("demo"), ranks=5)


def test_hash_routing_needs_hash_layers():
    with pytest.raises(ConfigError, match="num_hash_layers"):
        RunConfig(get_preset("demo", num_hash_layers=0), routing="hash")


@pytest.mark.parametrize("override,needle", [
    ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"moe_intermediate_size": -4}, "moe_intermediate_size"),
    ({"n_routed_experts": 0}, "n_routed_experts"),
    ({"swiglu_limit": -1.0}, "swiglu_limit"),
])
def test_model_validation_names_parameter(override, needle):
    with pytest.raises(ConfigError, match=needle):
        get_preset("tiny", **override)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"\['demo', 'flash', 'pro', 'tiny'\]"):
        get_preset("huge")


def test_unknown_override_field():
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        get_preset("tiny", hiden_size=3)


def test_run_dict_round_trip():
    run = RunConfig(get_preset("tiny"), batch=3, seq=2, ranks=4, routing="sort",
                    recv_capacity=9)
    assert RunConfig.from_dict(run.to_dict()) == run
