"""Bytes per channel and the communication model, against hand arithmetic; its
validation against the published DeepEP-Ascend points and the `comm --validate` command."""
import re

import pytest
import torch

from moe_kernels import cli
from moe_kernels.analysis import comm
from moe_kernels.analysis.published import DEEPEP_ASCEND_LL
from moe_kernels.ep import layout as ep_layout


def counts_2r():
    # counts[src, dst, e], R=2, NL=2: rank 0 sends 3 routes to itself, 5 to rank 1;
    # rank 1 sends 2 to rank 0 and 4 to itself
    return torch.tensor([[[1, 2], [5, 0]], [[0, 2], [3, 1]]])


def test_padding_constants_have_one_owner():
    assert ep_layout.PAD_COLS == 8 and ep_layout.PAD_BYTES == 32
    assert not hasattr(comm, "PAD_COLS") and not hasattr(comm, "PAD_TILE_BYTES")


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
    # the same accounting as the EP program's (routes [R,R] work as well as counts)
    routes = counts_2r().sum(-1)
    assert comm.combine_bytes(routes, d).tolist() == y.tolist()
    assert ep_layout.peer_channel_bytes(routes, d)["combine"].tolist() == y.tolist()


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


def _published_values():
    return {v for row in DEEPEP_ASCEND_LL.values() for v in row}


def test_parameters_are_hardware_figures_not_published_points():
    d, c = comm.DISPATCH_LINK, comm.COMBINE_LINK
    assert d.bandwidth_gbps == c.bandwidth_gbps == comm.A3_UB.port_gbps == 196.0
    assert d.latency_us == c.latency_us == comm.A3_UB.latency_us
    assert comm.A2_HCCS.port_gbps == 7 * comm.A2_HCCS.link_gbps == 392.0
    published = _published_values()
    old_fit = {0.875, 1.04}                       # the former circular defaults
    for link in (d, c):
        for v in (link.bandwidth_gbps, link.latency_us, round(link.overhead_us, 1)):
            assert v not in published and v not in old_fit
        assert "2506.12708" in link.source and "fitted" in link.source


def test_overheads_are_fitted_on_ep8_only(monkeypatch):
    d_over, c_over = comm.fit_overheads()
    assert (comm.DISPATCH_LINK.overhead_us, comm.COMBINE_LINK.overhead_us) == (d_over, c_over)
    # the fit reproduces EP8 exactly: overhead + modelled link time = published
    bare = comm.with_overheads(comm.fabric_links(), 0.0, 0.0)
    ep8 = [r for r in comm.published_comparison(bare) if r.ep == comm.FIT_EP]
    assert ep8[0].model_us + d_over == pytest.approx(DEEPEP_ASCEND_LL[8][0])
    assert ep8[1].model_us + c_over == pytest.approx(DEEPEP_ASCEND_LL[8][2])
    # the held-out points do not enter the fit
    for ep in (16, 32):
        monkeypatch.setitem(DEEPEP_ASCEND_LL, ep, (1.0, 1.0, 1.0, 1.0))
    assert comm.fit_overheads.__wrapped__() == (d_over, c_over)


def test_uniform_counts_at_the_published_shape():
    for ep in (8, 16, 32):
        c = comm.uniform_counts(ep, 128, 8, 256)
        assert c.shape == (ep, ep, 256 // ep)
        assert (c.sum(-1) == 1024 // ep).all()       # 128 tokens x top-8, spread evenly


def test_published_point_bytes_by_hand():
    # EP8, no overhead, no latency: 7 of 8 peers remote, 128 routes each = 896 routes per
    # rank; dispatch D + 3 tiles of 32 B, combine 2·D, at 196 GB/s = 196000 B/us
    link = comm.LinkParams(196.0, 0.0)
    bare = comm.CommLinks(link, link, link)
    rows = {(r.ep, r.phase): r.model_us for r in comm.published_comparison(bare)}
    assert rows[(8, "dispatch")] == pytest.approx(896 * (7168 + 96) / 196e3)
    assert rows[(8, "combine")] == pytest.approx(896 * 2 * 7168 / 196e3)
    assert rows[(32, "combine")] == pytest.approx(992 * 2 * 7168 / 196e3)


def test_validation_table_and_held_out_bound():
    rows = comm.published_comparison()
    assert [(r.ep, r.phase) for r in rows] == [(e, p) for e in (8, 16, 32)
                                              for p in ("dispatch", "combine")]
    assert [r.fitted for r in rows] == [True, True, False, False, False, False]
    for r in rows:
        pub = DEEPEP_ASCEND_LL[r.ep][0 if r.phase == "dispatch" else 2]
        assert r.published_us == pub
        assert r.error_pct == pytest.approx(100 * (r.model_us - pub) / pub)
        assert "sgl-kernel-npu" in r.source
    assert all(abs(r.error_pct) < 1e-6 for r in rows if r.fitted)
    worst = comm.held_out_max_error(rows)
    assert worst == max(abs(r.error_pct) for r in rows[2:])
    assert 0 < worst <= comm.HELD_OUT_BOUND_PCT
    disp = [r.model_us for r in rows if r.phase == "dispatch"]
    assert disp == sorted(disp)                    # more peers, more time


def test_cli_validate_prints_every_point_and_the_last_line(capsys):
    assert cli.main(["comm", "--validate"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = [ln for ln in lines if re.match(r"^\s+(8|16|32)\s+(dispatch|combine)\s", ln)]
    assert len(table) == 6
    assert sum("used to fit" in ln for ln in table) == 2
    assert sum("held out" in ln for ln in table) == 4
    assert "132.0" in table[0] and "+0.0%" in table[0]
    m = re.fullmatch(r"comm-validate: held-out max error (\d+\.\d)%", lines[-1])
    assert m and float(m.group(1)) == round(comm.held_out_max_error(
        comm.published_comparison()), 1)
    assert cli.main(["comm"]) == 0
    assert "2506.12708" in capsys.readouterr().out


def test_cli_validate_exits_1_beyond_the_bound(capsys, monkeypatch):
    from moe_kernels import comm_cmd
    bad = [comm.ComparisonRow(8, "dispatch", 100.0, 100.0, True),
           comm.ComparisonRow(16, "dispatch", 130.0, 100.0, False)]
    monkeypatch.setattr(comm_cmd, "published_comparison", lambda: bad)
    assert cli.main(["comm", "--validate"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "comm-validate: held-out max error 30.0%"


def test_ep_step_comm_by_hand():
    routes = torch.tensor([[3, 5], [2, 4]])
    links = comm.CommLinks(
        counts=comm.LinkParams(1.0, 0.5),                          # 1000 B/us
        dispatch=comm.LinkParams(2.0, 1.0, overhead_us=10.0),      # 2000 B/us
        combine=comm.LinkParams(1.0, 0.0, peer_gbps=0.5, overhead_us=3.0))
    step = comm.ep_step_comm(routes, 1000, 2, links)
    # count exchange: R·NL·4 = 16 B to the one peer, one message: 0.016 + 0.5
    assert step.counts.rank_us.tolist() == pytest.approx([0.516, 0.516])
    # dispatch: rank 0 sends 5 routes x 1096 B = 2.74 us + 1 us, receives 2 x 1096 B
    assert step.dispatch.egress_us.tolist() == pytest.approx([3.74, 2.096])
    assert step.dispatch.rank_us.tolist() == pytest.approx([13.74, 13.74])
    # combine: rank 1 returns 5 rows x 2000 B; the 500 B/us peer link binds: 20 us
    assert step.combine.egress_us.tolist() == pytest.approx([8.0, 20.0])
    assert step.combine.rank_us.tolist() == pytest.approx([23.0, 23.0])
    assert step.rank_us.tolist() == pytest.approx([37.256, 37.256])
    assert list(step.per_rank_us()) == ["count exchange", "dispatch", "combine"]
    # counts [R,R,NL] give the same answer as routes [R,R]
    again = comm.ep_step_comm(counts_2r(), 1000, 2, links)
    assert again.rank_us.tolist() == pytest.approx(step.rank_us.tolist())


def test_port_or_peer_link_whichever_binds():
    link = comm.LinkParams(2.0, 0.0, peer_gbps=1.5)               # 2000 / 1500 B/us
    b = torch.tensor([[0, 3000, 3000], [0, 0, 0], [0, 0, 0]])
    ph = comm.phase_model("dispatch", b, torch.zeros(3, 3), link)
    assert float(ph.egress_us[0]) == pytest.approx(3.0)           # port: 6000 / 2000
    assert float(ph.ingress_us[1]) == pytest.approx(2.0)          # link: 3000 / 1500


def test_default_step_at_a_decode_shape():
    routes = torch.full((8, 8), 64)
    step = comm.ep_step_comm(routes, 7168, 32)
    a2 = comm.ep_step_comm(routes, 7168, 32, comm.fabric_links(comm.A2_HCCS))
    assert (step.dispatch.rank_us >= comm.DISPATCH_LINK.overhead_us).all()
    assert step.counts.link.overhead_us == 0.0
    assert a2.dispatch.link.peer_gbps == 56.0
    assert float(step.counts.rank_us[0]) == pytest.approx(7 * (8 * 32 * 4 / 196e3 + 1.0))


def test_bad_parameters():
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        comm.LinkParams(0.0, 1.0)
    with pytest.raises(ValueError, match="latency_us"):
        comm.LinkParams(1.0, -1.0)
    with pytest.raises(ValueError, match="peer_gbps"):
        comm.LinkParams(1.0, 1.0, peer_gbps=0.0)
    with pytest.raises(ValueError, match="overhead_us"):
        comm.LinkParams(1.0, 1.0, overhead_us=-1.0)
    with pytest.raises(ValueError, match="n_local"):
        comm.count_bytes(2, 0)
    with pytest.raises(ValueError, match="hidden"):
        comm.dispatch_bytes(counts_2r(), 0)
    with pytest.raises(ValueError, match=r"\[R, R, NL\]"):
        comm.dispatch_bytes(torch.zeros(2, 3, 1), 8)
