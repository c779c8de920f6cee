"""Notebook 04_latency: papermill run with tiny parameters and the sweeps off (figures +
manifest entries), first-cell parameter errors, jupytext pair in sync and output-free.

The run uses the pypto kernels (SIM cost model + CPU interpreter): 14 EP kernel calls, 2
what-if calls and 8 stage-report calls at the tiny preset, about a minute on 2 cores."""
from __future__ import annotations

import json

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from moe_kernels import __version__
from moe_kernels import notebooks_run as nr

NB = "04_latency"
TINY = {"preset": "tiny", "ranks": 2, "batch": 2, "seq": 2, "run_sweeps": False}
FIGURES = {"04_stage_latency_per_rank.png", "04_swimlane_expert_routed.png",
           "04_sim_vs_roofline.png", "04_comm_model.png", "04_step_per_rank.png",
           "04_beside_published.png", "04_expert_routed_tight_whatif.png"}


def test_parameters_declared():
    """Pairing, outputs and the parameters cell are checked for every notebook in
    test_notebooks.py; here: 04's own parameters."""
    declared = nr.notebook_parameters(nr.resolve_notebook(NB))
    assert declared["preset"] == "tiny"
    assert {"preset", "ranks", "batch", "seq", "routing", "seed", "figures_dir",
            "batch_sweep", "ranks_sweep", "run_sweeps", "dispatch_gbps",
            "combine_latency_us"} <= set(declared)


@pytest.mark.pypto
def test_latency_notebook_runs_with_tiny_parameters(tmp_path):
    figs = tmp_path / "figs"
    out = nr.run_notebook(NB, {**TINY, "figures_dir": str(figs)}, tmp_path / "04.ipynb")
    assert {p.name for p in figs.glob("*.png")} == FIGURES
    entries = json.loads((figs / "manifest.json").read_text())["figures"]
    assert set(entries) == FIGURES
    e = entries["04_stage_latency_per_rank.png"]
    assert e["notebook"] == NB and e["package_version"] == __version__
    assert e["parameters"]["preset"] == "tiny" and e["parameters"]["run_sweeps"] is False
    assert "SIM cost model (Ascend 910B, pypto 0.2.0)" in e["title"]
    assert "modelled communication" in entries["04_comm_model.png"]["title"]
    assert "published" in entries["04_beside_published.png"]["title"]
    assert "SIM cost model" in entries["04_expert_routed_tight_whatif.png"]["title"]
    text = "".join(o.get("text", "") for c in nbformat.read(str(out), as_version=4).cells
                   if c.cell_type == "code" for o in c.get("outputs", []))
    assert "rank 1:" in text and "tokens sweep skipped" in text
    assert "DEBUG:" not in text                      # pypto's root DEBUG logging is off


@pytest.mark.parametrize("bad, name, allowed", [
    ({"ranks": 3}, "ranks=3", "[1, 2, 4, 8, 16]"),
    ({"batch_sweep": [0, 4]}, "batch_sweep=[0, 4]", "positive integers"),
])
def test_bad_parameter_fails_in_the_first_cell(tmp_path, bad, name, allowed):
    with pytest.raises(PapermillExecutionError) as err:
        nr.run_notebook(NB, {**TINY, **bad, "figures_dir": str(tmp_path / "f")},
                        tmp_path / "bad.ipynb")
    assert err.value.ename == "ParameterError"
    assert name in err.value.evalue and allowed in err.value.evalue
    cells = nbformat.read(str(tmp_path / "bad.ipynb"), as_version=4).cells
    failed = [c for c in cells if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and "validate_params(" in failed[0].source
    assert not (tmp_path / "f").exists()
