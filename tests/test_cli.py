"""The command line: layer summary, dump keys, errors naming the parameter."""
import torch

from moe_kernels.cli import main, parse_sweep_values
from moe_kernels.layer import STAGE_KEYS

WEIGHT_KEYS = {"hc_fn", "hc_scale", "hc_base", "norm_w", "gate_w", "gate_bias", "tid2eid",
               "shared_w1", "shared_w1_scale", "shared_w3", "shared_w3_scale", "shared_w2",
               "shared_w2_scale", "routed_w1", "routed_w1_scale", "routed_w3",
               "routed_w3_scale", "routed_w2", "routed_w2_scale"}


def test_layer_dump_has_the_documented_keys(tmp_path, capsys):
    out = tmp_path / "x.pt"
    assert main(["layer", "--preset", "tiny", "--ranks", "1", "--seed", "0",
                 "--dump", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per-expert load" in text and "wall time" in text
    d = torch.load(out, weights_only=True)
    assert {"config", "inputs", "weights", "stages", "x_next"} <= set(d)
    cfg = d["config"]
    assert cfg["preset"] == "tiny" and cfg["batch"] == 64 and cfg["seq"] == 2
    assert cfg["ranks"] == 1 and cfg["hidden_size"] == 256
    inp = d["inputs"]
    assert inp["x_hc"].shape == (1, 64, 2, 4, 256) and inp["x_hc"].dtype == torch.bfloat16
    assert inp["input_ids"].shape == (1, 64, 2) and inp["input_ids"].dtype == torch.int64
    assert isinstance(inp["layer_id"], int)
    assert set(d["weights"]) == WEIGHT_KEYS
    assert d["weights"]["routed_w1"].shape[0] == 16          # global expert axis
    assert set(d["stages"]) == set(STAGE_KEYS)
    assert all(v.shape[0] == 1 for v in d["stages"].values())
    assert d["x_next"].shape == (1, 64, 2, 4, 256) and d["x_next"].dtype == torch.bfloat16


def test_bad_preset_and_ranks_are_reported(capsys):
    assert main(["layer", "--preset", "huge"]) == 2
    assert "preset must be one of" in capsys.readouterr().err
    assert main(["layer", "--preset", "tiny", "--ranks", "3"]) == 2
    assert "ranks must divide" in capsys.readouterr().err
    assert main(["layer", "--preset", "tiny", "--batch", "0"]) == 2
    assert "batch must be a positive integer" in capsys.readouterr().err


def test_parse_sweep_values():
    assert parse_sweep_values([["skew", "0, 0.5,1"]]) == {"skew": ["0", "0.5", "1"]}


def test_capacity_overflow_is_one_line_naming_rank_expert_count(capsys):
    assert main(["layer", "--preset", "tiny", "--ranks", "2", "--batch", "8",
                 "--capacity", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: receive capacity overflow: rank ")
    assert "count=" in err and "capacity=1" in err and "Traceback" not in err
