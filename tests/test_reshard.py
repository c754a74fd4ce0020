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
