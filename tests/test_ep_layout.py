"""The dispatch layout: spec §3.9 worked example, properties over random routings,
capacity checks, and the window protocol's exactly-once push-back (local transport)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_kernels.ep.examples import worked_example
from moe_kernels.ep.layout import compute_layout, plan_rank, send_histogram
from moe_kernels.ep.local import LocalTransport
from moe_kernels.ep.windows import WindowShape
from moe_kernels.types import CapacityError, PackedRoutes

# spec §3.9: 2 ranks, 4 tokens, NL = 4 (8 global experts), top-2; the spec's tables live
# once, in moe_kernels.ep.examples
_EX = worked_example()
EXAMPLE = _EX.indices()
EXAMPLE_SLOTS = [[list(k) for k in t] for t in _EX.slots]
# receive buffers per rank, per local expert: (source rank, r_route) per slot
EXAMPLE_RECV = {d: {e: list(rows) for e, rows in enumerate(per_e)}
                for d, per_e in enumerate(_EX.receive_buffers)}


def test_worked_example_slots_counts_and_prefixes() -> None:
    lay = compute_layout(EXAMPLE, n_local=4, capacity=5)
    assert lay.slot.tolist() == EXAMPLE_SLOTS
    # pub_counts rows src·2 + dst of the spec
    assert lay.counts.reshape(4, 4).tolist() == [[0, 3, 1, 0], [0, 2, 1, 1],
                                                 [1, 2, 1, 0], [1, 2, 1, 0]]
    assert lay.recv_count.tolist() == [[1, 5, 2, 0], [1, 4, 2, 1]]
    assert lay.send_offset[1].tolist() == [[0, 3, 1, 0], [0, 2, 1, 1]]
    assert lay.send_offset[0].tolist() == [[0] * 4, [0] * 4]
    assert lay.dst_rank.tolist() == (EXAMPLE // 4).tolist()
    assert lay.local_expert.tolist() == (EXAMPLE % 4).tolist()
    assert lay.dropped.sum() == 0


def test_worked_example_receive_buffers() -> None:
    lay = compute_layout(EXAMPLE, n_local=4, capacity=5)
    src_map, route_map = lay.receive_map()
    for dst, per_e in EXAMPLE_RECV.items():
        for e, rows in per_e.items():
            got = [(int(s), int(r)) for s, r in
                   zip(src_map[dst, e], route_map[dst, e], strict=True) if s >= 0]
            assert got == rows, (dst, e)


def test_worked_example_through_the_window_protocol() -> None:
    """The local transport places every route of §3.9 at the same window rows."""
    outs = _run_fake(EXAMPLE, n_local=4, capacity=5)
    for dst, (recv, _, _) in enumerate(outs):
        for e, rows in EXAMPLE_RECV[dst].items():
            n = int(recv.count[e])
            got = [(int(recv.scale[e, s]), int(recv.route[e, s])) for s in range(n)]
            assert got == rows


def test_dump_and_bytes() -> None:
    lay = compute_layout(EXAMPLE, n_local=4, capacity=5)
    dump = lay.to_dump()
    assert set(dump) == {"counts", "recv_count", "slot", "dst_rank", "local_expert"}
    assert all(v.dtype == torch.int64 for v in dump.values())
    assert dump["counts"].shape == (2, 2, 4) and dump["slot"].shape == (2, 4, 2)
    b = lay.bytes_per_peer(4096)
    routes = torch.tensor([[4, 4], [4, 4]])
    assert torch.equal(b["x_i8"], routes * 4096)
    assert torch.equal(b["scale"], routes * 32)
    assert torch.equal(b["combine"], routes.T * 8192)
    assert "rank 1 recv_count [1, 4, 2, 1]" in str(lay)


def test_capacity_error_names_rank_expert_count_capacity() -> None:
    with pytest.raises(CapacityError) as ei:
        compute_layout(EXAMPLE, n_local=4, capacity=4)
    msg = str(ei.value)
    assert "rank 0" in msg and "local expert 1" in msg and "count=5" in msg \
        and "capacity=4" in msg


def test_drop_counts_exactly_the_routes_beyond_capacity() -> None:
    lay = compute_layout(EXAMPLE, n_local=4, capacity=2, overflow="drop")
    # rank 0 e1 receives 5 -> 3 dropped: (1,1) and (1,7) of src 1 and (0,7) of src 0
    assert lay.dropped.tolist() == [[0, 3, 0, 0], [0, 2, 0, 0]]
    assert lay.recv_count.tolist() == [[1, 2, 2, 0], [1, 2, 2, 1]]
    assert int((lay.slot < 0).sum()) == 5
    assert lay.slot[0, 3, 1] == -1 and lay.slot[1, 0, 1] == -1 and lay.slot[1, 3, 1] == -1


@pytest.mark.parametrize("kwargs, match", [
    ({"n_local": 0, "capacity": 4}, "n_local"),
    ({"n_local": 4, "capacity": 0}, "capacity"),
    ({"n_local": 4, "capacity": 4, "overflow": "spill"}, "overflow"),
    ({"n_local": 2, "capacity": 4}, r"\[0, 4\)"),
])
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_layout(EXAMPLE, **kwargs)
    with pytest.raises(ValueError, match="indices"):
        compute_layout(EXAMPLE[0], n_local=4, capacity=4)


@st.composite
def routings(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    r = draw(st.integers(1, 4))
    nl = draw(st.integers(1, 4))
    t = draw(st.integers(1, 8))
    k = draw(st.integers(1, 3))
    ids = draw(st.lists(st.integers(0, r * nl - 1), min_size=r * t * k,
                        max_size=r * t * k))
    cap = draw(st.integers(1, r * t * k))
    return torch.tensor(ids, dtype=torch.int64).reshape(r, t, k), nl, cap


@settings(max_examples=150, deadline=None)
@given(routings())
def test_layout_properties(case: tuple[torch.Tensor, int, int]) -> None:
    idx, nl, cap = case
    r, t, k = idx.shape
    table = torch.stack([send_histogram(idx[s], nl, r) for s in range(r)])
    total = table.sum(0)
    if bool((total > cap).any()):
        with pytest.raises(CapacityError):
            compute_layout(idx, nl, cap)
    lay = compute_layout(idx, nl, cap, overflow="drop")
    assert torch.equal(lay.dropped, torch.clamp(total - cap, min=0))
    assert torch.equal(lay.recv_count, torch.clamp(total, max=cap))
    src_map, route_map = lay.receive_map()
    placed = 0
    for dst in range(r):
        for e in range(nl):
            n = int(lay.recv_count[dst, e])
            # slots contiguous from 0, nothing after the count
            assert bool((src_map[dst, e, :n] >= 0).all()) and bool((src_map[dst, e, n:] < 0).all())
            srcs = src_map[dst, e, :n]
            assert bool((srcs[1:] >= srcs[:-1]).all())          # grouped by source, ascending
            for s in range(r):                                   # scan order within a source
                rr = route_map[dst, e, :n][srcs == s]
                assert bool((rr[1:] > rr[:-1]).all())
            placed += n
    # every route in exactly one slot, or dropped (the last ones in scan order)
    assert placed + int((lay.slot < 0).sum()) == r * t * k
    assert int((lay.slot < 0).sum()) == int(lay.dropped.sum())
    seen = torch.zeros(r, t * k, dtype=torch.int64)
    for dst in range(r):
        m = src_map[dst] >= 0
        seen.index_put_((src_map[dst][m], route_map[dst][m]), torch.ones(int(m.sum()),
                        dtype=torch.int64), accumulate=True)
    assert torch.equal(seen.reshape(r, t, k), (lay.slot >= 0).to(torch.int64))
    # sender and receiver prefix offsets agree
    plans = [plan_rank(s, idx[s], table, cap, "drop") for s in range(r)]
    for dst in range(r):
        segs = torch.split(plans[dst].recv_rows, plans[dst].recv_split.tolist())
        for s in range(r):
            p = plans[s]
            mine = p.order[p.dst_rank[p.order] == dst]
            sent = p.local_expert[mine] * cap + p.slot[mine]
            assert torch.equal(sent, segs[s])


def _fake_program(me: int, comm, idx: torch.Tensor, nl: int, cap: int, d: int):
    """Exchange only: row payloads encode (origin, route); the 'expert' tags its rows
    with (owner, local expert) so each origin can check what came back."""
    r = idx.shape[0]
    comm.publish_counts(send_histogram(idx[me], nl, r))
    table = yield from comm.collect_counts()
    plan = plan_rank(me, idx[me], table, cap, "drop")
    n = plan.order.numel()
    packed = PackedRoutes(x=torch.full((n, d), me, dtype=torch.int8),
                          scale=torch.full((n,), float(me)), weight=plan.order.float(),
                          route=plan.order.to(torch.int32))
    recv, handle = yield from comm.dispatch(plan, packed)
    recv_y = torch.zeros(nl, cap, d, dtype=torch.bfloat16)
    for e in range(nl):
        c = int(recv.count[e])
        recv_y[e, :c, 0] = recv.scale[e, :c].to(torch.bfloat16)
        recv_y[e, :c, 1] = recv.route[e, :c].to(torch.bfloat16)
        recv_y[e, :c, 2] = me + 1
        recv_y[e, :c, 3] = e + 1
    buf = yield from comm.combine(recv_y, handle)
    return recv, plan, buf


def _run_fake(idx: torch.Tensor, n_local: int, capacity: int, poison: bool = False,
              transport: LocalTransport | None = None):
    r, t, k = idx.shape
    d = 4
    shape = WindowShape(ranks=r, n_local=n_local, capacity=capacity, routes=t * k,
                        d_model=d)
    tr = transport or LocalTransport(poison=poison, timeout=5.0)
    return tr.run_programs(shape, lambda me, comm: _fake_program(me, comm, idx, n_local,
                                                                 capacity, d))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routings(), st.booleans())
def test_every_origin_route_written_back_exactly_once(case, poison: bool) -> None:
    idx, nl, cap = case
    r, t, k = idx.shape
    lay = compute_layout(idx, nl, cap, overflow="drop")
    outs = _run_fake(idx, nl, cap, poison=poison)
    for me, (_, plan, buf) in enumerate(outs):
        routes = torch.arange(t * k)
        keep = plan.slot >= 0
        assert torch.equal(plan.slot, lay.slot[me].reshape(-1))
        expect = torch.zeros(t * k, 4, dtype=torch.bfloat16)
        expect[keep, 0] = me
        expect[keep, 1] = routes[keep].to(torch.bfloat16)
        expect[keep, 2] = (plan.dst_rank[keep] + 1).to(torch.bfloat16)
        expect[keep, 3] = (plan.local_expert[keep] + 1).to(torch.bfloat16)
        assert torch.equal(buf, expect)
