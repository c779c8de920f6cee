"""Notebooks 02_dispatch_layouts and 03_per_rank_combine: papermill runs with tiny
parameters (figures + manifest entries), first-cell parameter errors, jupytext pairs.

The pypto comparison of 03 is switched off here (its SIM kernels take tens of seconds);
tests/test_pto_layer.py covers pypto vs torch. The gloo comparison is cheap and runs."""
from __future__ import annotations

import json

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from moe_kernels import __version__
from moe_kernels import notebooks_run as nr

TINY = {"preset": "tiny", "ranks": 2, "batch": 2, "seq": 2}
DISPATCH_FIGURES = {"02_count_tensor.png", "02_prefix_offsets.png",
                    "02_receive_windows.png", "02_bytes_per_peer.png",
                    "02_capacity_headroom.png", "02_overflow_drops.png",
                    "02_footprint.png", "02_payload_int8_vs_bf16.png"}
#: The worked example has no gate routing to skew, so no headroom-under-skew figure.
WORKED_FIGURES = DISPATCH_FIGURES - {"02_capacity_headroom.png"}
COMBINE_FIGURES = {"03_pushback_rows.png", "03_reduce_terms.png", "03_agreement_margin.png"}


def _stream_text(path) -> str:
    cells = nbformat.read(str(path), as_version=4).cells
    return "".join(o.get("text", "") for c in cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


def _what_we_saw(path) -> str:
    cells = nbformat.read(str(path), as_version=4).cells
    saw = [o["data"]["text/markdown"] for c in cells for o in c.get("outputs", [])
           if "text/markdown" in o.get("data", {})]
    assert len(saw) == 1 and saw[0].startswith("## What we saw")
    assert "spec §" not in "".join(c.source for c in cells)
    return saw[0]


def _first_cell_error(nb: str, params: dict, tmp_path) -> PapermillExecutionError:
    with pytest.raises(PapermillExecutionError) as err:
        nr.run_notebook(nb, {**params, "figures_dir": str(tmp_path / "f")},
                        tmp_path / "bad.ipynb")
    cells = nbformat.read(str(tmp_path / "bad.ipynb"), as_version=4).cells
    failed = [c for c in cells if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and "validate_params(" in failed[0].source
    assert not list((tmp_path / "f").glob("*"))        # nothing written
    return err.value


@pytest.mark.parametrize("name", ["02_dispatch_layouts", "03_per_rank_combine"])
def test_main_run_parameters_are_declared(name):
    """Pairing, outputs and the parameters cell are checked for every notebook in
    test_notebooks.py; here: the batch run's parameters apply to both notebooks."""
    declared = nr.notebook_parameters(nr.resolve_notebook(name))
    assert {"preset", "ranks", "batch", "seq", "seed", "figures_dir"} <= set(declared)


def test_dispatch_notebook_reproduces_the_worked_example(tmp_path):
    figs = tmp_path / "figs"
    out = nr.run_notebook("02_dispatch_layouts",
                          {**TINY, "worked_example": True, "figures_dir": str(figs)},
                          tmp_path / "02.ipynb")
    assert {p.name for p in figs.glob("*.png")} == WORKED_FIGURES
    entries = json.loads((figs / "manifest.json").read_text())["figures"]
    assert set(entries) == WORKED_FIGURES
    e = entries["02_receive_windows.png"]
    assert e["notebook"] == "02_dispatch_layouts" and e["package_version"] == __version__
    assert e["parameters"]["worked_example"] is True and e["title"]
    assert e["source"].startswith("computed") and e["shape"].startswith("worked example")
    assert entries["02_footprint.png"]["source"].startswith("model")
    text = _stream_text(out)
    assert ("matches the worked example: {'slots': True, 'pub_counts': True, "
            "'recv_count': True, 'receive_buffers': True}") in text
    assert "  e1: s0 = (0, 0), s1 = (0, 4), s2 = (0, 7), s3 = (1, 1), s4 = (1, 7)" in text
    assert "slot 4 (= 3 + 1)" in text
    assert "raises CapacityError: receive capacity overflow: rank 0 local " \
           "expert 1" in text
    assert "drops 5 of 16 routes" in text
    assert "drops 5 of 16 routes (31.2 %)" in _what_we_saw(out)


def test_dispatch_notebook_with_gate_routing_and_skew(tmp_path):
    figs = tmp_path / "figs"
    out = nr.run_notebook("02_dispatch_layouts",
                          {**TINY, "routing": "sort", "skew": 2.0, "capacity_factor": 1.5,
                           "figures_dir": str(figs)}, tmp_path / "02.ipynb")
    assert {p.name for p in figs.glob("*.png")} == DISPATCH_FIGURES
    text = _stream_text(out)
    assert "routing: tiny, sort route, skew 2" in text
    assert "set worked_example = True" in text
    saw = _what_we_saw(out)
    assert "sort route's busiest expert" in saw and "hash route's busiest expert" in saw
    offsets = json.loads((figs / "manifest.json").read_text())["figures"][
        "02_prefix_offsets.png"]
    assert offsets["shape"].startswith("tiny · R=4")         # offsets drawn at R = 4


def test_combine_notebook_runs_with_tiny_parameters(tmp_path):
    figs = tmp_path / "figs"
    out = nr.run_notebook("03_per_rank_combine",
                          {**TINY, "compare_gloo": True, "compare_pypto": False,
                           "figures_dir": str(figs)}, tmp_path / "03.ipynb")
    assert {p.name for p in figs.glob("*.png")} == COMBINE_FIGURES
    entries = json.loads((figs / "manifest.json").read_text())["figures"]
    assert set(entries) == COMBINE_FIGURES
    params = entries["03_agreement_margin.png"]["parameters"]
    assert params["transport"] == "local" and params["backend"] == "torch"
    assert params["compare_pypto"] is False
    text = _stream_text(out)
    assert "EP (local, torch) vs reference: bit-identical" in text
    assert "gloo vs local: bit-identical" in text
    assert "poisoned windows vs clean: bit-identical" in text
    assert "is bit-identical to ffn_out" in text
    assert "== x_next: False" not in text and "== x_next: True" in text
    saw = _what_we_saw(out)
    assert "gloo vs local: bit-identical on every rank." in saw
    assert "reproduces `ffn_out` bit for bit" in saw


@pytest.mark.parametrize("nb, params, name, allowed", [
    ("02_dispatch_layouts", {"worked_example": "yes"}, "worked_example", "True or False"),
    ("02_dispatch_layouts", {"ranks": 3}, "ranks", "[1, 2, 4, 8, 16]"),
    ("03_per_rank_combine", {"backend": "cuda"}, "backend", "['torch', 'pypto']"),
    ("03_per_rank_combine", {"pypto_preset": "huge"}, "pypto_preset", "'tiny'"),
])
def test_bad_parameter_fails_in_the_first_cell(tmp_path, nb, params, name, allowed):
    err = _first_cell_error(nb, {**TINY, **params}, tmp_path)
    assert err.ename == "ParameterError"
    assert f"{name}=" in err.evalue and allowed in err.evalue
