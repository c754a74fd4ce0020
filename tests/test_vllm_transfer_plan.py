"""The vLLM transfer planner (pure, no vLLM): specs, compatibility, and the reads of one request,
checked on numpy caches in vLLM's layouts (FlashAttention NHD, FlashInfer HND, MLA) against a
token-by-token oracle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import vllm_layouts as vl  # tests/ helper

from kvxfer.errors import BlockIdError, LayoutError, LayoutMismatchError, RemoteProtocolError
from kvxfer.integrations.vllm.transfer_plan import (
    GroupKind,
    KVGroupSpec,
    KVSpec,
    RemoteRead,
    consumer_ranks,
    plan_group_reads,
    plan_reads,
    plan_writes,
    vllm_layout_order,
)
from kvxfer.reshard import HeadOrder, HeadSource, tp_consumers, tp_kv_heads, tp_sources

NHD, HND = HeadOrder.NHD, HeadOrder.HND


def spec(tp=1, rank=0, bs=16, heads=8, dim=4, order=NHD, mla=False, groups=None, **kw) -> KVSpec:
    g = groups if groups is not None else (KVGroupSpec(GroupKind.FULL, ("l0", "l1")),)
    return KVSpec(kw.pop("model", "m"), "bfloat16", kw.pop("kv_cache_dtype", "auto"), tp, rank, bs, heads, dim,
                  order, mla, 2, g, **kw)


# --- TP mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,src_tp,dst_tp", [(8, 2, 1), (8, 1, 2), (8, 4, 2), (8, 2, 4), (8, 8, 2), (8, 2, 8),
                                                 (2, 4, 2), (2, 1, 4), (2, 4, 8), (1, 2, 4), (4, 8, 1), (4, 4, 4)])
def test_tp_sources_give_every_destination_head_once_from_a_rank_that_holds_it(heads, src_tp, dst_tp):
    for r in range(dst_tp):
        d0, d1 = tp_kv_heads(heads, dst_tp, r)
        got = []
        for hs in tp_sources(heads, src_tp, dst_tp, r):
            s0, _ = tp_kv_heads(heads, src_tp, hs.src_rank)
            for k in range(hs.num_heads):
                got.append((hs.dst_head_start + k, s0 + hs.src_heads[0] + k))  # (local dst head, global head)
        assert sorted(got) == [(h - d0, h) for h in range(d0, d1)]
    # the inverse lists exactly the destination ranks that name a source
    for s in range(src_tp):
        want = [r for r in range(dst_tp) if any(h.src_rank == s for h in tp_sources(heads, src_tp, dst_tp, r))]
        assert tp_consumers(heads, src_tp, dst_tp, s) == want
    assert sorted(r for s in range(src_tp) for r in tp_consumers(heads, src_tp, dst_tp, s)) == sorted(
        r for r in range(dst_tp) for _ in {h.src_rank for h in tp_sources(heads, src_tp, dst_tp, r)})


def test_tp_sources_examples():
    assert tp_sources(8, 2, 1, 0) == [HeadSource(0, (0, 4), 0), HeadSource(1, (0, 4), 4)]
    assert tp_sources(8, 1, 2, 1) == [HeadSource(0, (4, 8), 0)]
    assert tp_sources(8, 4, 2, 1) == [HeadSource(2, (0, 2), 0), HeadSource(3, (0, 2), 2)]
    assert tp_consumers(8, 2, 4, 1) == [2, 3]
    # GQA, 2 KV heads over 4 ranks: rank r holds head r * 2 // 4
    assert [tp_kv_heads(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert tp_sources(2, 1, 4, 3) == [HeadSource(0, (1, 2), 0)]
    # MLA: one read per destination rank, spread over the sources
    assert [tp_sources(1, 2, 4, r, replicated=True)[0].src_rank for r in range(4)] == [0, 1, 0, 1]
    assert tp_consumers(1, 2, 4, 1, replicated=True) == [1, 3]
    assert tp_sources(1, 4, 1, 0, replicated=True) == [HeadSource(0, (0, 1), 0)]


def test_tp_errors_name_the_problem():
    with pytest.raises(LayoutError, match="split evenly"):
        tp_sources(6, 4, 1, 0)
    with pytest.raises(LayoutError, match="multiple of the head count"):
        tp_sources(2, 1, 3, 0)
    with pytest.raises(LayoutError, match="out of range"):
        tp_sources(8, 2, 2, 2)
    with pytest.raises(LayoutError, match="out of range"):
        tp_consumers(8, 2, 2, 5)


# --- specs ------------------------------------------------------------------------------------


def test_spec_wire_round_trip_and_malformed():
    s = spec(tp=2, rank=1, order=HND, groups=(KVGroupSpec(GroupKind.FULL, ("a",)),
                                              KVGroupSpec(GroupKind.SLIDING_WINDOW, ("b",), sliding_window=64),
                                              KVGroupSpec(GroupKind.MAMBA, ("c",), block_size=512)))
    assert KVSpec.from_wire(s.to_wire()) == s
    w = s.to_wire()
    for k, v in (("tp_rank", 2), ("order", "x"), ("mla", 1), ("groups", [{"kind": "zz"}]), ("model", 3),
                 ("block_size", True), ("head_dim", -1)):
        bad = dict(w, **{k: v})
        with pytest.raises(RemoteProtocolError):
            KVSpec.from_wire(bad)
    with pytest.raises(RemoteProtocolError):
        KVSpec.from_wire({k: v for k, v in w.items() if k != "dtype"})
    with pytest.raises(RemoteProtocolError):
        KVSpec.from_wire([1, 2])


@pytest.mark.parametrize("field,value", [("model", "other"), ("kv_cache_dtype", "fp8"), ("head_dim", 8),
                                         ("num_kv_heads", 4), ("mla", True)])
def test_check_compatible_names_the_field_and_both_values(field, value):
    a = spec()
    b = spec(**{"model": "m", "kv_cache_dtype": "auto", **{field: value}}) if field in ("model", "kv_cache_dtype") \
        else spec(**{{"head_dim": "dim", "num_kv_heads": "heads"}.get(field, field): value})
    with pytest.raises(LayoutMismatchError, match=field) as e:
        a.check_compatible(b)
    assert repr(value) in str(e.value) and repr(getattr(a, field)) in str(e.value)


def test_check_compatible_allows_block_size_order_and_tp_but_not_everything():
    spec(bs=16, order=NHD, tp=1).check_compatible(spec(bs=64, order=HND, tp=2, rank=1))
    with pytest.raises(LayoutMismatchError, match="tp_size"):
        spec(heads=8, tp=1).check_compatible(spec(heads=8, tp=3, rank=0))
    mamba = (KVGroupSpec(GroupKind.FULL, ("a",)), KVGroupSpec(GroupKind.MAMBA, ("m",)))
    with pytest.raises(LayoutMismatchError, match="Mamba"):
        spec(groups=mamba).check_compatible(spec(groups=mamba, tp=2))
    with pytest.raises(LayoutMismatchError, match="group 0 layer_names"):
        spec(groups=(KVGroupSpec(GroupKind.FULL, ("a",)),)).check_compatible(
            spec(groups=(KVGroupSpec(GroupKind.FULL, ("b",)),)))
    with pytest.raises(LayoutMismatchError, match="number of KV-cache groups"):
        spec(groups=mamba).check_compatible(spec())


# --- reads of one request ---------------------------------------------------------------------


def test_same_everything_is_a_plain_block_read():
    r = plan_group_reads(spec(), spec(), 0, [7, 3, 9, 4], [1, 2, 5, 6, 8], 50)
    assert r == [RemoteRead(0, 0, (7, 3, 9, 4), (1, 2, 5, 6), None)]
    # a cached prefix of whole blocks is skipped
    r = plan_group_reads(spec(), spec(), 0, [7, 3, 9, 4], [1, 2, 5, 6], 50, 32)
    assert r == [RemoteRead(0, 0, (9, 4), (5, 6), None)]
    assert plan_group_reads(spec(), spec(), 0, [7, 3, 9, 4], [1, 2, 5, 6], 50, 50) == []


def test_block_size_change_maps_tokens():
    (r,) = plan_group_reads(spec(bs=16), spec(bs=64), 0, [7, 3, 9, 4, 11], [5, 2], 70, 0)
    assert (r.src_blocks, r.dst_blocks) == ((7, 3, 9, 4, 11), (5, 2))
    rs = r.reshard
    assert (rs.num_tokens, rs.src_start, rs.dst_start) == (70, 0, 0)
    assert (rs.src_format.block_size, rs.dst_format.block_size) == (16, 64)
    # 64 -> 16 with 32 tokens cached locally: starts mid-block on the source
    (r,) = plan_group_reads(spec(bs=64), spec(bs=16), 0, [5, 2], [7, 3, 9, 4, 11], 70, 32)
    assert (r.src_blocks, r.dst_blocks) == ((5, 2), (9, 4, 11))
    assert (r.reshard.num_tokens, r.reshard.src_start, r.reshard.dst_start) == (38, 32, 0)


def test_tp_change_reads_from_each_source_rank():
    reads = plan_group_reads(spec(tp=2, rank=0), spec(tp=1), 0, [1, 2], [3, 4], 20)
    assert [(r.src_rank, r.reshard.src_heads, r.reshard.dst_head_start) for r in reads] == [(0, (0, 4), 0),
                                                                                            (1, (0, 4), 4)]
    assert all(r.reshard.src_format.num_heads == 4 and r.reshard.dst_format.num_heads == 8 for r in reads)
    (r,) = plan_group_reads(spec(tp=1), spec(tp=2, rank=1), 0, [1, 2], [3, 4], 20)
    assert (r.src_rank, r.reshard.src_heads, r.reshard.dst_head_start) == (0, (4, 8), 0)
    # MLA with a TP change and the same block size: byte-identical latent blocks
    mla = dict(heads=1, dim=576, mla=True)
    (r,) = plan_group_reads(spec(tp=2, rank=0, **mla), spec(tp=4, rank=3, **mla), 0, [1, 2], [3, 4], 20)
    assert (r.src_rank, r.reshard) == (1, None)
    assert consumer_ranks(spec(tp=2, rank=1, **mla), spec(tp=4, rank=0, **mla)) == [1, 3]


def test_sliding_window_skips_null_blocks_on_both_sides():
    g = (KVGroupSpec(GroupKind.SLIDING_WINDOW, ("w",), sliding_window=32),)
    # remote (16-token blocks) holds tokens 48..80, local (8-token blocks) 40..80: 48..80 move
    (r,) = plan_group_reads(spec(bs=16, groups=g), spec(bs=8, groups=g), 0, [0, 0, 0, 5, 6],
                            [0, 0, 0, 0, 0, 1, 2, 3, 4, 7], 80)
    assert (r.src_blocks, r.dst_blocks) == ((5, 6), (2, 3, 4, 7))
    assert (r.reshard.num_tokens, r.reshard.src_start, r.reshard.dst_start) == (32, 0, 0)
    (r,) = plan_group_reads(spec(bs=8, groups=g), spec(bs=16, groups=g), 0, [0, 0, 0, 0, 0, 1, 2, 3, 4, 7],
                            [0, 0, 5, 6, 9], 80)
    assert (r.src_blocks, r.dst_blocks, r.reshard.num_tokens, r.reshard.dst_start) == ((1, 2, 3, 4, 7), (5, 6, 9), 40, 8)
    # same block size, block-aligned: a plain read of the blocks the window holds
    (r,) = plan_group_reads(spec(groups=g), spec(groups=g), 0, [0, 0, 5, 6], [0, 0, 1, 2], 64)
    assert r == RemoteRead(0, 0, (5, 6), (1, 2), None)


def test_mamba_groups_copy_state_blocks_one_to_one():
    g = (KVGroupSpec(GroupKind.FULL, ("a",)), KVGroupSpec(GroupKind.MAMBA, ("m",), block_size=1024))
    reads = plan_reads(spec(tp=2, rank=1, groups=g), spec(tp=2, rank=1, bs=32, groups=g),
                       [[1, 2, 3], [9]], [[4, 5], [6]], 40)
    assert reads[-1] == RemoteRead(1, 1, (9,), (6,), None)
    assert reads[0].group == 0 and reads[0].reshard is not None
    with pytest.raises(BlockIdError, match="one to one"):
        plan_group_reads(spec(groups=g), spec(groups=g), 1, [9, 8], [6], 40)
    with pytest.raises(LayoutMismatchError, match="Mamba"):
        plan_group_reads(spec(groups=g, tp=2), spec(groups=g, tp=1), 1, [9], [6], 40)


def test_read_errors_name_the_problem():
    with pytest.raises(BlockIdError, match="need 4 local blocks"):
        plan_group_reads(spec(), spec(), 0, [1, 2, 3, 4], [1, 2, 3], 50)
    with pytest.raises(BlockIdError, match="null block"):
        plan_group_reads(spec(), spec(), 0, [1, 0, 3, 4], [1, 2, 3, 5], 50)
    with pytest.raises(BlockIdError, match="num_cached"):
        plan_group_reads(spec(), spec(), 0, [1], [1], 5, 6)
    with pytest.raises(BlockIdError, match="one block list per KV-cache group"):
        plan_reads(spec(), spec(), [[1]], [[1], [2]], 5)


# --- byte-exact against the token oracle, in vLLM's layouts ----------------------------------

def _check_system(layout, heads, src_tp, dst_tp, bs_src, bs_dst, tokens, cached, **kw):
    """Every destination rank plans its reads and executes them from the source ranks' caches;
    each rank's cache then equals the oracle byte for byte (poison everywhere else)."""
    case = vl.Case(layout, heads, src_tp, dst_tp, bs_src, bs_dst, tokens, cached, **kw)
    G = case.G()
    sources = [case.source(r, G) for r in range(src_tp)]
    total = 0
    for r in range(dst_tp):
        dst = case.before(r, G)
        reads = case.reads(r)
        if case.kind is GroupKind.FULL:  # one read (one kernel launch) per source rank
            assert len({rd.src_rank for rd in reads}) == len(reads)
        total += vl.run_reads(reads, sources, vl.block_dim(layout), dst, vl.block_dim(layout))
        for a, w in zip(dst, case.expected(r, reads, G)):
            np.testing.assert_array_equal(a, w)
    return total


TP = [(1, 1), (2, 1), (1, 2), (4, 2), (2, 4)]
BLOCKS = [(16, 16), (16, 64), (64, 16), (16, 48), (48, 16)]


@pytest.mark.parametrize("layout", vl.LAYOUTS + vl.LAYOUTS_V33)
@pytest.mark.parametrize("src_tp,dst_tp", TP)
@pytest.mark.parametrize("bs_src,bs_dst", BLOCKS)
def test_reads_fill_every_rank_byte_exact(layout, src_tp, dst_tp, bs_src, bs_dst):
    _check_system(layout, 4, src_tp, dst_tp, bs_src, bs_dst, 150, 0)


@pytest.mark.parametrize("layout", vl.LAYOUTS + vl.LAYOUTS_V33)
@pytest.mark.parametrize("bs_src,bs_dst,cached", [(16, 16, 32), (64, 16, 32), (16, 64, 64), (48, 16, 80)])
def test_cached_prefix_is_skipped_mid_block_on_the_source(layout, bs_src, bs_dst, cached):
    _check_system(layout, 4, 2, 1, bs_src, bs_dst, 150, cached)
    _check_system(layout, 4, 1, 2, bs_src, bs_dst, 150, cached)


@pytest.mark.parametrize("src_tp,dst_tp", [(1, 4), (4, 1), (4, 2), (2, 4), (4, 4)])
def test_gqa_with_fewer_kv_heads_than_ranks(src_tp, dst_tp):
    for layout in ("fa", "fi", "nhc", "hnc"):
        _check_system(layout, 2, src_tp, dst_tp, 16, 32, 70, 0)


@pytest.mark.parametrize("layout", vl.LAYOUTS + ("blnhc",))
@pytest.mark.parametrize("bs_src,bs_dst,src_nulls,dst_nulls", [(16, 16, 3, 3), (16, 8, 3, 5), (8, 16, 5, 2),
                                                              (16, 64, 5, 1), (64, 16, 1, 2)])
def test_sliding_window_moves_only_what_both_windows_hold(layout, bs_src, bs_dst, src_nulls, dst_nulls):
    _check_system(layout, 4, 1, 2, bs_src, bs_dst, 150, 0, src_nulls=src_nulls, dst_nulls=dst_nulls,
                  kind=GroupKind.SLIDING_WINDOW)


def test_mla_full_latent_and_fp8_items():
    n = _check_system("mla", 1, 2, 4, 16, 64, 100, 0, dim=576, itemsize=1)
    assert n == 4 * 2 * 100 * 576  # each destination rank reads the latent once: 4 ranks, 2 layers


def test_bytes_moved_equal_the_tokens_and_heads_needed():
    # TP 2 -> 1, 16 -> 64: each token's 4 heads of K and V once per layer, no more
    assert _check_system("fa", 4, 2, 1, 16, 64, 150, 0) == 2 * 2 * 150 * 4 * 8 * 2


def test_hybrid_model_every_group_byte_exact():
    """Full attention + sliding window + Mamba, TP 2 on both sides, block size 16 -> 64 for the
    attention groups: each group's reads fill exactly that group's tensors (rank 1 shown)."""
    full = vl.Case("fa", 4, 2, 2, 16, 64, 150, seed=1)
    swa = vl.Case("fa", 4, 2, 2, 16, 64, 150, src_nulls=4, dst_nulls=1, kind=GroupKind.SLIDING_WINDOW, seed=2)
    groups = (KVGroupSpec(GroupKind.FULL, ("a0", "a1")), KVGroupSpec(GroupKind.SLIDING_WINDOW, ("w0", "w1"), None, 64),
              KVGroupSpec(GroupKind.MAMBA, ("m0",), block_size=1024))
    remote, local = replace(full.spec("src", 0), groups=groups), replace(full.spec("dst", 1), groups=groups)
    rng = np.random.default_rng(9)
    m_src = rng.integers(0, 1 << 16, (6, 2, 40), dtype=np.uint16)  # [blocks, conv + ssm, state]
    m_dst = np.full((5, 2, 40), 0xA5A5, dtype=np.uint16)
    m_before = m_dst.copy()
    reads = plan_reads(remote, local, [full.blocks("src"), swa.blocks("src"), [4]],
                       [full.blocks("dst"), swa.blocks("dst"), [2]], 150)
    assert sorted({r.group for r in reads}) == [0, 1, 2] and all(r.src_rank == 1 for r in reads)
    for g, case in ((0, full), (1, swa)):
        mine = [r for r in reads if r.group == g]
        dst = case.before(1)
        vl.run_reads(mine, [None, case.source(1)], 1, dst, 1)
        for a, w in zip(dst, case.expected(1, mine)):
            np.testing.assert_array_equal(a, w)
    vl.run_reads([r for r in reads if r.group == 2], [None, [m_src]], 0, [m_dst], 0)
    m_before[2] = m_src[4]
    np.testing.assert_array_equal(m_dst, m_before)


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (1, 2), (4, 2), (2, 4)])
def test_push_writes_are_the_consumers_reads_from_this_rank(src_tp, dst_tp):
    case = vl.Case("fi", 4, src_tp, dst_tp, 16, 64, 100, 32)
    pb, cb = [case.blocks("src")], [case.blocks("dst")]
    for c in range(dst_tp):
        reads = case.reads(c)
        writes = [w for p in range(src_tp)
                  for w in plan_writes(case.spec("src", p), case.spec("dst", c), pb, cb, 100, 32)]
        assert sorted(writes, key=lambda r: r.src_rank) == sorted(reads, key=lambda r: r.src_rank)
        for p in range(src_tp):
            assert (c in consumer_ranks(case.spec("src", p), case.spec("dst", c))) == any(
                w.src_rank == p for w in writes)


def test_vllm_layout_names():
    assert [vllm_layout_order(n) for n in ("LBNHC", "BLNHC", "NHD", "LBHNC", "BLHNC", "hnd")] == [NHD] * 3 + [HND] * 3
    for bad in ("LHBNC", "BHLNC", "zz"):
        with pytest.raises(LayoutError, match="not supported for resharding"):
            vllm_layout_order(bad)


def test_block_major_layers_share_one_allocation():
    """blnhc: each layer is a strided view of one allocation; the reads touch only their bytes."""
    case = vl.Case("blnhc", 4, 1, 2, 16, 64, 150, 16)
    dst = case.before(1)
    root, _ = vl.root_of(dst[0])
    assert all(vl.root_of(a)[0] is root for a in dst) and not dst[1].flags.c_contiguous
    vl.run_reads(case.reads(1), [case.source(0)], 0, dst, 0)
    want = case.expected(1, case.reads(1))
    np.testing.assert_array_equal(root, vl.root_of(want[0])[0])
