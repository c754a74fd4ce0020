"""kv_copy_pairs: block-pair records checked on CPU (a numpy walk of the kernel's items) and,
on a GPU, the kernel itself against the numpy reference."""

import ctypes

import numpy as np
import pytest

from kvxfer import KVLayout, plan_transfer
from kvxfer._memory import host_bytes
from kvxfer.ops import reference
from kvxfer.ops.pairs import MAX_ITEM_BYTES, pair_records
from kvpeers import LayoutSpec


def _views(layout):
    return [host_bytes(int(a), t.span) for a, t in zip(layout.addrs, layout.geometry.tensors)]


def _bytes(ts):
    return [np.ascontiguousarray(t).view(np.uint8).copy() for t in ts]


def _ids(rng, n_src, n_dst):
    # a long consecutive run on both sides (coalesced, split into bounded items) plus random ids
    s = np.concatenate([np.arange(2, 42), rng.choice(np.arange(45, n_src), 9, replace=False)])
    d = np.concatenate([np.arange(5, 45), rng.choice(np.arange(50, n_dst), 9, replace=False)])
    return s, d


@pytest.mark.parametrize("kind", ["kv_first", "blocks_first", "mla", "vllm_shared"])
def test_walking_the_items_reproduces_the_reference_copy(kind):
    rng = np.random.default_rng(3)
    st, bd = LayoutSpec(kind, 64, layers=3, block_size=32, heads=8, head_dim=64).build(1)
    ref_t, _ = LayoutSpec(kind, 80, layers=3, block_size=32, heads=8, head_dim=64).build(2)
    out_t, _ = LayoutSpec(kind, 80, layers=3, block_size=32, heads=8, head_dim=64).build(2)
    ls, lr, lo = (KVLayout.from_tensors(x, block_dim=bd) for x in (st, ref_t, out_t))
    s, d = _ids(rng, 64, 80)
    plan = plan_transfer(ls.geometry, lr.geometry, s, d, np.array([0, 2]))
    reference.copy_blocks(plan, _views(ls), _views(lr))
    rec, coal_runs, single_runs, nitems = pair_records(plan.block_pairs, ls.addrs, lo.addrs)
    moved = 0
    for it in range(nitems):  # what each warp of kv_copy_pairs does
        p = rec[int(np.searchsorted(rec["item0"], it, side="right") - 1)]
        runs = coal_runs if p["coal"] else single_runs
        nr = runs.size // 3
        m, k = divmod(it - int(p["item0"]), nr)
        n = int(runs[2 * nr + k]) * int(p["run"])
        assert n <= max(MAX_ITEM_BYTES, int(p["run"]))
        src = int(p["src"]) + int(runs[k]) * int(p["src_bstride"]) + m * int(p["src_stride"])
        dst = int(p["dst"]) + int(runs[nr + k]) * int(p["dst_bstride"]) + m * int(p["dst_stride"])
        assert src % (1 << int(p["unit"])) == 0 and dst % (1 << int(p["unit"])) == 0
        ctypes.memmove(dst, src, n)
        moved += n
    assert moved == plan.nbytes
    assert all(np.array_equal(a, b) for a, b in zip(_bytes(ref_t), _bytes(out_t)))


def test_empty_plan_has_no_items():
    ts, bd = LayoutSpec("kv_first", 8).build(0)
    lay = KVLayout.from_tensors(ts, block_dim=bd)
    plan = plan_transfer(lay.geometry, lay.geometry, [], [])
    assert pair_records(plan.block_pairs, lay.addrs, lay.addrs)[3] == 0


torch = pytest.importorskip("torch")


def _as_gpu_bytes(t: np.ndarray, block_dim: int):
    """``t`` as a CUDA uint8 tensor that keeps the block dimension (blocks hold the same bytes)."""
    u8 = torch.from_numpy(np.ascontiguousarray(t).view(np.uint8)).cuda()
    return u8.reshape(t.shape[0], -1) if block_dim == 0 else u8.reshape(t.shape[0], t.shape[1], -1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("kind", ["kv_first", "blocks_first", "mla"])
def test_kernel_matches_reference_on_gpu(kind):
    pytest.importorskip("cupy", reason="the CUDA ops need cupy")
    from kvxfer.ops.pairs import copy_block_pairs

    rng = np.random.default_rng(5)
    spec_s = LayoutSpec(kind, 64, layers=3, block_size=32, heads=8, head_dim=64)
    spec_d = LayoutSpec(kind, 80, layers=3, block_size=32, heads=8, head_dim=64)
    st, bd = spec_s.build(1)
    ref_t, _ = spec_d.build(2)
    g_src = [_as_gpu_bytes(t, bd) for t in st]
    g_dst = [_as_gpu_bytes(t, bd) for t in ref_t]  # the destination starts as the reference did
    s, d = _ids(rng, 64, 80)
    ls, lr = KVLayout.from_tensors(st, block_dim=bd), KVLayout.from_tensors(ref_t, block_dim=bd)
    reference.copy_blocks(plan_transfer(ls.geometry, lr.geometry, s, d), _views(ls), _views(lr))
    gs, gd = KVLayout.from_tensors(g_src, block_dim=bd), KVLayout.from_tensors(g_dst, block_dim=bd)
    copy_block_pairs(plan_transfer(gs.geometry, gd.geometry, s, d).block_pairs, gs, gd)
    torch.cuda.synchronize()
    for g, r in zip(g_dst, _bytes(ref_t)):
        assert np.array_equal(g.cpu().numpy().reshape(-1), r.reshape(-1))
