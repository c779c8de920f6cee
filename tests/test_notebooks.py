"""The notebooks: papermill execution with tiny parameters, first-cell parameter errors,
jupytext pairs in sync and output-free, and the batch runner (run_all / sweep)."""
import json
from pathlib import Path

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from moe_kernels import __version__
from moe_kernels import notebooks_run as nr

NOTEBOOKS = nr.list_notebooks()
TINY = {"preset": "tiny", "ranks": 2, "batch": 4, "seq": 2, "redundant_slots": 2}
ROUTING_FIGURES = {"01_gate_scores.png", "01_routing_weights.png",
                   "01_hash_vs_sort_expert_load.png", "01_skew_expert_load.png",
                   "01_imbalance_vs_skew.png", "01_rank_load.png", "01_eplb_rank_load.png",
                   "01_eplb_placement.png", "01_drop_rate_skew_capacity.png"}


def test_notebooks_exist():
    assert "01_routing" in [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync_and_without_outputs(nb):
    assert nr.pair_differences(nb) == []
    assert nr.cells_with_outputs(nb) == []
    cells = nbformat.read(str(nb), as_version=4).cells
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    first_after = next(c for c in cells[tagged[0] + 1:] if c.cell_type == "code")
    assert "validate_params(" in first_after.source


def test_pair_check_detects_a_difference(tmp_path):
    src = nr.resolve_notebook("01_routing")
    (tmp_path / src.name).write_text(src.read_text())
    py = src.with_suffix(".py").read_text().replace("skew = 1.0", "skew = 2.0", 1)
    (tmp_path / src.with_suffix(".py").name).write_text(py)
    diffs = nr.pair_differences(tmp_path / src.name)
    assert len(diffs) == 1 and "skew = 2.0" in diffs[0]


def test_routing_notebook_runs_with_tiny_parameters(tmp_path):
    figs = tmp_path / "figs"
    out = nr.run_notebook("01_routing", {**TINY, "figures_dir": str(figs)},
                          tmp_path / "01.ipynb")
    assert out.exists()
    assert {p.name for p in figs.glob("*.png")} == ROUTING_FIGURES
    entries = json.loads((figs / "manifest.json").read_text())["figures"]
    assert set(entries) == ROUTING_FIGURES
    e = entries["01_eplb_rank_load.png"]
    assert e["notebook"] == "01_routing" and e["package_version"] == __version__
    assert e["parameters"]["preset"] == "tiny" and e["parameters"]["redundant_slots"] == 2
    assert all(v["source"].startswith("computed") and v["shape"].startswith("tiny")
               for v in entries.values())
    cells = nbformat.read(str(out), as_version=4).cells
    saw = [o["data"]["text/markdown"] for c in cells for o in c.get("outputs", [])
           if "text/markdown" in o.get("data", {})]
    assert len(saw) == 1 and saw[0].startswith("## What we saw") and "skew 1" in saw[0]
    source = "".join(c.source for c in cells)
    assert "spec §" not in source and "docs/design.md" in source


def test_bad_parameter_fails_in_the_first_cell(tmp_path):
    with pytest.raises(PapermillExecutionError) as err:
        nr.run_notebook("01_routing", {**TINY, "ranks": 3, "figures_dir": str(tmp_path)},
                        tmp_path / "bad.ipynb")
    assert err.value.ename == "ParameterError"
    assert "ranks=3" in err.value.evalue and "[1, 2, 4, 8, 16]" in err.value.evalue
    cells = nbformat.read(str(tmp_path / "bad.ipynb"), as_version=4).cells
    failed = [c for c in cells if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and "validate_params(" in failed[0].source


def _dummy_notebook(path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('preset = "tiny"\nx = 1\nfigures_dir = "f"',
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(
                    "import pathlib\np = pathlib.Path(figures_dir)\n"
                    "p.mkdir(parents=True, exist_ok=True)\n"
                    "(p / 'out.txt').write_text(f'{preset} {x!r}')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, str(path))
    return path


def test_sweep_writes_one_figure_set_per_value(tmp_path):
    nb = _dummy_notebook(tmp_path / "09_dummy.ipynb")
    runs = nr.sweep(str(nb), {"x": ["2", "3"]}, figures_dir=tmp_path / "sw",
                    build_dir=tmp_path / "build", progress=False)
    assert [r.label for r in runs] == ["x=2", "x=3"]
    for r, v in zip(runs, (2, 3), strict=True):
        assert r.figures_dir == tmp_path / "sw" / "09_dummy" / f"x={v}"
        assert (r.figures_dir / "out.txt").read_text() == f"tiny {v}"
        assert r.executed.exists()
    with pytest.raises(nr.NotebookRunError, match="no sweepable parameter 'y'"):
        nr.sweep(str(nb), {"y": ["1"]}, figures_dir=tmp_path / "sw", progress=False)


def test_run_all_applies_main_parameters_where_declared(tmp_path, capfd):
    nb = _dummy_notebook(tmp_path / "09_dummy.ipynb")
    figs = tmp_path / "figs"
    out = nr.run_all([nb], figures_dir=figs, build_dir=tmp_path / "b", progress=False)
    assert out == [tmp_path / "b" / "09_dummy.ipynb"]
    assert (figs / "out.txt").read_text() == "demo 1"
    page = figs / "notebooks" / "09_dummy.html"                 # browsable copy
    assert page.exists() and "demo" in page.read_text()
    assert "without encryption" not in capfd.readouterr().err   # kernel noise -> log
    assert (tmp_path / "b" / "09_dummy.kernel.log").exists()
    assert "1 notebook(s)" in nr.batch_summary(out, figs, 1.0)


def test_html_links_saved_figures_instead_of_embedding(tmp_path):
    import base64

    from moe_kernels.notebook_html import figure_index, link_figures
    png = b"\x89PNG fake bytes"
    (tmp_path / "01_a.png").write_bytes(png)
    nb = nbformat.v4.new_notebook()
    out = nbformat.v4.new_output("display_data", data={
        "image/png": base64.b64encode(png).decode(), "text/plain": "<Image>"})
    other = nbformat.v4.new_output("display_data", data={
        "image/png": base64.b64encode(b"other").decode()})
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[out, other])]
    assert link_figures(nb, figure_index(tmp_path)) == 1
    assert nb.cells[0].outputs[0]["data"]["text/html"].startswith('<img src="../01_a.png"')
    assert "image/png" in nb.cells[0].outputs[1]["data"]


def test_html_page_does_not_depend_on_stream_chunks_cell_ids_or_checkout_path(tmp_path):
    from moe_kernels.notebook_html import make_reproducible

    def page(chunks, cell_id, root):
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell(f'figures_dir = "{root}/figures"')
        params["metadata"]["tags"] = ["injected-parameters"]
        params["id"] = cell_id
        outs = [nbformat.v4.new_output("stream", name="stdout", text=t) for t in chunks]
        outs.append(nbformat.v4.new_output("stream", name="stderr", text="warn\n"))
        body = nbformat.v4.new_code_cell("print()", outputs=outs)
        body["id"] = "body"   # the notebook's own cells keep their stored ids
        nb.cells = [params, body]
        make_reproducible(nb, Path(root))
        return nb

    a = page(["figures -> /a/figures\n", "x\n"], "3b9aec33", "/a")
    b = page(["figures -> /b/figures\nx\n"], "ad6a9550", "/b")
    assert a == b
    assert a.cells[0]["id"] == "injected-parameters"
    assert a.cells[0]["source"] == 'figures_dir = "<repo>/figures"'
    assert [o["name"] for o in a.cells[1].outputs] == ["stdout", "stderr"]   # kept apart


def test_html_pages_share_one_stylesheet(tmp_path):
    from moe_kernels.notebook_html import CSS_NAME, HTML_DIRNAME, export_html
    pages = []
    for name, src in (("01_a", "x = 1"), ("02_b", "print('b')")):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), nbformat.v4.new_code_cell(src)]
        nbformat.write(nb, str(tmp_path / f"{name}.ipynb"))
        pages.append(export_html(tmp_path / f"{name}.ipynb", tmp_path / "figs"))
        css = (tmp_path / "figs" / HTML_DIRNAME / CSS_NAME).read_text()
        assert len(css) > 10_000 and "pre { line-height" in css   # the template's CSS
    for page in pages:
        text = page.read_text()
        head = text[:text.index("</head>")]
        assert "<style" not in head and f'href="{CSS_NAME}"' in head
        assert len(text) < len(css)                              # no second copy inside


def test_run_all_prunes_figures_a_notebook_no_longer_writes(tmp_path):
    from moe_kernels.analysis import manifest as mf
    nb = _dummy_notebook(tmp_path / "09_dummy.ipynb")
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "09_old.png").write_bytes(b"x")
    mf.register_figure(figs, "09_old.png", "09_dummy", {}, source="computed", shape="s")
    mf.register_figure(figs, "01_keep.png", "01_other", {}, source="computed", shape="s")
    nr.run_all([nb], figures_dir=figs, build_dir=tmp_path / "b", progress=False,
               html=False)
    assert list(mf.read_manifest(figs)["figures"]) == ["01_keep.png"]
    assert not (figs / "09_old.png").exists()


def test_helpers():
    assert nr.run_label({"ranks": 4, "skew": 0.5}) == "ranks=4__skew=0.5"
    assert nr.run_label({"preset": "a/b c"}) == "preset=a-b-c"
    assert nr.coerce_value("skew", "1", 0.5) == 1.0
    assert nr.coerce_value("ranks", "4", 2) == 4
    assert nr.coerce_value("topk", "none", None) is None
    assert nr.coerce_value("topk", "3", None) == 3
    assert nr.coerce_value("preset", "demo", "tiny") == "demo"
    with pytest.raises(nr.NotebookRunError, match="ranks"):
        nr.coerce_value("ranks", "1.5", 2)
    assert nr.resolve_notebook("01") == nr.resolve_notebook("01_routing.py")
    with pytest.raises(nr.NotebookRunError, match="01_routing"):
        nr.resolve_notebook("99_missing")
    assert nr.notebook_parameters("01_routing")["preset"] == "tiny"
