"""Bytes per channel and the alpha-beta communication model, against hand arithmetic."""
import pytest
import torch

from moe_kernels.analysis import comm


def counts_2r():
    # counts[src, dst, e], R=2, NL=2: rank 0 sends 3 routes to itself, 5 to rank 1;
    # rank 1 sends 2 to rank 0 and 4 to itself
    return torch.tensor([[[1, 2], [5, 0]], [[0, 2], [3, 1]]])


def test_padding_constants():
    assert comm.PAD_COLS == 8 and comm.PAD_TILE_BYTES == 32


@pytest.mark.parametrize("d", [1, 256, 4096, 7168])
def test_dispatch_and_combine_bytes_by_hand(d):
    b = comm.dispatch_bytes(counts_2r(), d)
    assert list(b) == ["x_i8", "scale", "weight", "r_route"]
    assert b["x_i8"].tolist() == [[3 * d, 5 * d], [2 * d, 4 * d]]
    for ch in ("scale", "weight", "r_route"):
        assert b[ch].tolist() == [[96, 160], [64, 128]]
    y = comm.combine_bytes(counts_2r(), d)
    # row = expert owner sending back, column = origin: rank 1 returns rank 0's 5 rows
    assert y.tolist() == [[3 * 2 * d, 2 * 2 * d], [5 * 2 * d, 4 * 2 * d]]


def test_demo_sized_total():
    # demo: T=128, K=2, D=4096, 2 ranks, every route remote: 256 routes per src
    counts = torch.zeros(2, 2, 8, dtype=torch.int64)
    counts[0, 1] = 32
    counts[1, 0] = 32
    b = comm.dispatch_bytes(counts, 4096)
    total = sum(int(v[0, 1]) for v in b.values())
    assert total == 256 * (4096 + 3 * 32)
    assert int(comm.combine_bytes(counts, 4096)[1, 0]) == 256 * 8192


def test_messages():
    assert comm.dispatch_messages(counts_2r(), "route").tolist() == [[3, 5], [2, 4]]
    c = counts_2r().clone()
    c[1, 0] = 0
    assert comm.dispatch_messages(c, "peer").tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="per"):
        comm.dispatch_messages(c, "tile")


def test_phase_model_by_hand_and_self_traffic_excluded():
    link = comm.LinkParams(bandwidth_gbps=1.0, latency_us=2.0)   # 1 GB/s = 1000 B/us
    nbytes = torch.tensor([[7_000, 3_000, 1_000],
                           [0, 5_000, 2_000],
                           [4_000, 0, 9_000]])
    msgs = torch.tensor([[9, 1, 1], [0, 9, 2], [1, 0, 9]])
    ph = comm.phase_model("dispatch", nbytes, msgs, link)
    # egress: r0 3+1 us bytes + 2*(1+1) = 8; r1 2 + 2*2 = 6; r2 4 + 2*1 = 6
    assert ph.egress_us.tolist() == pytest.approx([8.0, 6.0, 6.0])
    # ingress: r0 from r2: 4 + 2 = 6; r1 from r0: 3 + 2 = 5; r2: 1+2 (r0) + 2+4 (r1) = 9
    assert ph.ingress_us.tolist() == pytest.approx([6.0, 5.0, 9.0])
    assert ph.rank_us.tolist() == pytest.approx([8.0, 6.0, 9.0])
    assert ph.phase_us == pytest.approx(9.0)
    assert ph.self_bytes.tolist() == [7_000, 5_000, 9_000]
    assert torch.diagonal(ph.link_bytes).tolist() == [0, 0, 0]


def test_phase_model_accepts_channel_dicts():
    link = comm.LinkParams(bandwidth_gbps=2.0, latency_us=0.0)
    b = comm.dispatch_bytes(counts_2r(), 1000)
    ph = comm.phase_model("dispatch", b, torch.zeros(2, 2), link)
    # rank 0 -> 1: 5 routes * (1000 + 96) B = 5480 B at 2000 B/us
    assert float(ph.egress_us[0]) == pytest.approx(5480 / 2000)
    assert float(ph.ingress_us[0]) == pytest.approx(2 * 1096 / 2000)


def test_comm_model_route_vs_peer():
    link = comm.LinkParams(bandwidth_gbps=1.0, latency_us=1.0)
    c = counts_2r()
    m_peer = comm.comm_model(c, 1000, link, link, per="peer")
    m_route = comm.comm_model(c, 1000, link, link, per="route")
    # dispatch rank 0 egress: 5 routes * 1096 B / 1000 B/us + latency
    assert float(m_peer.dispatch.egress_us[0]) == pytest.approx(5.48 + 1.0)
    assert float(m_route.dispatch.egress_us[0]) == pytest.approx(5.48 + 4 * 5)
    # combine: rank 1 sends 5 rows * 2000 B back to rank 0
    assert float(m_peer.combine.egress_us[1]) == pytest.approx(10.0 + 1.0)
    rows = m_peer.table()
    assert rows[0]["total_us"] == pytest.approx(float(m_peer.rank_us[0]))
    assert rows[1]["self_bytes"] == 4 * 1000 + 4 * 96 + 4 * 2000


def test_defaults_follow_the_published_table():
    ll = comm.DEEPEP_ASCEND_LL
    assert (comm.DEFAULT_DISPATCH_GBPS, comm.DEFAULT_COMBINE_GBPS) == (ll[8][1], ll[8][3])
    assert comm.DEFAULT_DISPATCH_LATENCY_US == pytest.approx((ll[32][0] - ll[8][0]) / 24)
    assert comm.DEFAULT_COMBINE_LATENCY_US == pytest.approx((ll[32][2] - ll[8][2]) / 24,
                                                            abs=0.005)
    # EP8 with the defaults lands near the published latency: 128 tokens x top-8 routes
    # per rank (~7.4 MB at hidden 7168), all to remote ranks (146 to each of 7 peers)
    counts = torch.full((8, 8, 1), 146, dtype=torch.int64)
    counts[torch.arange(8), torch.arange(8)] = 0
    model = comm.comm_model(counts, 7168, per="peer")
    assert model.dispatch.phase_us == pytest.approx(ll[8][0], rel=0.1)
    assert model.combine.phase_us == pytest.approx(ll[8][2], rel=0.1)


def test_bad_parameters():
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        comm.LinkParams(0.0, 1.0)
    with pytest.raises(ValueError, match="latency_us"):
        comm.LinkParams(1.0, -1.0)
    with pytest.raises(ValueError, match="hidden"):
        comm.dispatch_bytes(counts_2r(), 0)
    with pytest.raises(ValueError, match=r"\[R, R, NL\]"):
        comm.dispatch_bytes(torch.zeros(2, 3, 1), 8)
