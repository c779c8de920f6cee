"""Deterministic PNG saving, the shared style (palettes, footer, fonts, log axes), and
the figures manifest (source and shape fields, merge, prune)."""
import json
import os
import struct
import threading

import pytest
import torch

from moe_kernels import __version__
from moe_kernels.analysis import manifest as mf
from moe_kernels.analysis import plots, style
from moe_kernels.stages import STAGE_NAMES

SRC, SHAPE = "computed", "tiny · R=2 · T=4/rank · C=16"


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
    assert style.OKABE_ITO[0] == "#E69F00" and len(set(style.OKABE_ITO)) == 8
    assert plots.colour(9) == style.OKABE_ITO[1]


def test_rank_and_stage_colours_never_repeat():
    assert len({style.rank_colour(r) for r in range(16)}) == 16
    assert style.rank_colour(3) == style.rank_colour(19)
    names = list(STAGE_NAMES) + list(style.COMM_PHASES)
    assert set(style.STAGE_COLOURS) == set(names)
    assert len({style.stage_colour(n) for n in names}) == len(names)
    assert style.stage_colour("hc_pre") != style.stage_colour("hc_post")
    assert style.stage_colour("dispatch (model)") == style.stage_colour("dispatch")
    with pytest.raises(ValueError, match="hc_post"):
        style.stage_colour("nope")


def test_footer_fonts_and_log_axes(tmp_path):
    fig, (ax,) = plots.new_figure(5, 3)
    ax.plot([1, 10], [1, 100], label="s")
    ax.set_yscale("log")
    ax.set(title="T", xlabel="x (u)", ylabel="bytes")
    ax.text(0.5, 0.5, "tiny", fontsize=5)
    style.add_footer(fig, "model: alpha-beta", "demo · R=2")
    style.add_footer(fig, "sim", "demo · R=4")            # replaces, never stacks
    assert style.footer_text(fig) == "source: sim   |   shape: demo · R=4"
    assert sum(t.get_gid() == "moe-footer" for t in fig.texts) == 1
    png = plots.save_figure(fig, tmp_path / "f.png").read_bytes()
    assert ax.get_ylabel() == "bytes (log scale)"
    assert min(t.get_fontsize() for t in fig.findobj(plots.matplotlib.text.Text)
               if t.get_text()) >= style.MIN_FONT_PT
    width = struct.unpack(">I", png[16:20])[0]              # IHDR width in pixels
    assert width == 5 * style.FIG_DPI >= 750
    with pytest.raises(ValueError, match="source"):
        style.add_footer(fig, "guessed", "x")
    with pytest.raises(ValueError, match="shape"):
        style.add_footer(fig, "sim", " ")
    assert style.shape_label("demo", 2, 128, 128) == "demo · R=2 · T=128/rank · C=128"
    assert style.shape_label("flash", "2-16", C="f") == "flash · R=2-16 · C=f"


def test_manifest_merge_stable_and_replacing(tmp_path):
    reg = {"source": SRC, "shape": SHAPE}
    mf.register_figure(tmp_path, "b.png", "02_x", {"ranks": 2, "preset": "tiny"}, **reg)
    mf.register_figure(tmp_path, "a.png", "01_y", {"skew": 0.5}, title="A", **reg)
    text1 = (tmp_path / "manifest.json").read_text()
    data = json.loads(text1)
    assert list(data["figures"]) == ["a.png", "b.png"] and data["schema"] == 2
    assert data["figures"]["a.png"] == {"notebook": "01_y", "parameters": {"skew": 0.5},
                                        "package_version": __version__, "title": "A",
                                        "source": SRC, "shape": SHAPE}
    assert text1 == mf.dumps_manifest(data) and text1.endswith("}\n")
    # re-registering the same figure replaces its entry, others are kept
    mf.register_figure(tmp_path, "b.png", "02_x", {"ranks": 4, "preset": "tiny"}, **reg)
    data = mf.read_manifest(tmp_path)
    assert data["figures"]["b.png"]["parameters"]["ranks"] == 4 and "a.png" in data["figures"]
    # same registrations in another order give the same bytes
    other = tmp_path / "other"
    mf.register_figure(other, "a.png", "01_y", {"skew": 0.5}, title="A", **reg)
    mf.register_figure(other, "b.png", "02_x", {"preset": "tiny", "ranks": 4}, **reg)
    assert (other / "manifest.json").read_text() == (tmp_path / "manifest.json").read_text()


def test_manifest_concurrent_writers_keep_every_entry(tmp_path):
    def work(i):
        for j in range(10):
            mf.register_figure(tmp_path, f"f{i}_{j}.png", "nb", {"i": i}, source=SRC,
                               shape=SHAPE)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(mf.read_manifest(tmp_path)["figures"]) == 40


def test_manifest_rejects_paths_outside(tmp_path):
    with pytest.raises(ValueError, match="relative"):
        mf.register_figure(tmp_path, "../x.png", "nb", {}, source=SRC, shape=SHAPE)
    with pytest.raises(ValueError, match="source"):
        mf.register_figure(tmp_path, "x.png", "nb", {}, source="", shape=SHAPE)
    with pytest.raises(TypeError):
        mf.register_figure(tmp_path, "x.png", "nb", {})      # source and shape required


def test_figure_writer_saves_and_registers(tmp_path):
    w = mf.FigureWriter(tmp_path, "01_routing", {"preset": "tiny"})
    path = w.save(make_fig(), "01_load.png", source="model: shapes", shape=SHAPE)
    assert path.exists() and w.written == [path]
    entry = mf.read_manifest(tmp_path)["figures"]["01_load.png"]
    assert entry["notebook"] == "01_routing" and entry["title"] == "Load per expert"
    assert entry["source"] == "model: shapes" and entry["shape"] == SHAPE
    with pytest.raises(ValueError, match="name"):
        w.save(make_fig(), "sub/x.png", source=SRC, shape=SHAPE)
    with pytest.raises(TypeError):
        w.save(make_fig(), "01_x.png")                      # source and shape required
    with pytest.raises(ValueError, match="shape"):
        w.save(make_fig(), "01_x.png", source=SRC, shape="")


def test_prune_notebook_drops_only_its_stale_figures(tmp_path):
    w = mf.FigureWriter(tmp_path, "01_routing", {})
    for name in ("01_a.png", "01_b.png"):
        w.save(make_fig(), name, source=SRC, shape=SHAPE)
    mf.FigureWriter(tmp_path, "02_x", {}).save(make_fig(), "02_c.png", source=SRC,
                                                 shape=SHAPE)
    assert mf.prune_notebook(tmp_path, "01_routing", {"01_a.png"}) == ["01_b.png"]
    assert sorted(mf.read_manifest(tmp_path)["figures"]) == ["01_a.png", "02_c.png"]
    assert sorted(os.listdir(tmp_path)) == ["01_a.png", "02_c.png", "manifest.json"]
