"""The kernels' task plans (pure functions, no pypto): every token, column and I-column is
covered exactly once, in the order and sizes their docstrings state."""
from hypothesis import given
from hypothesis import strategies as st

from moe_kernels.pto import hc, shared_ffn


def _covers(spans: list[tuple[int, int]], size: int) -> bool:
    """The (offset, width) spans tile [0, size) in order, with no gap or overlap."""
    end = 0
    for off, width in spans:
        if off != end or width <= 0:
            return False
        end += width
    return end == size


@given(st.integers(1, 4096))
def test_post_tasks_split_tokens_evenly_largest_first_in_whole_waves(t):
    tasks = hc._post_tasks(t)
    sizes = [n for _, n in tasks]
    waves = -(-t // (hc.POST_TASKS * hc.POST_MAX_TOKENS))
    assert _covers(tasks, t)
    assert len(tasks) == min(t, hc.POST_TASKS * waves)
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1
    assert max(sizes) <= hc.POST_MAX_TOKENS


def test_post_tasks_at_the_batch_run_shapes():
    demo, flash = hc._post_tasks(128), hc._post_tasks(32)
    assert [n for _, n in demo] == [3] * 32 + [2] * 16
    assert [n for _, n in flash] == [1] * 32


@given(st.integers(1, 512), st.sampled_from([256, 1024, 4096, 7168]))
def test_w2_panels_cover_the_output_columns(t, d):
    panels = shared_ffn._w2_panels(t, d)
    assert _covers([(off, width) for off, width, _ in panels], d)
    tiers = dict(shared_ffn.SHARED_W2_TIERS)
    for _, width, n in panels:
        assert n in tiers
        if len(panels) > 1:   # narrowing panels: at most their tier's tasks each
            assert width <= n * tiers[n]
    n_tiles = [n for _, _, n in panels]
    assert n_tiles == sorted(n_tiles, reverse=True)   # narrower panels start later


def test_w2_panels_narrow_only_within_one_cube_wave():
    assert [n for *_, n in shared_ffn._w2_panels(128, 4096)] == [192, 160, 128]
    # 256 rows take two cube M tiles, so 2 x 24 tasks: one panel width throughout
    assert shared_ffn._w2_panels(256, 4096) == ((0, 4096, shared_ffn.SHARED_W2_N),)
    assert shared_ffn._w2_panels(32, 7168) == ((0, 7168, shared_ffn.SHARED_W2_N),)


@given(st.sampled_from([16, 32, 64, 128, 256]), st.sampled_from([1024, 2048, 3072, 4096]))
def test_shared_chunks_cover_the_intermediate_columns(t, i):
    chunks = shared_ffn._chunks(t, 4096, i)
    assert _covers([(off, width) for off, width, _, _ in chunks], i)
    for _, width, rows, cols in chunks:
        assert t % rows == 0 and width % cols == 0
    if len(chunks) == 2:   # the first chunk is exactly the first cube wave's w1/w3 tiles
        assert chunks[0][1] == shared_ffn.SHARED_CUBE_CORES // 2 * shared_ffn.SHARED_W13_N
