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


def _tokens_nhd(cache: np.ndarray, blocks, start: int, n: int) -> np.ndarray:
    """[2, n, heads, D] of tokens at slots start..start+n of the blocks' concatenation."""
    return cache[:, list(blocks)].reshape(2, -1, *cache.shape[3:])[:, start:start + n]


def _ucxx_missing() -> str | None:
    try:
        import ucxx  # noqa: F401
    except Exception as exc:
        return f"ucxx is not importable here ({exc!r})"
    return None


BACKENDS = ["tcp", pytest.param("ucx", marks=pytest.mark.skipif(_ucxx_missing() is not None,
                                                                 reason=_ucxx_missing() or ""))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bs_src,bs_dst", [(16, 64), (64, 16)])
@pytest.mark.parametrize("op", ["read", "write"])
def test_block_size_change_with_a_head_slice(bs_src, bs_dst, op, backend):
    """Token-mapped reshard between connectors: lists of different lengths, a source start mid-block,
    TP 1 -> 2 heads, partial last blocks; bytes outside the mapped tokens stay untouched."""
    rng = np.random.default_rng(bs_src)
    prod = [rng.integers(0, 2**16, (2, 24, bs_src, H, D), dtype=np.uint16) for _ in range(3)]
    cons = [np.full((2, 20, bs_dst, H // 2, D), 0xBEEF, np.uint16) for _ in range(3)]
    before = [u.copy() for u in cons]
    n, s_start, d_start = 150, 5, 3  # token t: source slot 5 + t, destination slot 3 + t
    src = rng.permutation(24)[: -(-(s_start + n) // bs_src)]
    dst = rng.permutation(20)[: -(-(d_start + n) // bs_dst)]
    h0, h1 = tp_head_range(H, 1, 2)
    rs = HeadReshard(BlockFormat(HeadOrder.NHD, bs_src, H, D, 2), BlockFormat(HeadOrder.NHD, bs_dst, H // 2, D, 2),
                     (h0, h1), 0, num_tokens=n, src_start=s_start, dst_start=d_start)
    with Connector("p", backend=backend) as p, Connector("c", backend=backend) as c:
        p.register(prod, block_dim=1)
        c.register(cons, block_dim=1)
        if op == "read":
            peer = c.connect(p.metadata(), allow_layout_change=True)
            h = c.read(peer, src, dst, reshard=rs)
        else:
            peer = p.connect(c.metadata(), allow_layout_change=True)
            h = p.write(peer, src, dst, reshard=rs)
        h.wait(10)
        assert h.nbytes == 3 * 2 * n * (H // 2) * D * 2
    for t, u, b in zip(prod, cons, before):
        want = b.copy()
        flat = want[:, dst].reshape(2, -1, H // 2, D)
        flat[:, d_start:d_start + n] = _tokens_nhd(t, src, s_start, n)[:, :, h0:h1]
        want[:, dst] = flat.reshape(2, len(dst), bs_dst, H // 2, D)
        assert np.array_equal(u, want)


def test_token_reshard_errors_reach_the_caller_and_the_wire_parser():
    rng = np.random.default_rng(0)
    prod = [rng.integers(0, 2**16, (2, 8, 16, H, D), dtype=np.uint16) for _ in range(3)]
    cons = [np.zeros((2, 8, 64, H, D), np.uint16) for _ in range(3)]
    f16, f64 = BlockFormat(HeadOrder.NHD, 16, H, D, 2), BlockFormat(HeadOrder.NHD, 64, H, D, 2)
    with Connector("p", backend="tcp") as p, Connector("c", backend="tcp") as c:
        p.register(prod, block_dim=1)
        c.register(cons, block_dim=1)
        peer = c.connect(p.metadata(), allow_layout_change=True)
        with pytest.raises(kvxfer.BlockIdError, match="cover exactly 5 blocks"):
            c.read(peer, [0, 1, 2, 3], [0, 1], reshard=HeadReshard(f16, f64, num_tokens=70))
        with pytest.raises(kvxfer.BlockIdError, match="out of range"):
            c.read(peer, [0, 1, 2, 9, 4], [0, 1], reshard=HeadReshard(f16, f64, num_tokens=70))
        with pytest.raises(kvxfer.BlockIdError, match="duplicates"):
            c.read(peer, [0, 1, 2, 3, 4, 5, 6, 7], [1, 1], reshard=HeadReshard(f16, f64, num_tokens=128))
        with pytest.raises(kvxfer.BlockIdError, match="first block"):
            c.read(peer, [0, 1], [0], reshard=HeadReshard(f16, f64, num_tokens=10, src_start=16))
        c.read(peer, [3, 4, 5], [6], reshard=HeadReshard(f16, f64, num_tokens=40, src_start=4, dst_start=2)).wait(10)
        for t, u in zip(prod, cons):
            assert np.array_equal(u[:, 6, 2:42], t[:, [3, 4, 5]].reshape(2, 48, H, D)[:, 4:44])
            assert not u[:, 6, :2].any() and not u[:, 6, 42:].any()
    rs = HeadReshard(f16, f64, (2, 6), 1, num_tokens=40, src_start=4, dst_start=2)
    assert HeadReshard.from_wire(rs.to_wire()) == rs
    assert len(HeadReshard(f16, f64).to_wire()) == 4  # block-mapped form unchanged
    good = rs.to_wire()
    for bad in (good[:5], good[:6] + [-1], good[:4] + [True, 0, 0], good[:4] + [1.5, 0, 0], good[:4] + [1 << 41, 0, 0]):
        with pytest.raises(kvxfer.LayoutError):
            HeadReshard.from_wire(bad)


def test_reshard_from_wire_refuses_random_garbage_with_layout_error_only():
    """Mutations of a valid token-mapped wire form: each parses to a HeadReshard or raises
    LayoutError (which backends turn into RemoteProtocolError), never anything else."""
    import random

    rnd = random.Random(0)
    good = HeadReshard(BlockFormat(HeadOrder.NHD, 16, 8, 128, 2), BlockFormat(HeadOrder.HND, 64, 4, 128, 2), (4, 8),
                       0, num_tokens=100, src_start=3, dst_start=0).to_wire()
    junk = [None, True, -1, 0, 1 << 45, 1.5, "nhd", "x", b"\x00", [], [1], {"a": 1}, [["nhd"]]]
    parsed = refused = 0
    for _ in range(3000):
        w = [list(x) if isinstance(x, list) else x for x in good]
        i = rnd.randrange(len(w))
        if isinstance(w[i], list) and w[i] and rnd.random() < 0.6:
            w[i][rnd.randrange(len(w[i]))] = rnd.choice(junk)
        else:
            w[i] = rnd.choice(junk)
        if rnd.random() < 0.1:
            w = w[: rnd.randrange(len(w) + 1)]
        try:
            rs = HeadReshard.from_wire(w)
        except kvxfer.LayoutError:
            refused += 1
        else:
            parsed += 1
            assert isinstance(rs, HeadReshard) and HeadReshard.from_wire(rs.to_wire()) == rs
    assert refused > 2000 and parsed > 0
