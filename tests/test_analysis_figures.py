"""Deterministic PNG saving, the palette, and the figures manifest merge."""
import json
import threading

import pytest
import torch

from moe_kernels import __version__
from moe_kernels.analysis import manifest as mf
from moe_kernels.analysis import plots


def make_fig():
    return plots.plot_expert_load({"a": torch.tensor([3, 1, 4, 1]),
                                   "b": torch.tensor([2, 7, 1, 8])}, 2, "Load per expert",
                                  capacity=6)


def test_two_saves_are_byte_identical(tmp_path):
    fig = make_fig()
    p1 = plots.save_figure(fig, tmp_path / "a.png")
    p2 = plots.save_figure(fig, tmp_path / "sub" / "b.png")
    p3 = plots.save_figure(make_fig(), tmp_path / "c.png")  # rebuilt from scratch
    assert p1.read_bytes() == p2.read_bytes() == p3.read_bytes()
    data = p1.read_bytes()
    assert data.startswith(b"\x89PNG") and b"Software" not in data and b"tIME" not in data
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_rejects_non_png(tmp_path):
    with pytest.raises(ValueError, match=".png"):
        plots.save_figure(make_fig(), tmp_path / "a.svg")


def test_every_plot_has_title_labels_and_legend():
    figs = [make_fig(),
            plots.plot_rank_load({"x": torch.tensor([5, 3])}, "Rank load"),
            plots.plot_lines([0, 1], {"s": [1.0, 2.0]}, "Lines", "x (u)", "y (u)", 1.0, "ref"),
            plots.plot_weight_hist({"w": torch.rand(20)}, "Weights"),
            plots.plot_gate_scores(torch.rand(6, 4), torch.tensor([[0, 1]] * 6), "Scores"),
            plots.plot_slot_map(torch.tensor([[0, 1, 3], [2, 3, -1]]),
                                torch.tensor([[4.0, 1.0, 2.5], [3.0, 2.5, float("nan")]]),
                                "Slots")]
    for fig in figs:
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None or fig.legends


def test_palette_is_okabe_ito():
    assert plots.OKABE_ITO[0] == "#E69F00" and len(set(plots.OKABE_ITO)) == 8
    assert plots.colour(9) == plots.OKABE_ITO[1]


def test_manifest_merge_stable_and_replacing(tmp_path):
    mf.register_figure(tmp_path, "b.png", "02_x", {"ranks": 2, "preset": "tiny"})
    mf.register_figure(tmp_path, "a.png", "01_y", {"skew": 0.5}, title="A")
    text1 = (tmp_path / "manifest.json").read_text()
    data = json.loads(text1)
    assert list(data["figures"]) == ["a.png", "b.png"]
    assert data["figures"]["a.png"] == {"notebook": "01_y", "parameters": {"skew": 0.5},
                                        "package_version": __version__, "title": "A"}
    assert text1 == mf.dumps_manifest(data) and text1.endswith("}\n")
    # re-registering the same figure replaces its entry, others are kept
    mf.register_figure(tmp_path, "b.png", "02_x", {"ranks": 4, "preset": "tiny"})
    data = mf.read_manifest(tmp_path)
    assert data["figures"]["b.png"]["parameters"]["ranks"] == 4 and "a.png" in data["figures"]
    # same registrations in another order give the same bytes
    other = tmp_path / "other"
    mf.register_figure(other, "a.png", "01_y", {"skew": 0.5}, title="A")
    mf.register_figure(other, "b.png", "02_x", {"preset": "tiny", "ranks": 4})
    assert (other / "manifest.json").read_text() == (tmp_path / "manifest.json").read_text()


def test_manifest_concurrent_writers_keep_every_entry(tmp_path):
    def work(i):
        for j in range(10):
            mf.register_figure(tmp_path, f"f{i}_{j}.png", "nb", {"i": i})
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(mf.read_manifest(tmp_path)["figures"]) == 40


def test_manifest_rejects_paths_outside(tmp_path):
    with pytest.raises(ValueError, match="relative"):
        mf.register_figure(tmp_path, "../x.png", "nb", {})


def test_figure_writer_saves_and_registers(tmp_path):
    w = mf.FigureWriter(tmp_path, "01_routing", {"preset": "tiny"})
    path = w.save(make_fig(), "01_load.png")
    assert path.exists() and w.written == [path]
    entry = mf.read_manifest(tmp_path)["figures"]["01_load.png"]
    assert entry["notebook"] == "01_routing" and entry["title"] == "Load per expert"
    with pytest.raises(ValueError, match="name"):
        w.save(make_fig(), "sub/x.png")
