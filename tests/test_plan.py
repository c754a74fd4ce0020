import numpy as np
import pytest

from kvxfer import BlockIdError, KVLayout, LayoutMismatchError, plan_transfer
from kvxfer.backends.base import TransferRequest, plan_for_initiator, plan_for_responder
from kvxfer.handle import Op
from kvxfer.metadata import PeerMetadata
from kvxfer.plan import transfer_shape, validate_block_ids
from kvxfer._memory import host_bytes
from kvxfer.ops import reference
from kvpeers import KINDS, LayoutSpec, block_bytes


def _views(layout):
    return [host_bytes(int(a), t.span) for a, t in zip(layout.addrs, layout.geometry.tensors)]


def test_adjacent_runs_on_both_sides_coalesce():
    t = np.zeros((2, 32, 64), np.uint8)
    g = KVLayout.from_tensors([t], block_dim=1).geometry
    p = plan_transfer(g, g, [1, 2, 3, 9, 10], [20, 21, 22, 5, 7])
    # runs: (1..3 -> 20..22), (9 -> 5), (10 -> 7); K and V rows in one two-level job each
    assert p.jobs["src_run"].tolist() == [192, 64, 64]
    assert p.jobs["src_count"].tolist() == [2, 2, 2]
    assert p.nbytes == 5 * 2 * 64


def test_no_coalescing_when_blocks_are_not_back_to_back():
    tensors, bd = LayoutSpec("vllm_shared", 8).build(0)
    g = KVLayout.from_tensors(tensors, block_dim=bd).geometry
    p = plan_transfer(g, g, [1, 2], [3, 4])
    assert len(p.jobs) == 2 * 2  # per block, per layer


def test_short_and_long_block_lists_find_the_same_runs():
    # lists up to 32 ids take a pure-Python path; both must cut runs where either side breaks
    g = KVLayout.from_tensors([np.zeros((2, 256, 8), np.uint8)], block_dim=1).geometry
    rng = np.random.default_rng(11)
    for n in (1, 2, 5, 31, 32, 33, 40):
        for _ in range(20):
            s = np.sort(rng.choice(256, n, replace=False)) if rng.random() < 0.5 else rng.choice(256, n, replace=False)
            d = rng.choice(256, n, replace=False) if rng.random() < 0.5 else np.arange(n) + 3
            bp = plan_transfer(g, g, s, d).block_pairs
            breaks = [i for i in range(1, n) if s[i] != s[i - 1] + 1 or d[i] != d[i - 1] + 1]
            assert bp.run_starts.tolist() == [0, *breaks]
            assert bp.run_lengths.tolist() == np.diff([0, *breaks, n]).tolist()


@pytest.mark.parametrize("src,dst,match", [
    ([0, 1], [0], "equal length"),
    ([0, 99], [0, 1], "source block ids out of range"),
    ([0, 1], [-1, 1], "destination block ids out of range"),
    ([0, 1], [3, 3], "duplicates"),
    ([0, 1, 2], [5, 6, 5], "duplicates"),
    ([0, 1], [3, 8], "destination block ids out of range"),
    ([[0]], [[1]], "1-D"),
    ([0.5], [1], "integers"),
])
def test_bad_block_lists(src, dst, match):
    g = KVLayout.from_tensors([np.zeros((8, 4), np.uint8)]).geometry
    with pytest.raises(BlockIdError, match=match):
        plan_transfer(g, g, src, dst)


@pytest.mark.parametrize("num_blocks", [4096, 10**9])  # a flag per block / a sort
def test_duplicate_destinations_found_by_either_check(num_blocks):
    ids = np.random.default_rng(3).choice(min(num_blocks, 10**6), 500, replace=False)
    validate_block_ids(ids, num_blocks, "destination block ids", unique=True)  # distinct: accepted
    dup = ids.copy()
    dup[417] = dup[12]
    with pytest.raises(BlockIdError, match=rf"duplicates: \[{dup[12]}\]"):
        validate_block_ids(dup, num_blocks, "destination block ids", unique=True)


def test_a_side_left_unchecked_is_only_counted():
    g = KVLayout.from_tensors([np.zeros((2, 8, 4), np.uint8)], block_dim=1).geometry
    # a responder checks its own ids only: the peer's may be anything of the right count
    p = plan_transfer(g, g, [0, 1, 2], [99, -1, 99], check_dst=False)
    assert p.nbytes == 3 * 2 * 4 and p.dst_blocks.tolist() == [99, -1, 99]
    with pytest.raises(BlockIdError, match="source block ids out of range"):
        plan_transfer(g, g, [0, 1, 8], [99, -1, 99], check_dst=False)
    with pytest.raises(BlockIdError, match="destination block ids out of range"):
        plan_transfer(g, g, [0, 99, 2], [1, 1, 9], check_src=False)
    with pytest.raises(BlockIdError, match="equal length"):
        plan_transfer(g, g, [0, 1], [5], check_dst=False)


def test_responder_checks_its_own_ids_and_leaves_the_peers_to_the_peer():
    t = np.zeros((2, 8, 4), np.uint8)
    layout = KVLayout.from_tensors([t], block_dim=1)
    peer = PeerMetadata("peer", "s", "boot", 1, layout.geometry, 0, {})

    def req(op, src, dst):
        return TransferRequest(1, op, np.array(src), np.array(dst), None, None)

    # a read: we are the source (duplicates allowed, range checked); the peer's ids are not ours
    assert plan_for_responder(layout, peer, req(Op.READ, [1, 1, 7], [9, 9, -4])).nbytes == 3 * 8
    with pytest.raises(BlockIdError, match="source block ids out of range"):
        plan_for_responder(layout, peer, req(Op.READ, [1, 8], [0, 1]))
    # a write: we are the destination, each of our blocks written once
    assert plan_for_responder(layout, peer, req(Op.WRITE, [50, 50], [2, 3])).nbytes == 2 * 8
    with pytest.raises(BlockIdError, match="duplicates"):
        plan_for_responder(layout, peer, req(Op.WRITE, [0, 1], [2, 2]))
    with pytest.raises(BlockIdError, match="destination block ids out of range"):
        plan_for_responder(layout, peer, req(Op.WRITE, [0, 1], [2, 8]))
    # the initiator checks both sides
    with pytest.raises(BlockIdError, match="destination block ids out of range"):
        plan_for_initiator(layout, peer, req(Op.READ, [1, 2], [9, 0]))


def test_transfer_shape_is_the_plans_bytes_and_runs_without_planning():
    rng = np.random.default_rng(5)
    for bd, shape in ((1, (2, 64, 16)), (0, (64, 2, 16))):
        g = KVLayout.from_tensors([np.zeros(shape, np.uint8) for _ in range(3)], block_dim=bd).geometry
        for n in (0, 1, 2, 7, 40):
            for trial in range(6):
                s = rng.choice(64, n, replace=False) if trial % 2 else np.arange(n) + 3
                d = rng.choice(64, n, replace=False) if trial % 3 else np.arange(n) + 10
                for layers in (None, np.array([2, 0])):
                    p = plan_transfer(g, g, s, d, layers)
                    assert transfer_shape(g, g, s, d, layers) == (p.nbytes, p.nruns)
        one = np.zeros(1, dtype=np.int64)
        assert transfer_shape(g, g, np.zeros(2, dtype=np.int64), one) is None  # unequal lengths
        assert transfer_shape(g, g, one, one, np.array([0, 0])) is None  # a layer twice
        assert transfer_shape(g, g, one, one, np.array([3])) is None  # no such layer


def test_transfer_shape_counts_runs_only_as_far_as_asked():
    # enough=k: the count is exact, or a lower bound of at least k taken from the first ids
    rng = np.random.default_rng(8)
    g = KVLayout.from_tensors([np.zeros((2, 4096, 16), np.uint8) for _ in range(3)], block_dim=1).geometry
    asked = []
    for n in (10, 64, 65, 300, 4000):
        for trial in range(4):
            s = rng.choice(4096, n, replace=False) if trial % 2 else np.arange(n) + 3
            d = rng.choice(4096, n, replace=False) if trial > 1 else np.arange(n) + 9
            exact = transfer_shape(g, g, s, d)
            for k in (0, 1, 50, 200, 10**9):
                nbytes, runs = transfer_shape(g, g, s, d, enough=lambda b, k=k: asked.append(b) or k)
                assert nbytes == exact[0]
                assert runs == exact[1] or exact[1] >= runs >= k
    assert set(asked) == {n * 3 * 2 * 16 for n in (65, 300, 4000)}  # asked with the bytes, only past the prefix
    s = rng.choice(4096, 4000, replace=False)
    assert transfer_shape(g, g, s, s + 0, enough=lambda b: 64)[1] < transfer_shape(g, g, s, s + 0)[1]  # stopped early


def test_mismatched_layouts_refused():
    a = KVLayout.from_tensors([np.zeros((8, 4), np.uint8)]).geometry
    b = KVLayout.from_tensors([np.zeros((8, 8), np.uint8)]).geometry
    with pytest.raises(LayoutMismatchError):
        plan_transfer(a, b, [0], [0])


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("torch")])
def test_reference_copy_matches_numpy_take(kind):
    rng = np.random.default_rng(7)
    src_t, bd = LayoutSpec(kind, 16, layers=3).build(1)
    dst_t, _ = LayoutSpec(kind, 24, layers=3).build(2)
    src, dst = KVLayout.from_tensors(src_t, block_dim=bd), KVLayout.from_tensors(dst_t, block_dim=bd)
    s = rng.choice(16, 9, replace=False)
    d = rng.choice(24, 9, replace=False)
    untouched = np.setdiff1d(np.arange(24), d)
    before = block_bytes(dst_t, bd, untouched)
    layers = np.array([0, 2])
    plan = plan_transfer(src.geometry, dst.geometry, s, d, layers)
    reference.copy_blocks(plan, _views(src), _views(dst))
    assert block_bytes(dst_t, bd, d, [0, 2]) == block_bytes(src_t, bd, s, [0, 2])
    assert block_bytes(dst_t, bd, untouched) == before
    buf = reference.gather(plan, _views(src))
    assert buf.nbytes == plan.nbytes == 9 * 2 * src.geometry.tensors[0].block_nbytes


def test_empty_plan():
    g = KVLayout.from_tensors([np.zeros((8, 4), np.uint8)]).geometry
    p = plan_transfer(g, g, [], [])
    assert p.nbytes == 0 and len(p.jobs) == 0


@pytest.mark.parametrize("kind", ["kv_first", "blocks_first", "mla", "vllm_shared"])
def test_nruns_of_block_pairs_matches_the_expanded_jobs(kind):
    st, bd = LayoutSpec(kind, 64, layers=3).build(1)
    g = KVLayout.from_tensors(st, block_dim=bd).geometry
    for s, d in [([1, 2, 3, 9], [4, 5, 6, 20]), ([5], [7]), (list(range(10)), list(range(20, 30))), ([], [])]:
        cheap = plan_transfer(g, g, s, d).nruns  # from the compact form
        jobs = plan_transfer(g, g, s, d).jobs
        assert cheap == (int(jobs["src_count"].sum()) if jobs.size else 0)


def test_chunk_bounds_cut_the_stream_at_pair_boundaries():
    st, bd = LayoutSpec("kv_first", 64, layers=5, block_size=32, heads=8, head_dim=64).build(1)
    lay = KVLayout.from_tensors(st, block_dim=bd)
    views = [host_bytes(int(a), t.span) for a, t in zip(lay.addrs, lay.geometry.tensors)]
    plan = plan_transfer(lay.geometry, lay.geometry, [1, 2, 3, 9, 20], [4, 5, 6, 7, 8])
    full = reference.gather(plan, views)
    pieces = [(plan.piece(p0, p1), lo, hi) for p0, p1, lo, hi in plan.chunk_bounds(plan.nbytes // 3)]
    assert len(pieces) == 3 and pieces[0][1] == 0 and pieces[-1][2] == plan.nbytes
    assert all(a[2] == b[1] for a, b in zip(pieces, pieces[1:]))  # consecutive, no gaps
    for sub, lo, hi in pieces:
        assert np.array_equal(reference.gather(sub, views), full[lo:hi])
    assert [(0, plan.nbytes)] == [(lo, hi) for _, _, lo, hi in plan.chunk_bounds(plan.nbytes)]


def test_ramped_pieces_start_and_end_small_and_still_cut_at_pair_boundaries():
    from kvxfer.plan import RAMP

    st, bd = LayoutSpec("kv_first", 64, layers=80, block_size=4, heads=2, head_dim=16).build(1)
    lay = KVLayout.from_tensors(st, block_dim=bd)
    views = [host_bytes(int(a), t.span) for a, t in zip(lay.addrs, lay.geometry.tensors)]
    plan = plan_transfer(lay.geometry, lay.geometry, list(range(8)), list(range(20, 28)))
    npairs = plan.block_pairs.pairs.size
    assert npairs >= 80
    pair = plan.nbytes // npairs  # every pair moves the same bytes here
    full = reference.gather(plan, views)
    target, edge = 16 * pair, pair
    bounds = plan.chunk_bounds(target, edge)
    sizes = [hi - lo for _, _, lo, hi in bounds]
    assert bounds[0][2] == 0 and bounds[-1][3] == plan.nbytes and sum(sizes) == plan.nbytes
    assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(bounds, bounds[1:]))  # consecutive pairs and bytes
    assert sizes[:2] == [pair, RAMP * pair] and sizes[-2:] == [RAMP * pair, pair]  # the ramps (16 pairs: the target)
    assert len(sizes) > 4
    assert all(s <= target for s in sizes)
    for p0, p1, lo, hi in bounds:
        assert np.array_equal(reference.gather(plan.piece(p0, p1), views), full[lo:hi])
    # without an edge, or too small a transfer for a ramp: plain pieces
    assert all(hi - lo <= target for *_, lo, hi in plan.chunk_bounds(target)) and len(plan.chunk_bounds(target)) == -(-npairs // 16)
    assert plan.chunk_bounds(npairs // 2 * pair, edge) == plan.chunk_bounds(npairs // 2 * pair)
    # a larger first piece: the opening ramp starts there, the closing one still ends at the edge
    opened = plan.chunk_bounds(target, edge, RAMP * pair)
    sizes = [hi - lo for _, _, lo, hi in opened]
    assert sizes[0] == RAMP * pair and sizes[1] > RAMP * pair and sizes[-2:] == [RAMP * pair, pair]
    assert sum(sizes) == plan.nbytes and all(a[1] == b[0] and a[3] == b[2] for a, b in zip(opened, opened[1:]))
    for p0, p1, lo, hi in opened:
        assert np.array_equal(reference.gather(plan.piece(p0, p1), views), full[lo:hi])


def test_identity_memo_derives_once_per_object_and_never_confuses_equal_ones():
    from kvxfer._memo import IdentityMemo

    memo, made = IdentityMemo(maxsize=2), []

    def make(tag):
        made.append(tag)
        return tag

    a, b = np.arange(3), np.arange(3)  # equal, distinct
    assert memo.get((a,), "x", lambda: make("a")) == "a"
    assert memo.get((a,), "x", lambda: make("again")) == "a"
    assert memo.get((b,), "x", lambda: make("b")) == "b"  # same value, other object: its own entry
    assert memo.get((a,), "y", lambda: make("a-y")) == "a-y"  # full: dropped, then refilled
    assert made == ["a", "b", "a-y"]


def test_runs_match_a_python_walk_and_one_block_runs_share_read_only_arrays():
    g = KVLayout.from_tensors([np.zeros((2, 200_000, 4), np.uint8)], block_dim=1).geometry
    rng = np.random.default_rng(11)

    def walk(s, d):  # the runs, one step at a time
        starts = [0] + [i for i in range(1, len(s)) if s[i] != s[i - 1] + 1 or d[i] != d[i - 1] + 1]
        return starts, [b - a for a, b in zip(starts, starts[1:] + [len(s)])]

    cases = [(rng.choice(200_000, 5000, replace=False), rng.choice(200_000, 5000, replace=False)),
             (np.arange(100, 5100), np.arange(7, 5007)),
             (np.concatenate([np.arange(40), rng.choice(np.arange(50, 9000), 300, replace=False)]),
              np.concatenate([np.arange(9, 49), rng.choice(np.arange(60, 9000), 300, replace=False)])),
             (rng.permutation(200_000)[:70_000], rng.permutation(200_000)[:70_000])]  # past the shared arrays' size
    for s, d in cases:
        bp = plan_transfer(g, g, s, d).block_pairs
        starts, lengths = walk(s.tolist(), d.tolist())
        assert bp.run_starts.tolist() == starts and bp.run_lengths.tolist() == lengths
        if len(starts) == len(s):  # every block its own run: views nobody may write through
            assert not bp.run_starts.flags.writeable and not bp.run_lengths.flags.writeable
