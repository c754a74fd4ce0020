"""Head slicing and NHD <-> HND jobs, executed by the numpy reference, against numpy indexing."""

from __future__ import annotations

import numpy as np
import pytest

from kvxfer.errors import BlockIdError, LayoutError
from kvxfer.layout import KVLayout
from kvxfer.ops import reference
from kvxfer.ops.jobs import as_plan, gather_jobs, scatter_jobs
from kvxfer.reshard import BlockFormat, HeadOrder, plan_reshard, tp_head_range

BS, D = 4, 3


def _cache(order: HeadOrder, nb: int, heads: int, layers: int, rng: np.random.Generator, dtype=np.float16):
    shape = (2, nb, BS, heads, D) if order is HeadOrder.NHD else (2, nb, heads, BS, D)
    return [rng.integers(0, 1 << 15, size=shape).astype(np.uint16).view(np.float16).astype(dtype) for _ in range(layers)]


def _views(arrs):
    return [a.view(np.uint8).reshape(-1) for a in arrs]


def _as_nhd(a: np.ndarray, order: HeadOrder) -> np.ndarray:
    """[2, nb, BS, H, D] view of a cache in either order."""
    return a if order is HeadOrder.NHD else a.transpose(0, 1, 3, 2, 4)


def _fmt(order: HeadOrder, heads: int, itemsize: int = 2) -> BlockFormat:
    return BlockFormat(order, BS, heads, D, itemsize)


ORDERS = [HeadOrder.NHD, HeadOrder.HND]


@pytest.mark.parametrize("src_order", ORDERS)
@pytest.mark.parametrize("dst_order", ORDERS)
@pytest.mark.parametrize("heads", [None, (0, 2), (2, 4), (3, 4)])
def test_slice_and_permute_match_numpy(src_order, dst_order, heads):
    rng = np.random.default_rng(7)
    H = 4
    h0, h1 = heads or (0, H)
    src = _cache(src_order, 9, H, 3, rng)
    dst = _cache(dst_order, 7, h1 - h0, 3, rng)
    before = [a.copy() for a in dst]
    src_l = KVLayout.from_tensors(src, block_dim=1)
    dst_l = KVLayout.from_tensors(dst, block_dim=1)
    sb, db = [5, 0, 8, 1], [2, 6, 0, 3]
    plan = plan_reshard(src_l.geometry, _fmt(src_order, H), dst_l.geometry, _fmt(dst_order, h1 - h0), sb, db,
                        src_heads=heads)
    reference.copy_blocks(plan, _views(src), _views(dst))
    for s_arr, d_arr, b_arr in zip(src, dst, before):
        want = _as_nhd(b_arr, dst_order).copy()
        want[:, db] = _as_nhd(s_arr, src_order)[:, sb, :, h0:h1, :]
        np.testing.assert_array_equal(_as_nhd(d_arr, dst_order), want)


@pytest.mark.parametrize("order", ORDERS)
def test_two_ranks_assemble_a_full_block(order):
    """Decode TP=2 halves written back into one TP=1 block (dst_head_start), both orders."""
    rng = np.random.default_rng(3)
    H = 4
    halves = [_cache(order, 5, H // 2, 1, rng)[0] for _ in range(2)]
    full = _cache(HeadOrder.NHD, 6, H, 1, rng)[0]
    full_l = KVLayout.from_tensors([full], block_dim=1)
    for rank, half in enumerate(halves):
        h0, h1 = tp_head_range(H, rank, 2)
        half_l = KVLayout.from_tensors([half], block_dim=1)
        plan = plan_reshard(half_l.geometry, _fmt(order, H // 2), full_l.geometry, _fmt(HeadOrder.NHD, H),
                            [1, 4], [5, 0], dst_head_start=h0)
        reference.copy_blocks(plan, _views([half]), _views([full]))
    for rank, half in enumerate(halves):
        h0, h1 = tp_head_range(H, rank, 2)
        np.testing.assert_array_equal(full[:, [5, 0], :, h0:h1], _as_nhd(half, order)[:, [1, 4]])


def test_blocks_first_layout_and_fp8_sized_items():
    """[nb, 2, BS, H, D] (one segment holding K and V pieces) with 1-byte items and odd sizes."""
    rng = np.random.default_rng(11)
    H = 3
    src = rng.integers(0, 256, size=(6, 2, BS, H, D), dtype=np.uint8)
    dst = np.full((5, 2, 2, BS, D), 0xAB, dtype=np.uint8)
    sl, dl = KVLayout.from_tensors([src]), KVLayout.from_tensors([dst])
    plan = plan_reshard(sl.geometry, _fmt(HeadOrder.NHD, H, 1), dl.geometry, _fmt(HeadOrder.HND, 2, 1),
                        [0, 5, 2], [4, 1, 2], src_heads=(1, 3))
    reference.copy_blocks(plan, _views([src]), _views([dst]))
    want = np.full_like(dst, 0xAB)
    want[[4, 1, 2]] = src[[0, 5, 2]][:, :, :, 1:3].transpose(0, 1, 3, 2, 4)
    np.testing.assert_array_equal(dst, want)


def test_gather_then_scatter_through_a_buffer_equals_direct_copy():
    rng = np.random.default_rng(5)
    src = _cache(HeadOrder.NHD, 8, 4, 2, rng)
    a = _cache(HeadOrder.HND, 8, 2, 2, rng)
    b = [x.copy() for x in a]
    sl, dl = KVLayout.from_tensors(src, block_dim=1), KVLayout.from_tensors(a, block_dim=1)
    plan = plan_reshard(sl.geometry, _fmt(HeadOrder.NHD, 4), dl.geometry, _fmt(HeadOrder.HND, 2),
                        [3, 1, 7], [0, 6, 2], src_heads=(2, 4))
    reference.copy_blocks(plan, _views(src), _views(a))
    buf = np.empty(plan.nbytes, dtype=np.uint8)
    reference.copy_blocks(as_plan(gather_jobs(plan)), _views(src), [buf])
    reference.copy_blocks(as_plan(scatter_jobs(plan)), [buf], _views(b))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_zero_blocks_is_an_empty_plan():
    rng = np.random.default_rng(0)
    src = _cache(HeadOrder.NHD, 4, 4, 1, rng)
    sl = KVLayout.from_tensors(src, block_dim=1)
    plan = plan_reshard(sl.geometry, _fmt(HeadOrder.NHD, 4), sl.geometry, _fmt(HeadOrder.HND, 4), [], [])
    assert plan.nbytes == 0


def test_errors_name_the_problem():
    rng = np.random.default_rng(0)
    src = _cache(HeadOrder.NHD, 4, 4, 1, rng)
    dst = _cache(HeadOrder.NHD, 4, 2, 1, rng)
    sl, dl = KVLayout.from_tensors(src, block_dim=1), KVLayout.from_tensors(dst, block_dim=1)
    with pytest.raises(LayoutError, match="do not fit"):
        plan_reshard(sl.geometry, _fmt(HeadOrder.NHD, 4), dl.geometry, _fmt(HeadOrder.NHD, 2), [0], [0])
    with pytest.raises(LayoutError, match="out of range"):
        plan_reshard(sl.geometry, _fmt(HeadOrder.NHD, 4), dl.geometry, _fmt(HeadOrder.NHD, 2), [0], [0],
                     src_heads=(3, 5))
    with pytest.raises(LayoutError, match="whole pieces"):
        plan_reshard(sl.geometry, _fmt(HeadOrder.NHD, 3), dl.geometry, _fmt(HeadOrder.NHD, 2), [0], [0],
                     src_heads=(0, 2))
    with pytest.raises(BlockIdError):
        plan_reshard(sl.geometry, _fmt(HeadOrder.NHD, 4), dl.geometry, _fmt(HeadOrder.NHD, 2), [0, 1], [0, 0],
                     src_heads=(0, 2))
    with pytest.raises(LayoutError):
        tp_head_range(5, 0, 2)


# --- token-mapped reshards: block sizes that differ ------------------------------------------

from kvxfer.reshard import HeadReshard, plan_token_reshard  # noqa: E402


def _tcache(order: HeadOrder, nb: int, bs: int, heads: int, rng, fill=None):
    shape = (2, nb, bs, heads, D) if order is HeadOrder.NHD else (2, nb, heads, bs, D)
    if fill is not None:
        return np.full(shape, fill, dtype=np.uint16)
    return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)


def _tokens(a: np.ndarray, order: HeadOrder, blocks) -> np.ndarray:
    """[2, slots, heads, D] of the concatenated blocks."""
    v = _as_nhd(a, order)[:, list(blocks)]
    return v.reshape(2, -1, *v.shape[3:])


@pytest.mark.parametrize("bs_src,bs_dst", [(4, 16), (16, 4), (4, 12), (12, 4), (6, 4), (4, 4), (5, 7)])
@pytest.mark.parametrize("src_order", ORDERS)
@pytest.mark.parametrize("dst_order", ORDERS)
@pytest.mark.parametrize("heads,dst_heads,dst_h0", [(None, 4, 0), ((1, 3), 2, 0), ((2, 4), 4, 2)])
def test_token_mapping_matches_a_token_by_token_copy(bs_src, bs_dst, src_order, dst_order, heads, dst_heads, dst_h0):
    rng = np.random.default_rng(bs_src * 31 + bs_dst)
    H, n, s0, d0 = 4, 29, bs_src - 1, 1 if bs_dst > 1 else 0
    h0, h1 = heads or (0, H)
    src = _tcache(src_order, 16, bs_src, H, rng)
    dst = _tcache(dst_order, 16, bs_dst, dst_heads, rng, fill=0xDEAD)
    sb = rng.permutation(16)[: -(-(s0 + n) // bs_src)]
    db = rng.permutation(16)[: -(-(d0 + n) // bs_dst)]
    sl, dl = KVLayout.from_tensors([src], block_dim=1), KVLayout.from_tensors([dst], block_dim=1)
    plan = plan_token_reshard(sl.geometry, BlockFormat(src_order, bs_src, H, D, 2), dl.geometry,
                              BlockFormat(dst_order, bs_dst, dst_heads, D, 2), sb, db, num_tokens=n, src_start=s0,
                              dst_start=d0, src_heads=heads, dst_head_start=dst_h0)
    want = _as_nhd(dst, dst_order).copy()
    st = _tokens(src, src_order, sb)
    for t in range(n):  # the oracle, one token at a time
        s, d = s0 + t, d0 + t
        want[:, db[d // bs_dst], d % bs_dst, dst_h0:dst_h0 + h1 - h0] = st[:, s, h0:h1]
    reference.copy_blocks(plan, _views([src]), _views([dst]))
    np.testing.assert_array_equal(_as_nhd(dst, dst_order), want)
    assert plan.nbytes == 2 * n * (h1 - h0) * D * 2
    np.testing.assert_array_equal(plan.dst_blocks, db)


def test_token_jobs_one_per_chunk_piece_and_head_group():
    """16 -> 64 from slot 5: chunks split where either side crosses a block; NHD with all heads
    moves each chunk as one contiguous run, a head slice strides per token; HND moves a chunk of
    several heads in one job; mixed orders go head by head."""
    rng = np.random.default_rng(0)
    H, n = 4, 100
    sb, db = list(range(1, 8)), [3, 0]  # slots 5..104: 7 source blocks of 16, 2 destination blocks of 64
    f = lambda o, bs, h=H: BlockFormat(o, bs, h, D, 2)  # noqa: E731
    chunks = 8  # source cuts at 11, 27, 43, 59, 75, 91; destination cut at 64
    for so, do, heads, per_chunk in [(HeadOrder.NHD, HeadOrder.NHD, None, 1), (HeadOrder.NHD, HeadOrder.NHD, (0, 2), 1),
                                     (HeadOrder.HND, HeadOrder.HND, None, 1), (HeadOrder.NHD, HeadOrder.HND, None, H)]:
        s = _tcache(so, 12, 16, H, rng)
        dh = H if heads is None else heads[1] - heads[0]
        d = _tcache(do, 4, 64, dh, rng)
        plan = plan_token_reshard(KVLayout.from_tensors([s], block_dim=1).geometry, f(so, 16),
                                  KVLayout.from_tensors([d], block_dim=1).geometry, f(do, 64, dh), sb, db,
                                  num_tokens=n, src_start=5, src_heads=heads)
        assert plan.nbytes == 2 * n * dh * D * 2
        assert plan.jobs.size == 2 * chunks * per_chunk  # 2 pieces (K, V)
        if so is do and heads is None:
            assert (plan.jobs["src_count"] == 1).all() == (so is HeadOrder.NHD)
        if heads is not None:  # a slice of the source's tokens, whole tokens of the destination
            assert (plan.jobs["src_stride"] == H * D * 2).all() and (plan.jobs["src_run"] == 2 * D * 2).all()
            assert (plan.jobs["dst_count"] == 1).all()


def test_token_plan_through_a_buffer_equals_direct_copy():
    rng = np.random.default_rng(5)
    src = _tcache(HeadOrder.NHD, 8, 16, 4, rng)
    a = _tcache(HeadOrder.HND, 4, 64, 2, rng)
    b = a.copy()
    sl, dl = KVLayout.from_tensors([src], block_dim=1), KVLayout.from_tensors([a], block_dim=1)
    rs = HeadReshard(BlockFormat(HeadOrder.NHD, 16, 4, D, 2), BlockFormat(HeadOrder.HND, 64, 2, D, 2), (2, 4),
                     num_tokens=70, src_start=3, dst_start=10)
    plan = rs.plan(sl.geometry, dl.geometry, np.array([3, 1, 7, 0, 5]), np.array([2, 0]), None)
    reference.copy_blocks(plan, _views([src]), _views([a]))
    buf = np.empty(plan.nbytes, dtype=np.uint8)
    reference.copy_blocks(as_plan(gather_jobs(plan)), _views([src]), [buf])
    reference.copy_blocks(as_plan(scatter_jobs(plan)), [buf], _views([b]))
    np.testing.assert_array_equal(a, b)


def test_token_mapping_errors_name_the_problem():
    rng = np.random.default_rng(0)
    src = _tcache(HeadOrder.NHD, 8, 16, 4, rng)
    dst = _tcache(HeadOrder.NHD, 4, 64, 4, rng)
    sl, dl = KVLayout.from_tensors([src], block_dim=1), KVLayout.from_tensors([dst], block_dim=1)
    f16, f64 = BlockFormat(HeadOrder.NHD, 16, 4, D, 2), BlockFormat(HeadOrder.NHD, 64, 4, D, 2)
    plan = lambda s, d, **kw: plan_token_reshard(sl.geometry, f16, dl.geometry, f64, s, d, **kw)  # noqa: E731
    with pytest.raises(BlockIdError, match="cover exactly 3 blocks.*source list holds 2"):
        plan([0, 1], [0], num_tokens=40)
    with pytest.raises(BlockIdError, match="destination list holds 2"):
        plan([0, 1, 2], [0, 1], num_tokens=40)
    with pytest.raises(BlockIdError, match="first block"):
        plan([0, 1, 2], [0], num_tokens=20, src_start=16)
    with pytest.raises(BlockIdError, match="must be empty"):
        plan([0], [], num_tokens=0)
    with pytest.raises(BlockIdError, match="non-negative"):
        plan([0], [0], num_tokens=-1)
    with pytest.raises(BlockIdError, match="out of range"):
        plan([0, 8], [0], num_tokens=20)
    with pytest.raises(BlockIdError, match="out of range"):
        plan([0, 1], [4], num_tokens=20)
    with pytest.raises(BlockIdError, match="duplicates"):
        plan(list(range(8)), [1, 1], num_tokens=128)
    with pytest.raises(LayoutError, match="head size or itemsize"):
        plan_token_reshard(sl.geometry, f16, dl.geometry, BlockFormat(HeadOrder.NHD, 64, 4, D, 1), [0], [0],
                           num_tokens=4)
    with pytest.raises(LayoutError, match="need num_tokens"):
        HeadReshard(f16, f16, src_start=3).plan(sl.geometry, sl.geometry, np.array([0]), np.array([1]), None)
    assert plan([], [], num_tokens=0).nbytes == 0
