"""Heterogeneous tensor parallelism through the Connector: head slices and NHD <-> HND over TCP."""

import numpy as np
import pytest

import kvxfer
from kvxfer import BlockFormat, Connector, HeadOrder, HeadReshard, LayoutMismatchError, tp_head_range

BS, H, D = 16, 8, 32


def _nhd(nb, heads, seed):
    return [np.random.default_rng(seed + l).integers(0, 2**16, (2, nb, BS, heads, D), dtype=np.uint16) for l in range(3)]


def test_two_tp2_consumers_pull_their_halves_of_the_heads():
    prod = _nhd(32, H, 1)
    with Connector("prefill", backend="tcp") as p:
        p.register(prod, block_dim=1)
        src = np.array([3, 9, 4, 20])
        full = BlockFormat(HeadOrder.NHD, BS, H, D, 2)
        half = BlockFormat(HeadOrder.NHD, BS, H // 2, D, 2)
        for rank in range(2):
            cons = _nhd(16, H // 2, 10 + rank)
            with Connector(f"decode{rank}", backend="tcp") as c:
                c.register(cons, block_dim=1)
                with pytest.raises(LayoutMismatchError):
                    c.connect(p.metadata())
                peer = c.connect(p.metadata(), allow_layout_change=True)
                h0, h1 = tp_head_range(H, rank, 2)
                dst = np.array([0, 5, 6, 15])
                c.read(peer, src, dst, reshard=HeadReshard(full, half, (h0, h1))).wait(10)
                for t, u in zip(prod, cons):
                    assert np.array_equal(u[:, dst], t[:, src][:, :, :, h0:h1])


def test_write_converts_nhd_to_hnd():
    prod = _nhd(8, H, 2)
    cons = [np.zeros((2, 8, H, BS, D), np.uint16) for _ in range(3)]  # HND pieces
    with Connector("a", backend="tcp") as a, Connector("b", backend="tcp") as b:
        a.register(prod, block_dim=1)
        b.register(cons, block_dim=1)
        peer = a.connect(b.metadata(), allow_layout_change=True)
        rs = HeadReshard(BlockFormat(HeadOrder.NHD, BS, H, D, 2), BlockFormat(HeadOrder.HND, BS, H, D, 2))
        a.write(peer, [1, 2], [7, 0], layers=[0, 2], reshard=rs, notify=b"x").wait(10)
        assert b.wait_notification(5).payload == b"x"
        for i, (t, u) in enumerate(zip(prod, cons)):
            if i == 1:
                assert not u.any()
            else:
                assert np.array_equal(u[:, [7, 0]], t[:, [1, 2]].transpose(0, 1, 3, 2, 4))


def test_bad_reshard_is_refused_before_any_byte_moves():
    prod = _nhd(8, H, 3)
    cons = _nhd(8, H // 2, 4)
    with Connector("a", backend="tcp") as a, Connector("b", backend="tcp") as b:
        a.register(prod, block_dim=1)
        b.register(cons, block_dim=1)
        peer = b.connect(a.metadata(), allow_layout_change=True)
        full = BlockFormat(HeadOrder.NHD, BS, H, D, 2)
        half = BlockFormat(HeadOrder.NHD, BS, H // 2, D, 2)
        with pytest.raises(kvxfer.LayoutError, match="out of range"):
            b.read(peer, [0], [0], reshard=HeadReshard(full, half, (6, 10)))
        with pytest.raises(kvxfer.LayoutError):
            b.read(peer, [0], [0])  # plain transfer between unlike layouts
        before = [u.copy() for u in cons]
        assert all(np.array_equal(x, y) for x, y in zip(before, cons))


def test_reshard_wire_round_trip_and_malformed():
    rs = HeadReshard(BlockFormat(HeadOrder.NHD, 16, 8, 128, 2), BlockFormat(HeadOrder.HND, 16, 4, 128, 2), (4, 8), 0)
    assert HeadReshard.from_wire(rs.to_wire()) == rs
    for bad in (None, [], [1, 2, 3, 4], [["zz", 1, 1, 1, 1], ["nhd", 1, 1, 1, 1], None, 0],
                [["nhd", 1, 1, 1, 1], ["nhd", 1, 1, 1, 1], [1], 0], [["nhd", 0, 1, 1, 1], ["nhd", 1, 1, 1, 1], None, 0]):
        with pytest.raises(kvxfer.LayoutError):
            HeadReshard.from_wire(bad)
