"""The --dump format: checksums of every tensor, atomic writes, replay exit codes."""
import os
from pathlib import Path

import pytest
import torch

from moe_kernels import __version__
from moe_kernels import dump as dump_mod
from moe_kernels.cli import main
from moe_kernels.config import RunConfig, get_preset
from moe_kernels.dump import DumpError, load_dump, save_dump, tensor_sha256
from moe_kernels.fixtures import make_inputs, make_weights
from moe_kernels.layer import reference_layer


@pytest.fixture(scope="module")
def tiny_dump(tmp_path_factory) -> Path:
    """A single-card tiny run (2 ranks of tokens, batch 2, seq 1) written by the CLI."""
    path = tmp_path_factory.mktemp("dump") / "run.pt"
    assert main(["layer", "--preset", "tiny", "--ranks", "2", "--batch", "2", "--seq", "1",
                 "--seed", "5", "--dump", str(path)]) == 0
    return path


def _resave(src: Path, dst: Path, edit) -> Path:
    d = torch.load(src, weights_only=True)
    edit(d)
    torch.save(d, dst)
    return dst


def test_config_records_seed_overflow_version_and_checksums(tiny_dump):
    d = load_dump(tiny_dump)
    cfg = d["config"]
    assert cfg["seed"] == 5 and cfg["overflow"] == "error"
    assert cfg["package_version"] == __version__ and cfg["format"] == dump_mod.DUMP_FORMAT
    assert cfg["transport"] == "local" and cfg["backend"] == "torch"
    sums = cfg["checksums"]
    assert sums["x_next"] == tensor_sha256(d["x_next"])
    assert sums["weights/routed_w1"] == tensor_sha256(d["weights"]["routed_w1"])
    assert {"inputs/x_hc", "inputs/input_ids", "stages/indices"} <= set(sums)


def test_one_flipped_byte_names_the_corrupt_tensor(tiny_dump, tmp_path):
    def flip(d):
        d["weights"]["routed_w2"].view(-1)[123] ^= 1
    bad = _resave(tiny_dump, tmp_path / "bad.pt", flip)
    with pytest.raises(DumpError, match="tensor weights/routed_w2 fails its sha256"):
        load_dump(bad)
    assert main(["replay", str(bad)]) == 2


def test_flipped_byte_in_the_file_is_refused(tiny_dump, tmp_path):
    raw = bytearray(tiny_dump.read_bytes())
    x_next = load_dump(tiny_dump)["x_next"]
    # find x_next's bytes in the file (torch stores storages uncompressed) and flip one
    needle = bytes(x_next.contiguous().view(torch.uint8).reshape(-1)[:64].tolist())
    at = raw.find(needle)
    assert at > 0
    raw[at + 10] ^= 0x40
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DumpError):
        load_dump(bad)


def test_dump_without_checksums_or_foreign_or_truncated_is_refused(tiny_dump, tmp_path):
    no_sums = _resave(tiny_dump, tmp_path / "old.pt", lambda d: d["config"].pop("checksums"))
    with pytest.raises(DumpError, match="no checksums"):
        load_dump(no_sums)
    foreign = tmp_path / "x.pt"
    torch.save({"x": torch.zeros(1)}, foreign)
    with pytest.raises(DumpError, match="missing keys"):
        load_dump(foreign)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_dump.read_bytes()[:4000])
    with pytest.raises(DumpError, match="truncated or foreign"):
        load_dump(cut)


def test_replay_exit_codes(tiny_dump, tmp_path, capsys):
    assert main(["replay", str(tiny_dump)]) == 0
    assert "identical bit for bit" in capsys.readouterr().out

    def change_x_next(d):  # a consistent dump whose x_next the layer does not produce
        d["x_next"].view(torch.int16).view(-1)[0] += 1
        d["config"]["checksums"]["x_next"] = tensor_sha256(d["x_next"])
    other = _resave(tiny_dump, tmp_path / "other.pt", change_x_next)
    assert main(["replay", str(other)]) == 1
    out = capsys.readouterr().out.strip()
    assert "differs from the dump at 1 of" in out and len(out.splitlines()) == 1
    foreign = tmp_path / "foreign.pt"
    foreign.write_text("not a dump")
    assert main(["replay", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["replay", str(tmp_path / "missing.pt")]) == 2


def test_ep_dump_replays_over_its_transport(tmp_path, capsys):
    path = tmp_path / "ep.pt"
    assert main(["layer", "--preset", "tiny", "--ranks", "2", "--batch", "2", "--seq", "1",
                 "--transport", "local", "--dump", str(path)]) == 0
    d = load_dump(path)
    assert d["config"]["transport"] == "local" and "layout" in d
    assert main(["replay", str(path)]) == 0


def test_interrupted_write_leaves_no_file_at_the_path(tmp_path, monkeypatch):
    run = RunConfig(get_preset("tiny"), batch=2, seq=1)
    weights, inputs = make_weights(run.model, 0), make_inputs(run, 0)
    res = reference_layer(run, inputs, weights)
    path = tmp_path / "run.pt"
    path.write_bytes(b"previous dump")

    real_save = torch.save

    def dying_save(obj, fh):  # write half, then die as a kill or a full disk would
        real_save(obj, fh)
        fh.truncate(fh.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(dump_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_dump(path, res, inputs, weights, seed=0)
    assert path.read_bytes() == b"previous dump"             # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temp file left behind
    monkeypatch.setattr(dump_mod.torch, "save", real_save)
    save_dump(path, res, inputs, weights, seed=0)
    assert load_dump(path)["config"]["seed"] == 0


def test_killed_writer_leaves_no_truncated_dump(tmp_path):
    """A process SIGKILLed while writing leaves at most a hidden .tmp, never the path."""
    import signal
    import subprocess
    import sys
    import time
    path = tmp_path / "big.pt"
    code = ("import torch, sys; from moe_kernels.dump import atomic_torch_save; "
            "atomic_torch_save({'x': torch.zeros(64, 1024, 1024, dtype=torch.uint8)}, "
            f"{str(path)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".tmp")
                                             for p in tmp_path.iterdir()):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not path.exists() or len(path.read_bytes()) > 64 * 1024 * 1024
