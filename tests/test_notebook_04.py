"""Notebook 04_latency: papermill run with tiny parameters (figures, manifest entries
with source and shape, the generated "What we saw"), first-cell parameter errors.

The run models EP steps at the tiny preset (SIM kernels without the interpreter, cached
on disk; the committed timings hold the ones used here)."""
from __future__ import annotations

import json

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from moe_kernels import __version__
from moe_kernels import notebooks_run as nr

NB = "04_latency"
TINY = {"preset": "tiny", "ranks": 2, "batch": 2, "seq": 2, "scale_preset": "tiny",
        "scale_ranks": 8, "scale_batch": 2, "scale_seq": 2, "skew_sweep": [0.0, 2.0],
        "ranks_sweep": [2, 8], "tokens_sweep": [4, 8]}
FIGURES = {"04_step_gantt.png", "04_step_gantt_scale.png", "04_step_vs_skew.png",
           "04_step_vs_ranks.png", "04_step_vs_tokens.png", "04_stages_vs_bounds.png",
           "04_comm_vs_published.png", "04_step_vs_published.png"}


def test_parameters_declared():
    """Pairing, outputs and the parameters cell are checked for every notebook in
    test_notebooks.py; here: 04's own parameters (tiny defaults)."""
    declared = nr.notebook_parameters(nr.resolve_notebook(NB))
    assert declared["preset"] == "tiny" and declared["scale_preset"] == "tiny"
    assert {"preset", "ranks", "batch", "seq", "routing", "seed", "figures_dir",
            "scale_ranks", "scale_batch", "scale_seq", "skew_sweep", "eplb_per_rank",
            "ranks_sweep", "tokens_sweep"} == set(declared) - {"scale_preset"}


@pytest.mark.pypto
def test_latency_notebook_runs_with_tiny_parameters(tmp_path):
    figs = tmp_path / "figs"
    out = nr.run_notebook(NB, {**TINY, "figures_dir": str(figs)}, tmp_path / "04.ipynb")
    assert {p.name for p in figs.glob("*.png")} == FIGURES
    entries = json.loads((figs / "manifest.json").read_text())["figures"]
    assert set(entries) == FIGURES
    for name, e in entries.items():
        assert e["notebook"] == NB and e["package_version"] == __version__
        assert e["source"].split(":")[0] in {"sim", "model"}, name
        assert "demo" not in e["shape"] and "flash" not in e["title"], name
    assert entries["04_step_gantt.png"]["shape"] == "tiny · R=2 · T=4/rank · C=8"
    assert entries["04_step_gantt_scale.png"]["shape"].startswith("tiny · R=8 · T=4/rank")
    assert entries["04_step_vs_ranks.png"]["shape"].startswith("tiny · R=2-8 · T=4/rank")
    assert entries["04_step_vs_tokens.png"]["shape"].startswith("tiny · R=8")
    assert "published" in entries["04_step_vs_published.png"]["source"]
    e = entries["04_step_vs_skew.png"]
    assert e["parameters"]["scale_ranks"] == 8 and e["parameters"]["skew_sweep"] == [0, 2]
    cells = nbformat.read(str(out), as_version=4).cells
    text = "".join(o.get("text", "") for c in cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    md = "".join(o.get("data", {}).get("text/markdown", "") for c in cells
                 if c.cell_type == "code" for o in c.get("outputs", []))
    assert "step_us" not in text and "overlapped: step" in text
    assert "## What we saw" in md and "Skew (tiny, R=8)" in md
    assert "DEBUG:" not in text                      # pypto's root DEBUG logging is off


@pytest.mark.parametrize("bad, name, allowed", [
    ({"ranks": 3}, "ranks=3", "[1, 2, 4, 8, 16]"),
    ({"scale_ranks": 3}, "scale_ranks=3", "[1, 2, 4, 8, 16]"),
    ({"tokens_sweep": [0, 4]}, "tokens_sweep=[0, 4]", "multiples of scale_seq"),
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
