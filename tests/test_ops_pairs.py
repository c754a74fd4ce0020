"""kv_copy_pairs: block-pair records checked on CPU (a numpy walk of the kernel's items) and,
on a GPU, the kernel itself against the numpy reference."""

import ctypes
import itertools

import numpy as np
import pytest

from kvxfer import KVLayout, plan_transfer
from kvxfer._memory import host_bytes
from kvxfer.ops import reference
from kvxfer.ops.pairs import (
    BUF_DST,
    BUF_NONE,
    BUF_SRC,
    MAX_ITEM_BYTES,
    MIN_PART_BYTES,
    PAIR_DTYPE,
    RUN_FIELDS,
    pair_records,
    split_shift_for,
)
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


def _walk_like_the_kernel(rec, coal_runs, single_runs, nitems, nwarps, split, buf_side=BUF_NONE, item_base=0,
                          rows_inner=None, uniform=0):
    """What the warps of kv_copy_pairs do, step for step: each warp locates its first part by
    binary search, then steps (part, row, run, pair) incrementally. Returns the bytes moved."""
    ncoal, nsingle = coal_runs.size // RUN_FIELDS, single_runs.size // RUN_FIELDS
    rows_inner = buf_side != BUF_NONE if rows_inner is None else rows_inner
    nparts = 1 << split
    total = nitems << split
    per = -(-total // nwarps)

    def pair(p):
        r = rec[p]
        runs, nr = (coal_runs, ncoal) if r["coal"] else (single_runs, nsingle)
        return r, runs, nr

    moved = 0
    for w in range(nwarps):
        pos, end = w * per, min(w * per + per, total)
        if pos >= end:
            continue
        item, part = (pos >> split) + item_base, pos & (nparts - 1)
        p = item // uniform if uniform else int(np.searchsorted(rec["item0"], item, side="right") - 1)
        r, runs, nr = pair(p)
        if rows_inner:
            k, m = divmod(item - int(r["item0"]), int(r["count"]))
        else:
            m, k = divmod(item - int(r["item0"]), nr)
        while True:
            f = [int(runs[i * nr + k]) for i in range(RUN_FIELDS)]  # sblk dblk nblk bpre plen within
            n = f[2] * int(r["run"])
            assert n <= max(MAX_ITEM_BYTES, int(r["run"]))
            ln = n >> split
            assert ln << split == n and ln % (1 << int(r["unit"])) == 0
            boff = (int(r["count"]) * f[3] + m * f[4] + f[5]) * int(r["run"])
            soff = boff if buf_side == BUF_SRC else f[0] * int(r["src_bstride"]) + m * int(r["src_stride"])
            doff = boff if buf_side == BUF_DST else f[1] * int(r["dst_bstride"]) + m * int(r["dst_stride"])
            src = int(r["src"]) + soff + part * ln
            dst = int(r["dst"]) + doff + part * ln
            assert src % (1 << int(r["unit"])) == 0 and dst % (1 << int(r["unit"])) == 0
            ctypes.memmove(dst, src, ln)
            moved += ln
            # the kernel's step, variable for variable: next part, run, row, pair
            more = pos + 1 < end
            npart, nk, nm, next_pair = part + 1, k, m, False
            if more and npart == nparts:
                npart = 0
                if rows_inner:
                    nm += 1
                    if nm == int(r["count"]):
                        nm, nk = 0, nk + 1
                        if nk == nr:
                            nk, next_pair = 0, True
                else:
                    nk += 1
                    if nk == nr:
                        nk, nm = 0, nm + 1
                        if nm == int(r["count"]):
                            nm, next_pair = 0, True
            if not more:
                break
            pos, part, k, m = pos + 1, npart, nk, nm
            if next_pair:
                while True:
                    p += 1
                    r, runs, nr = pair(p)
                    if nr:
                        break
    return moved


@pytest.mark.parametrize("kind", ["kv_first", "blocks_first", "mla", "vllm_shared"])
@pytest.mark.parametrize("nwarps", [1, 7, 64, 4096])
@pytest.mark.parametrize("rows_inner", [False, True])
def test_walking_the_items_reproduces_the_reference_copy(kind, nwarps, rows_inner):
    rng = np.random.default_rng(3)
    st, bd = LayoutSpec(kind, 64, layers=3, block_size=32, heads=8, head_dim=64).build(1)
    ref_t, _ = LayoutSpec(kind, 80, layers=3, block_size=32, heads=8, head_dim=64).build(2)
    out_t, _ = LayoutSpec(kind, 80, layers=3, block_size=32, heads=8, head_dim=64).build(2)
    ls, lr, lo = (KVLayout.from_tensors(x, block_dim=bd) for x in (st, ref_t, out_t))
    s, d = _ids(rng, 64, 80)
    plan = plan_transfer(ls.geometry, lr.geometry, s, d, np.array([0, 2]))
    reference.copy_blocks(plan, _views(ls), _views(lr))
    rec, coal_runs, single_runs, nitems = pair_records(plan.block_pairs, ls.addrs, lo.addrs)
    split = split_shift_for(rec, nitems, nwarps)
    assert (split > 0) == (nwarps == 4096)  # only idle warps cut items into parts
    assert _walk_like_the_kernel(rec, coal_runs, single_runs, nitems, nwarps, split, rows_inner=rows_inner) == plan.nbytes
    assert all(np.array_equal(a, b) for a, b in zip(_bytes(ref_t), _bytes(out_t)))


@pytest.mark.parametrize("kind", ["kv_first", "blocks_first", "mla", "vllm_shared"])
@pytest.mark.parametrize("nwarps", [5, 4096])
def test_buffer_sides_follow_the_plans_stream_order(kind, nwarps):
    # gather into / scatter from a contiguous buffer lands every byte where the reference's
    # stream puts it (the order a TCP or UCX peer expects)
    rng = np.random.default_rng(4)
    st, bd = LayoutSpec(kind, 64, layers=3, block_size=32, heads=8, head_dim=64).build(1)
    out_t, _ = LayoutSpec(kind, 80, layers=3, block_size=32, heads=8, head_dim=64).build(2)
    ls, lo = KVLayout.from_tensors(st, block_dim=bd), KVLayout.from_tensors(out_t, block_dim=bd)
    s, d = _ids(rng, 64, 80)
    plan = plan_transfer(ls.geometry, lo.geometry, s, d, np.array([0, 2]))
    want = reference.gather(plan, _views(ls))
    buf = np.zeros(plan.nbytes + 64, dtype=np.uint8)
    rec, cr, sr, n = pair_records(plan.block_pairs, ls.addrs, [], buffer_side=BUF_DST, buffer=buf.ctypes.data)
    assert _walk_like_the_kernel(rec, cr, sr, n, nwarps, split_shift_for(rec, n, nwarps), BUF_DST) == plan.nbytes
    assert np.array_equal(buf[: plan.nbytes], want) and not buf[plan.nbytes:].any()
    expect, _ = LayoutSpec(kind, 80, layers=3, block_size=32, heads=8, head_dim=64).build(2)
    reference.scatter(plan, want, _views(KVLayout.from_tensors(expect, block_dim=bd)))
    rec, cr, sr, n = pair_records(plan.block_pairs, [], lo.addrs, buffer_side=BUF_SRC, buffer=want.ctypes.data)
    assert _walk_like_the_kernel(rec, cr, sr, n, nwarps, split_shift_for(rec, n, nwarps), BUF_SRC) == plan.nbytes
    assert all(np.array_equal(a, b) for a, b in zip(_bytes(expect), _bytes(out_t)))


def test_pieces_launched_one_by_one_cover_the_plan():
    # a pipelined transfer launches the pairs of each piece with item_base; together the
    # pieces gather exactly the reference stream, each piece its own slice of it
    st, bd = LayoutSpec("kv_first", 64, layers=5, block_size=32, heads=8, head_dim=64).build(1)
    ls = KVLayout.from_tensors(st, block_dim=bd)
    s, d = _ids(np.random.default_rng(8), 64, 64)
    plan = plan_transfer(ls.geometry, ls.geometry, s, d)
    want = reference.gather(plan, _views(ls))
    buf = np.zeros(plan.nbytes, dtype=np.uint8)
    rec, cr, sr, n = pair_records(plan.block_pairs, ls.addrs, [], buffer_side=BUF_DST, buffer=buf.ctypes.data)
    bounds = plan.chunk_bounds(plan.nbytes // 3)
    assert len(bounds) == 3
    for p0, p1, lo, hi in bounds:
        end = int(rec["item0"][p1]) if p1 < rec.size else n
        moved = _walk_like_the_kernel(rec[p0:p1], cr, sr, end - int(rec["item0"][p0]), 7, 0, BUF_DST,
                                      item_base=int(rec["item0"][p0]))
        assert moved == hi - lo
        assert np.array_equal(buf[lo:hi], want[lo:hi]) and not buf[hi:].any()


@pytest.mark.parametrize("kind", ["kv_first", "mla"])
def test_a_single_block_is_cut_into_parts_for_idle_warps(kind):
    st, bd = LayoutSpec(kind, 16, layers=2, block_size=32, heads=8, head_dim=64).build(1)
    ref_t, _ = LayoutSpec(kind, 16, layers=2, block_size=32, heads=8, head_dim=64).build(2)
    out_t, _ = LayoutSpec(kind, 16, layers=2, block_size=32, heads=8, head_dim=64).build(2)
    ls, lr, lo = (KVLayout.from_tensors(x, block_dim=bd) for x in (st, ref_t, out_t))
    plan = plan_transfer(ls.geometry, lr.geometry, [3], [11])
    reference.copy_blocks(plan, _views(ls), _views(lr))
    rec, coal_runs, single_runs, nitems = pair_records(plan.block_pairs, ls.addrs, lo.addrs)
    split = split_shift_for(rec, nitems, 1024)
    assert split >= 2 and int(rec["run"].min()) >> split >= MIN_PART_BYTES
    assert _walk_like_the_kernel(rec, coal_runs, single_runs, nitems, 1024, split) == plan.nbytes
    assert all(np.array_equal(a, b) for a, b in zip(_bytes(ref_t), _bytes(out_t)))


def test_parts_keep_the_access_width():
    rec = np.zeros(2, dtype=PAIR_DTYPE)
    rec["run"], rec["unit"] = [4096, 4096 + 16], [4, 4]  # 4112 = 16 * 257: no halving keeps 16 B
    assert split_shift_for(rec, 2, 1024) == 0
    rec["run"] = [4096, 8192]
    assert split_shift_for(rec, 2, 1024) == 2  # 4096 >> 2 = MIN_PART_BYTES
    assert split_shift_for(rec, 2048, 1024) == 0


def test_empty_plan_has_no_items():
    ts, bd = LayoutSpec("kv_first", 8).build(0)
    lay = KVLayout.from_tensors(ts, block_dim=bd)
    plan = plan_transfer(lay.geometry, lay.geometry, [], [])
    assert pair_records(plan.block_pairs, lay.addrs, lay.addrs)[3] == 0


def _decode_ids(params):
    """What kv_copy_pairs_ids reads from its parameter struct: (records, run table as
    RUN_FIELDS int64 arrays, item count, item base, split, buffer side, rows_inner, uniform)."""
    from kvxfer.ops.pairs import IDS_DTYPE

    raw = np.frombuffer(params.tobytes(), dtype=np.uint8)
    assert raw.nbytes == IDS_DTYPE.itemsize <= 32764  # CUDA 12.1's parameter limit
    hdr, h32 = raw[:64].view(np.int64), raw[:64].view(np.int32)
    npairs, nblocks, nitems, item_base, sids_off, dids_off = (int(x) for x in hdr[:6])
    w = raw[64:]
    rec = w[: npairs * PAIR_DTYPE.itemsize].copy().view(PAIR_DTYPE)
    ids = w.view(np.int32)
    s, d = ids[sids_off: sids_off + nblocks], ids[dids_off: dids_off + nblocks]
    k = np.arange(nblocks)
    runs = np.concatenate([s, d, np.ones(nblocks), k, np.ones(nblocks), np.zeros(nblocks)]).astype(np.int64)
    return rec, runs, nitems, item_base, int(h32[12]), int(h32[13]), int(h32[14]), int(h32[15])


def _stub_params_launch(monkeypatch):
    """Pretend the GPU takes 32 KiB of parameters; return the list that collects each
    kv_copy_pairs_ids launch's (ctas, parameter bytes) instead of launching."""
    from kvxfer.ops import kernels
    from kvxfer.ops.runtime import DeviceRuntime

    launched = []
    monkeypatch.setattr(DeviceRuntime, "large_params", lambda self: True)
    monkeypatch.setattr(kernels, "launch_with_params",
                        lambda spec, dev, ctas, params, sptr: launched.append((spec, ctas, params.copy())))
    return launched


@pytest.mark.parametrize("side", [BUF_SRC, BUF_DST])
@pytest.mark.parametrize("kind", ["kv_first", "blocks_first", "mla", "vllm_shared"])
@pytest.mark.parametrize("warps", [7, 256, 8192])
@pytest.mark.parametrize("random", [True, False], ids=["random-ids", "with-a-run"])
def test_pieces_in_kernel_parameters_walk_like_the_reference(side, kind, warps, random, monkeypatch):
    from kvxfer.ops.pairs import IDS_KERNEL, PairPieces, ids_params_fit

    _stub_launch_shape(monkeypatch, warps=warps, ctas=max(1, warps // 8))
    launched = _stub_params_launch(monkeypatch)
    spec = LayoutSpec(kind, 64, layers=3, block_size=32, heads=8, head_dim=64)
    st, bd = spec.build(1)
    out_t, _ = spec.build(2)
    ref_t, _ = spec.build(2)
    ls, lo, lr = (KVLayout.from_tensors(x, block_dim=bd) for x in (st, out_t, ref_t))
    rng = np.random.default_rng(4)
    # random ids: every run one block; else a long consecutive run (coalesced) and random ids
    s, d = (rng.permutation(64)[:40], rng.permutation(64)[:40]) if random else _ids(rng, 64, 64)
    plan = plan_transfer(ls.geometry, lo.geometry, s, d)
    rows = bool((plan.block_pairs.pairs["coal"] & (plan.block_pairs.pairs["src_count"] > 1)).any())
    assert (plan.block_pairs.run_lengths.size == s.size) == random
    if not random and rows:  # K and V rows of a run of blocks stream row by row: one block per run can't
        assert kind in ("kv_first", "vllm_shared") and not ids_params_fit(plan.block_pairs, side)
        return
    want = reference.gather(plan_transfer(ls.geometry, ls.geometry, s, s), _views(ls))
    stream = np.full(plan.nbytes, 7, dtype=np.uint8) if side == BUF_DST else want.copy()
    src, dst = (ls.addrs, stream.ctypes.data) if side == BUF_DST else (stream.ctypes.data, lo.addrs)
    bounds = [b[:2] for b in plan.chunk_bounds(plan.nbytes // 3)]
    assert len(bounds) >= 3
    pieces = PairPieces(plan.block_pairs, src, dst, buffer_side=side, bounds=bounds, stream=None, device=0)
    assert pieces.in_params
    for i in reversed(range(len(pieces))):  # any order: each piece moves its own items
        pieces.launch(i)
    moved, covered = 0, []
    for spec_, ctas, params in launched:
        assert spec_ == IDS_KERNEL and ctas == max(1, warps // 8)
        rec, runs, nitems, base, split, bside, rows_inner, uniform = _decode_ids(params)
        assert (bside, rows_inner) == (side, 1) and uniform == int(rec["item0"][1])  # equal items per pair
        assert split == split_shift_for(rec, int(rec["item0"][-1]) + uniform, warps)
        covered.append((base, base + nitems))
        moved += _walk_like_the_kernel(rec, runs, runs, nitems, warps, split, buf_side=side, item_base=base,
                                       uniform=uniform)
    assert moved == plan.nbytes
    covered.sort()  # the pieces' item ranges tile the plan's items
    assert covered[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    if side == BUF_DST:
        assert np.array_equal(stream, want)
    else:
        reference.copy_blocks(plan, _views(ls), _views(lr))
        assert all(np.array_equal(a, b) for a, b in zip(_bytes(ref_t), _bytes(out_t)))


def test_what_cannot_travel_in_kernel_parameters_is_uploaded_and_forcing_it_says_why(monkeypatch):
    from kvxfer.ops.pairs import IDS_WORDS, PairPieces, ids_params_fit
    from kvxfer.ops.runtime import DeviceRuntime

    st, bd = LayoutSpec("kv_first", 8192, layers=2, block_size=1, heads=1, head_dim=8).build(1)
    ls = KVLayout.from_tensors(st, block_dim=bd)
    rng = np.random.default_rng(1)

    def bp(n):
        return plan_transfer(ls.geometry, ls.geometry, rng.permutation(8192)[:n], rng.permutation(8192)[:n]).block_pairs

    npairs = bp(1).pairs.size
    most = 2 * (IDS_WORDS - 12 * npairs)  # int32 ids after the records
    assert ids_params_fit(bp(most), BUF_DST) and ids_params_fit(bp(most), BUF_SRC)
    assert not ids_params_fit(bp(most + 1), BUF_DST)
    assert not ids_params_fit(bp(16), BUF_NONE)  # block to block: the 4 KiB inline kernel or an upload
    assert not ids_params_fit(bp(0), BUF_DST)
    big = bp(4)
    huge = type(big)(big.pairs, np.array([0, 1, 2, 2**31]), big.dst_blocks, big.run_starts, big.run_lengths,
                     big.block_nbytes)
    assert ids_params_fit(huge, BUF_SRC) and not ids_params_fit(huge, BUF_DST)  # only the tensor side's ids travel
    # a run of four blocks through pairs of two rows (K, V) streams K of all four, then V: one
    # block per run would interleave them
    assert (big.pairs["coal"] & (big.pairs["src_count"] == 2)).all()
    run = plan_transfer(ls.geometry, ls.geometry, [0, 1, 2, 3, 9], [10, 11, 12, 13, 5]).block_pairs
    assert run.run_lengths.tolist() == [4, 1] and not ids_params_fit(run, BUF_DST)
    monkeypatch.setattr(DeviceRuntime, "large_params", lambda self: False)  # a GPU with 4 KiB of parameters
    with pytest.raises(ValueError, match="cannot travel in kernel parameters"):
        PairPieces(bp(16), ls.addrs, 0, buffer_side=BUF_DST, bounds=[(0, npairs)], stream=None, device=0,
                   in_params=True)


torch = pytest.importorskip("torch")


def _as_gpu_bytes(t: np.ndarray, block_dim: int):
    """``t`` as a CUDA uint8 tensor that keeps the block dimension (blocks hold the same bytes)."""
    u8 = torch.from_numpy(np.ascontiguousarray(t).view(np.uint8)).cuda()
    return u8.reshape(t.shape[0], -1) if block_dim == 0 else u8.reshape(t.shape[0], t.shape[1], -1)


def _gpu_copy_pair(spec, seed):
    """Host tensors of ``spec`` (seed ``seed``), their GPU copies as source, zeroed GPU tensors as
    destination, and the two GPU layouts: (host tensors, block dim, src, dst, src layout, dst layout)."""
    st, bd = spec.build(seed)
    g_src = [_as_gpu_bytes(t, bd) for t in st]
    g_dst = [torch.zeros_like(t) for t in g_src]
    return st, bd, g_src, g_dst, KVLayout.from_tensors(g_src, block_dim=bd), KVLayout.from_tensors(g_dst, block_dim=bd)


def _assert_only_blocks_moved(g_src, g_dst, s, d):
    """Zeroed ``kv_first`` destinations ([K/V, block, bytes]) hold source blocks ``s`` at
    ``d``, nothing else."""
    for g_in, g_out in zip(g_src, g_dst):
        exp = np.zeros_like(g_out.cpu().numpy())
        exp[:, d] = g_in.cpu().numpy()[:, s]
        assert np.array_equal(g_out.cpu().numpy(), exp)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("kind", ["kv_first", "blocks_first", "mla"])
@pytest.mark.parametrize("few,max_warps,rows_inner,inline", [(False, None, None, None), (True, None, None, True),
                                                             (True, None, None, False), (True, 3, None, True),
                                                             (False, 3, None, None), (False, 3, True, None)],
                         ids=["many-blocks", "one-block-inline", "one-block-uploaded", "one-block-inline-3-warps",
                              "3-warps-walk-every-pair", "3-warps-rows-inner"])
def test_kernel_matches_reference_on_gpu(kind, few, max_warps, rows_inner, inline):
    pytest.importorskip("cupy", reason="the CUDA ops need cupy")
    from kvxfer.ops.pairs import copy_block_pairs

    rng = np.random.default_rng(5)
    spec_s = LayoutSpec(kind, 64, layers=3, block_size=32, heads=8, head_dim=64)
    spec_d = LayoutSpec(kind, 80, layers=3, block_size=32, heads=8, head_dim=64)
    st, bd = spec_s.build(1)
    ref_t, _ = spec_d.build(2)
    g_src = [_as_gpu_bytes(t, bd) for t in st]
    g_dst = [_as_gpu_bytes(t, bd) for t in ref_t]  # the destination starts as the reference did
    s, d = (np.array([7]), np.array([70])) if few else _ids(rng, 64, 80)
    ls, lr = KVLayout.from_tensors(st, block_dim=bd), KVLayout.from_tensors(ref_t, block_dim=bd)
    reference.copy_blocks(plan_transfer(ls.geometry, lr.geometry, s, d), _views(ls), _views(lr))
    gs, gd = KVLayout.from_tensors(g_src, block_dim=bd), KVLayout.from_tensors(g_dst, block_dim=bd)
    copy_block_pairs(plan_transfer(gs.geometry, gd.geometry, s, d).block_pairs, gs, gd, max_warps=max_warps,
                     rows_inner=rows_inner, inline=inline)
    torch.cuda.synchronize()
    for g, r in zip(g_dst, _bytes(ref_t)):
        assert np.array_equal(g.cpu().numpy().reshape(-1), r.reshape(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("uniform", [True, False], ids=["pair-by-division", "pair-by-search"])
def test_inline_kernel_finds_each_warps_pair_by_division_or_by_search(uniform):
    pytest.importorskip("cupy", reason="the CUDA ops need cupy")
    from kvxfer.ops import pairs as ops_pairs

    spec = LayoutSpec("kv_first", 64, layers=5, block_size=16, heads=4, head_dim=64)
    st, bd = spec.build(4)
    ref_t, _ = spec.build(5)
    g_src = [_as_gpu_bytes(t, bd) for t in st]
    g_dst = [_as_gpu_bytes(t, bd) for t in ref_t]
    s, d = np.array([3, 4, 5, 60]), np.array([10, 11, 12, 1])
    ls, lr = KVLayout.from_tensors(st, block_dim=bd), KVLayout.from_tensors(ref_t, block_dim=bd)
    reference.copy_blocks(plan_transfer(ls.geometry, lr.geometry, s, d), _views(ls), _views(lr))
    gs, gd = KVLayout.from_tensors(g_src, block_dim=bd), KVLayout.from_tensors(g_dst, block_dim=bd)
    launch = ops_pairs.resolve_block_pairs(plan_transfer(gs.geometry, gd.geometry, s, d).block_pairs, gs, gd)
    head = launch._pl.inline[:64].view(np.int32)
    assert launch.inline and head[15] > 0  # equal items per pair here
    if not uniform:
        head[15] = 0  # the kernel then searches item0, as for pairs of unequal item counts
    launch.enqueue()
    torch.cuda.synchronize()
    for g, r in zip(g_dst, _bytes(ref_t)):
        assert np.array_equal(g.cpu().numpy().reshape(-1), r.reshape(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_an_inline_gather_and_scatter_are_captured_in_a_cuda_graph_and_replayed():
    pytest.importorskip("cupy", reason="the CUDA ops need cupy")
    from kvxfer.ops.pairs import gather_pairs, resolve_block_pairs, scatter_pairs

    spec = LayoutSpec("kv_first", 64, layers=4, block_size=16, heads=4, head_dim=64)
    st, bd, g_src, g_dst, gs, gd = _gpu_copy_pair(spec, 3)
    s, d = np.array([5, 6, 30]), np.array([1, 2, 60])
    plan = plan_transfer(gs.geometry, gd.geometry, s, d)
    assert resolve_block_pairs(plan.block_pairs, gs, gd).inline
    buf = torch.full((plan.nbytes,), 7, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):  # nothing to upload: capturable
        gather_pairs(plan.block_pairs, gs, buf)
        scatter_pairs(plan.block_pairs, buf, gd)
    torch.cuda.synchronize()
    assert int(buf.sum()) == 7 * plan.nbytes and all(int(t.count_nonzero()) == 0 for t in g_dst)  # captured, not run
    graph.replay()
    torch.cuda.synchronize()
    lh = KVLayout.from_tensors(st, block_dim=bd)
    assert np.array_equal(buf.cpu().numpy(), reference.gather(plan_transfer(lh.geometry, lh.geometry, s, s), _views(lh)))
    _assert_only_blocks_moved(g_src, g_dst, s, d)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("ids,in_params", [("with-a-run", None), ("random", True), ("random", False)],
                         ids=["with-a-run-uploaded", "random-in-parameters", "random-uploaded"])
def test_pieces_on_gpu_gather_then_scatter_round_trip(ids, in_params):
    pytest.importorskip("cupy", reason="the CUDA ops need cupy")
    from kvxfer.ops.pairs import PairPieces

    spec = LayoutSpec("kv_first", 64, layers=5, block_size=32, heads=8, head_dim=64)
    st, bd, g_src, g_dst, gs, gd = _gpu_copy_pair(spec, 1)
    rng = np.random.default_rng(9)
    s, d = _ids(rng, 64, 64) if ids == "with-a-run" else (rng.permutation(64)[:50], rng.permutation(64)[:50])
    plan = plan_transfer(gs.geometry, gd.geometry, s, d)
    lh = KVLayout.from_tensors(st, block_dim=bd)
    want = reference.gather(plan_transfer(lh.geometry, lh.geometry, s, d), _views(lh))
    buf = torch.full((plan.nbytes,), 7, dtype=torch.uint8, device="cuda")
    bounds = plan.chunk_bounds(plan.nbytes // 3)
    stream = torch.cuda.current_stream()
    g = PairPieces(plan.block_pairs, gs, buf, buffer_side=BUF_DST, bounds=[b[:2] for b in bounds], stream=stream,
                   device=0, in_params=in_params)
    assert g.in_params == (ids == "random" and in_params is not False)  # needs CUDA 12.1: 32 KiB of parameters
    for i in reversed(range(len(g))):  # any order: each piece writes its own slice
        g.launch(i)
    sc = PairPieces(plan.block_pairs, buf, gd, buffer_side=BUF_SRC, bounds=[b[:2] for b in bounds], stream=stream,
                    device=0, in_params=in_params)
    assert sc.in_params == g.in_params
    for i in range(len(sc)):
        sc.launch(i)
    torch.cuda.synchronize()
    assert np.array_equal(buf.cpu().numpy(), want)
    _assert_only_blocks_moved(g_src, g_dst, s, d)


def _stub_launch_shape(monkeypatch, warps: int, ctas: int) -> None:
    """The host half of a pair launch without a GPU: a fixed launch shape, stream 0."""
    from kvxfer.ops import kernels, operands

    monkeypatch.setattr(kernels, "workers_for", lambda spec, device, total, cps: (warps, ctas))
    monkeypatch.setattr(operands, "stream_ptr", lambda stream, objs, dev: 0)


def _decode_inline(blob):
    """What kv_copy_pairs_inline reads from its parameter struct: (records, coalesced runs,
    single runs, item count, split, buffer side, rows_inner), decoded from the raw bytes."""
    from kvxfer.ops.pairs import INLINE_DTYPE, PAIR_DTYPE

    raw = np.frombuffer(blob.tobytes(), dtype=np.uint8)
    assert raw.nbytes == INLINE_DTYPE.itemsize <= 4096  # within every CUDA version's parameter limit
    hdr, h32 = raw[:64].view(np.int64), raw[:64].view(np.int32)
    npairs, ncoal, nsingle, nitems, coal_off, single_off = (int(x) for x in hdr[:6])
    w = raw[64:].view(np.int64)
    rec = w[: npairs * 12].copy().view(PAIR_DTYPE)
    return (rec, w[coal_off: coal_off + ncoal * RUN_FIELDS], w[single_off: single_off + nsingle * RUN_FIELDS],
            nitems, int(h32[12]), int(h32[13]), int(h32[14]), int(h32[15]))


@pytest.mark.parametrize("side", [BUF_NONE, BUF_SRC, BUF_DST])
@pytest.mark.parametrize("kind", ["kv_first", "mla"])
def test_a_small_copy_travels_in_the_launch_parameters_and_walks_like_the_reference(side, kind, monkeypatch):
    from kvxfer.ops import pairs as ops_pairs

    _stub_launch_shape(monkeypatch, warps=256, ctas=32)
    spec = LayoutSpec(kind, 64, layers=3, block_size=32, heads=8, head_dim=64)
    st, bd = spec.build(1)
    out_t, _ = spec.build(2)
    ref_t, _ = spec.build(2)
    ls, lo, lr = (KVLayout.from_tensors(x, block_dim=bd) for x in (st, out_t, ref_t))
    s, d = np.array([9, 10, 40]), np.array([3, 4, 50])  # a coalesced run and a single block
    plan = plan_transfer(ls.geometry, lo.geometry, s, d)
    stream = np.zeros(plan.nbytes, dtype=np.uint8)
    sa = [int(a) for a in ls.addrs]
    da = [int(a) for a in lo.addrs]
    src = stream.ctypes.data if side == BUF_SRC else sa
    dst = stream.ctypes.data if side == BUF_DST else da
    if side == BUF_SRC:  # scatter: the stream holds the reference gather
        stream[:] = reference.gather(plan_transfer(ls.geometry, ls.geometry, s, s), _views(ls))
    launch = ops_pairs._resolve(plan.block_pairs, src, dst, side, None, 0, ops_pairs.PAIRS_KERNEL, None)
    assert launch.inline and launch._pl.spec == ops_pairs.INLINE_KERNEL
    rec, cr, sr, nitems, split, bside, rows_inner, uniform = _decode_inline(launch._pl.inline)
    assert uniform > 0 and nitems == uniform * rec.size  # equal items per pair: the kernel divides
    want = pair_records(plan.block_pairs, [] if side == BUF_SRC else sa, [] if side == BUF_DST else da,
                        buffer_side=side, buffer=stream.ctypes.data if side != BUF_NONE else 0)
    assert np.array_equal(rec.view(np.uint8), want[0].view(np.uint8))
    assert np.array_equal(cr, want[1]) and np.array_equal(sr, want[2]) and nitems == want[3]
    assert (bside, rows_inner) == (side, int(side != BUF_NONE))
    assert split == split_shift_for(want[0], nitems, 256) > 0  # few items: parts for idle warps
    assert _walk_like_the_kernel(rec, cr, sr, nitems, 256, split, buf_side=side, uniform=uniform) == plan.nbytes
    if side == BUF_DST:
        assert np.array_equal(stream, reference.gather(plan_transfer(ls.geometry, ls.geometry, s, s), _views(ls)))
    else:
        reference.copy_blocks(plan, _views(ls), _views(lr))
        assert all(np.array_equal(a, b) for a, b in zip(_bytes(ref_t), _bytes(out_t)))


def test_records_too_big_for_the_parameters_are_uploaded_and_forcing_inline_says_why(monkeypatch):
    from kvxfer.ops import pairs as ops_pairs

    _stub_launch_shape(monkeypatch, warps=64, ctas=8)
    st, bd = LayoutSpec("kv_first", 256, layers=3, block_size=4, heads=2, head_dim=8).build(1)
    ls = KVLayout.from_tensors(st, block_dim=bd)
    rng = np.random.default_rng(2)
    s, d = rng.permutation(256)[:100], rng.permutation(256)[:100]  # 100 scattered blocks: runs of 4.8 KB
    bp = plan_transfer(ls.geometry, ls.geometry, s, d).block_pairs
    big = ops_pairs._resolve(bp, ls.addrs, ls.addrs, BUF_NONE, None, 0, ops_pairs.PAIRS_KERNEL, None)
    assert not big.inline and big._pl.spec == ops_pairs.PAIRS_KERNEL and big._pl.bytes.nbytes > 4000
    with pytest.raises(ValueError, match="at most 4000 fit"):
        ops_pairs._resolve(bp, ls.addrs, ls.addrs, BUF_NONE, None, 0, ops_pairs.PAIRS_KERNEL, None, inline=True)
    one = plan_transfer(ls.geometry, ls.geometry, [1], [2]).block_pairs
    off = ops_pairs._resolve(one, ls.addrs, ls.addrs, BUF_NONE, None, 0, ops_pairs.PAIRS_KERNEL, None, inline=False)
    assert not off.inline and off._pl.spec == ops_pairs.PAIRS_KERNEL


@pytest.mark.parametrize("side", [BUF_NONE, BUF_SRC, BUF_DST])
def test_every_entry_point_resolves_its_buffer_side_like_pair_records(side, monkeypatch):
    # the host half shared by copy/gather/scatter/pieces/prepare (no GPU: launch shape stubbed)
    from kvxfer.ops import pairs as ops_pairs

    _stub_launch_shape(monkeypatch, warps=64, ctas=8)
    st, bd = LayoutSpec("kv_first", 64, layers=3, block_size=32, heads=8, head_dim=64).build(1)
    ls = KVLayout.from_tensors(st, block_dim=bd)
    s, d = _ids(np.random.default_rng(2), 64, 64)
    bp = plan_transfer(ls.geometry, ls.geometry, s, d).block_pairs
    buf = 1 << 40
    src = buf if side == BUF_SRC else [int(a) for a in ls.addrs]
    dst = buf if side == BUF_DST else [int(a) + (1 << 36) for a in ls.addrs]
    launch = ops_pairs._resolve(bp, src, dst, side, None, 0, ops_pairs.PAIRS_KERNEL, None)
    rec, cr, sr, n = pair_records(bp, [] if side == BUF_SRC else src, [] if side == BUF_DST else dst,
                                  buffer_side=side, buffer=buf if side != BUF_NONE else 0)
    pl = launch._pl
    assert (pl.buffer_side, pl.nitems, pl.device) == (side, n, 0)
    want = np.zeros(pl.bytes.nbytes, dtype=np.uint8)
    want[: rec.nbytes] = rec.view(np.uint8)
    want[pl.coal_off: pl.single_off] = cr.view(np.uint8)
    want[pl.single_off:] = sr.view(np.uint8)
    assert np.array_equal(pl.bytes, want)


@pytest.mark.parametrize("ids", ["one_block_runs", "coalesced"])
@pytest.mark.parametrize("mixed", [False, True])
def test_records_written_in_place_match_pair_records(ids, mixed, monkeypatch):
    # uploads write the records straight into a reused (dirty) pinned slot: every byte the
    # kernel reads must be what pair_records builds, and a one-block-per-run table serving
    # both kinds of pairs is uploaded once
    from kvxfer.ops import pairs as ops_pairs

    _stub_launch_shape(monkeypatch, warps=64, ctas=8)
    tensors, bd = LayoutSpec("kv_first", 300, layers=3, block_size=4, heads=2, head_dim=8).build(1)
    if mixed:  # coalescing pairs (K/V-first tensors) and one-block pairs (K and V in one tensor)
        tensors = list(tensors) + list(LayoutSpec("vllm_shared", 300, layers=2, block_size=4, heads=2,
                                                  head_dim=8).build(2)[0])
    ls = KVLayout.from_tensors(tensors, block_dim=bd)
    rng = np.random.default_rng(5)
    if ids == "one_block_runs":
        s, d = rng.permutation(300)[:120], rng.permutation(300)[:120]
        s[1] = s[0] + 1  # no two neighbours consecutive on both sides
        d[1] = d[0] + 3
    else:
        s, d = _ids(rng, 300, 300)
    bp = plan_transfer(ls.geometry, ls.geometry, s, d).block_pairs
    assert bool(bp.pairs["coal"].all()) is not mixed
    pl = ops_pairs._resolve(bp, ls.addrs, ls.addrs, BUF_NONE, None, 0, ops_pairs.PAIRS_KERNEL, None)._pl
    rec, cr, sr, n = pair_records(bp, ls.addrs, ls.addrs)
    slot = np.full(pl.nbytes + 64, 0xA5, dtype=np.uint8)
    pl.write(slot)
    assert np.array_equal(slot[pl.nbytes:], np.full(64, 0xA5, dtype=np.uint8))  # nothing past the records
    got = slot[: pl.nbytes]
    assert np.array_equal(got[: rec.nbytes], rec.view(np.uint8))
    assert pl.coal_off > rec.nbytes and not got[rec.nbytes : pl.coal_off].any()  # padding zeroed
    assert np.array_equal(got[pl.coal_off : pl.coal_off + cr.nbytes], cr.view(np.uint8))
    assert np.array_equal(got[pl.single_off : pl.single_off + sr.nbytes], sr.view(np.uint8))
    assert (pl.ncoal, pl.nsingle, pl.nitems) == (cr.size // RUN_FIELDS, sr.size // RUN_FIELDS, n)
    shared = mixed and ids == "one_block_runs"
    assert (pl.single_off == pl.coal_off) is shared  # one table for both kinds of pairs
    assert pl.nbytes == pl.coal_off + cr.nbytes + (0 if shared else sr.nbytes)
    assert np.array_equal(pl.bytes, got)
