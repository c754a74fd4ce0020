"""RequestAgent for unlike TP on the two sides, on both registries: several consumers of one
publication, one consumer pulling from several producers with head reshards, layer subsets."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvxfer import BlockFormat, Connector, HeadOrder, HeadReshard, tp_head_range
from kvxfer.errors import BlockIdError, ConfigError, LayoutError, TransferTimeoutError
from kvxfer.metadata import PeerMetadata
from kvxfer.registry import publication_key
from kvxfer.registry.agent import RequestAgent
from kvxfer.registry.errors import RequestFailedError
from kvxfer.registry.messages import EventKind

BS, H, D, LAYERS, NB = 16, 8, 32, 3, 24
FULL = BlockFormat(HeadOrder.NHD, BS, H, D, 2)
HALF = BlockFormat(HeadOrder.NHD, BS, H // 2, D, 2)


def _kv(heads: int, seed: int | None) -> list[np.ndarray]:
    """LAYERS tensors [K/V, blocks, BS, heads, D] of uint16: random, or zeros for seed None."""
    shape = (2, NB, BS, heads, D)
    if seed is None:
        return [np.zeros(shape, np.uint16) for _ in range(LAYERS)]
    return [np.random.default_rng(seed + i).integers(0, 2**16, shape, dtype=np.uint16) for i in range(LAYERS)]


@pytest.fixture
def make(registry_url):
    made: list[Connector] = []

    def make(name: str, heads: int, seed: int | None):
        kv = _kv(heads, seed)
        conn = Connector(name, backend="tcp", registry=registry_url)
        conn.register(kv, block_dim=1)
        conn._agent = RequestAgent(conn, registry_url, lease_s=1.0)
        made.append(conn)
        return conn, kv
    yield make
    for c in made:
        c.close()


def finished_once(prod: Connector, kind: EventKind, rid: str) -> str:
    fin = prod.requests.wait_finished(10)
    assert (fin.request_id, fin.kind) == (rid, kind), fin
    with pytest.raises(TransferTimeoutError):
        extra = prod.requests.wait_finished(0.5)
        raise AssertionError(f"a second event {extra}")
    return fin.reason


def test_two_decode_ranks_read_their_heads_of_one_publication(make):
    # prefill TP=1 (8 KV heads), decode TP=2 (4 each): both ranks read the same blocks
    prod, pkv = make("prefill0", H, 1)
    ranks = [make(f"decode{r}", H // 2, None) for r in range(2)]
    src, dst = [3, 9, 4, 20], [0, 5, 6, 15]
    key = publication_key("req", 0)
    handles = [c.pull(key, dst, timeout=10, reshard=HeadReshard(FULL, HALF, tp_head_range(H, r, 2)))
               for r, (c, _) in enumerate(ranks)]
    prod.publish(key, src, ttl=10, consumers=2)
    for h in handles:
        h.wait(10)
        assert h.peer_name == "prefill0"
    for r, (c, ckv) in enumerate(ranks):
        h0, h1 = tp_head_range(H, r, 2)
        for t, u in zip(pkv, ckv):
            assert np.array_equal(u[:, dst], t[:, src][..., h0:h1, :])
            assert not np.delete(u, dst, axis=1).any()     # nothing else written
    assert handles[0].nbytes == 4 * LAYERS * 2 * BS * (H // 2) * D * 2   # the heads this rank read
    finished_once(prod, EventKind.CONSUMED, key)


def test_one_decode_rank_reads_from_two_prefill_ranks_concurrently(make):
    # prefill TP=2 (4 heads each), decode TP=1 (8 heads): each prefill rank's heads land in
    # their place of the same destination blocks; one reshard given, one built from metadata
    prods = [make(f"prefill{r}", H // 2, 10 + r) for r in range(2)]
    cons, ckv = make("decode0", H, None)
    srcs, dst = ([1, 2, 3], [7, 8, 9]), [4, 11, 0]
    seen: list[str] = []

    def from_metadata(meta: PeerMetadata) -> HeadReshard:
        seen.append(meta.name)
        assert meta.geometry is not None and meta.name == "prefill1"
        return HeadReshard(HALF, FULL, None, dst_head_start=H // 2)

    handles = [cons.pull(publication_key("req", 0), dst, timeout=10, reshard=HeadReshard(HALF, FULL, None, 0)),
               cons.pull(publication_key("req", 1), dst, timeout=10, reshard=from_metadata)]
    threads = [threading.Thread(target=p.publish, args=(publication_key("req", r), srcs[r]), kwargs={"ttl": 10})
               for r, (p, _) in enumerate(prods)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for h in handles:
        h.wait(10)
    assert [h.peer_name for h in handles] == ["prefill0", "prefill1"] and seen == ["prefill1"]
    for i in range(LAYERS):
        want = np.concatenate([prods[0][1][i][:, srcs[0]], prods[1][1][i][:, srcs[1]]], axis=3)
        assert np.array_equal(ckv[i][:, dst], want)
    for r, (p, _) in enumerate(prods):
        finished_once(p, EventKind.CONSUMED, publication_key("req", r))
    assert cons.requests.lookup("prefill1") == prods[1][0].metadata()


def test_a_failing_consumer_fails_the_publication_once(make):
    prod, _ = make("prefill0", H, 1)
    (c0, _), (c1, _) = make("decode0", H // 2, None), make("decode1", H // 2, None)
    prod.publish("req#tp0", [1, 2], ttl=10, consumers=2)
    bad = c1.pull("req#tp0", [0], timeout=5, reshard=HeadReshard(FULL, HALF, (4, 8)))   # 1 block for 2
    with pytest.raises(BlockIdError):
        bad.wait(5)
    reason = finished_once(prod, EventKind.FAILED, "req#tp0")
    assert "decode1" in reason
    with pytest.raises(RequestFailedError, match="decode1"):   # its fate, at once
        c0.pull("req#tp0", [0, 1], timeout=5, reshard=HeadReshard(FULL, HALF, (0, 4))).wait(5)


def test_expiry_when_a_consumer_never_comes(make):
    prod, _ = make("prefill0", H, 1)
    c0, _ = make("decode0", H // 2, None)
    prod.publish("req#tp0", [1], ttl=1.0, consumers=2)
    c0.pull("req#tp0", [3], timeout=5, reshard=HeadReshard(FULL, HALF, (0, 4))).wait(5)
    finished_once(prod, EventKind.EXPIRED, "req#tp0")


def test_cancel_before_the_claim_fails_the_publication_once(make):
    prod, _ = make("prefill0", H, 1)
    (c0, _), (c1, _) = make("decode0", H // 2, None), make("decode1", H // 2, None)
    h0 = c0.pull("req#tp0", [3], timeout=10, reshard=HeadReshard(FULL, HALF, (0, 4)))
    h1 = c1.pull("req#tp0", [3], timeout=10, reshard=HeadReshard(FULL, HALF, (4, 8)))
    c0.requests.cancel("req#tp0", "request aborted")   # not claimed yet: nothing to refuse
    with pytest.raises(RequestFailedError, match="aborted"):
        h0.wait(1)
    prod.publish("req#tp0", [1], ttl=30, consumers=2)
    reason = finished_once(prod, EventKind.FAILED, "req#tp0")   # not after the 30 s ttl
    assert "gave up" in reason
    with pytest.raises(RequestFailedError):
        h1.wait(5)


def test_cancel_after_the_claim_ends_it_for_the_producer_and_the_other_rank(make):
    prod, _ = make("prefill0", H, 1)
    (c0, _), (c1, _) = make("decode0", H // 2, None), make("decode1", H // 2, None)
    prod.publish("req#tp0", [1], ttl=30, consumers=2)
    c0.pull("req#tp0", [3], timeout=10, reshard=HeadReshard(FULL, HALF, (0, 4))).wait(5)
    claim = c1.requests._client.pull("req#tp0", 5)   # decode1 claims (its read not started)
    assert claim.producer == "prefill0"
    c1.requests.cancel("req#tp0", "preempted")
    assert "preempted" in finished_once(prod, EventKind.CANCELLED, "req#tp0")


def test_pull_of_one_layer_group(make):
    # a hybrid model's second KV-cache group: its own key, blocks and layers
    prod, pkv = make("prefill0", H, 1)
    cons, ckv = make("decode0", H, None)
    key = publication_key("req", 0, group=1)
    assert key == "req#tp0#g1"
    prod.publish(key, [5, 6], ttl=10)
    h = cons.pull(key, [1, 2], timeout=5, layers=[1, 2])
    h.wait(5)
    assert not ckv[0].any()
    for i in (1, 2):
        assert np.array_equal(ckv[i][:, [1, 2]], pkv[i][:, [5, 6]])
    assert h.nbytes == 2 * 2 * 2 * BS * H * D * 2     # 2 layers of 2 blocks (K and V)
    finished_once(prod, EventKind.CONSUMED, key)
    with pytest.raises(LayoutError):
        cons.pull("other", [1], timeout=1, layers=[7])


def test_skip_needs_equal_block_sizes(make):
    cons, _ = make("decode0", H, None)
    bigger = HeadReshard(BlockFormat(HeadOrder.NHD, BS, H, D, 2), BlockFormat(HeadOrder.NHD, 4 * BS, H, D, 2))
    with pytest.raises(ConfigError, match="skip=1"):
        cons.pull("req#tp0", [1, 2], timeout=1, skip=1, reshard=bigger)
    with pytest.raises(ConfigError, match="consumers"):
        cons.publish("x", [1], ttl=5, consumers=0)


def _tokens(cache: np.ndarray, blocks, start: int, n: int) -> np.ndarray:
    """[2, n, heads, D]: tokens at slots start..start+n of the blocks' concatenation."""
    return cache[:, list(blocks)].reshape(2, -1, *cache.shape[3:])[:, start:start + n]


@pytest.mark.parametrize("bs_src,bs_dst", [(16, 64), (64, 16)])
def test_block_size_change_and_tp_1_to_2_by_pull(registry_url, bs_src, bs_dst):
    # prefill TP=1 with one block size, two decode ranks (TP=2) with another: both pull the
    # same publication, token-mapped; the lists differ in length; a cached prefix is skipped
    rng = np.random.default_rng(bs_src)
    n, s_start, d_start = 150, 5, 3            # token t: source slot 5 + t -> destination slot 3 + t
    src = [int(b) for b in rng.permutation(24)[: -(-(s_start + n) // bs_src)]]
    dst = [int(b) for b in rng.permutation(20)[: -(-(d_start + n) // bs_dst)]]
    assert len(src) != len(dst)
    prod_kv = [rng.integers(0, 2**16, (2, 24, bs_src, H, D), dtype=np.uint16) for _ in range(LAYERS)]
    made = []
    try:
        prod = Connector("prefill0", backend="tcp", registry=registry_url)
        made.append(prod)
        prod.register(prod_kv, block_dim=1)
        ranks = []
        for r in range(2):
            kv = [np.full((2, 20, bs_dst, H // 2, D), 0xBEEF, np.uint16) for _ in range(LAYERS)]
            c = Connector(f"decode{r}", backend="tcp", registry=registry_url)
            made.append(c)
            c.register(kv, block_dim=1)
            rs = HeadReshard(BlockFormat(HeadOrder.NHD, bs_src, H, D, 2),
                             BlockFormat(HeadOrder.NHD, bs_dst, H // 2, D, 2),
                             tp_head_range(H, r, 2), 0, num_tokens=n, src_start=s_start, dst_start=d_start)
            with pytest.raises(ConfigError, match="skip=1"):
                c.pull("req#tp0", dst, timeout=1, skip=1, reshard=rs)
            ranks.append((c, kv, c.pull("req#tp0", dst, timeout=10, reshard=rs)))
        prod.publish("req#tp0", src, ttl=10, consumers=2)
        for r, (c, kv, h) in enumerate(ranks):
            h.wait(10)
            assert h.nbytes == LAYERS * 2 * n * (H // 2) * D * 2
            h0, h1 = tp_head_range(H, r, 2)
            for t, u in zip(prod_kv, kv):
                want = np.full_like(u, 0xBEEF)
                flat = want[:, dst].reshape(2, -1, H // 2, D)
                flat[:, d_start:d_start + n] = _tokens(t, src, s_start, n)[:, :, h0:h1]
                want[:, dst] = flat.reshape(2, len(dst), bs_dst, H // 2, D)
                assert np.array_equal(u, want)
        finished_once(prod, EventKind.CONSUMED, "req#tp0")
    finally:
        for c in made:
            c.close()


def test_block_size_change_by_push(registry_url):
    # push mode: the decode side expects into its 64-token blocks, prefill pushes 16-token ones
    rng = np.random.default_rng(7)
    n = 100
    src, dst = [3, 1, 4, 0, 5, 9, 2], [6, 2]
    prod_kv = [rng.integers(0, 2**16, (2, 24, 16, H, D), dtype=np.uint16) for _ in range(LAYERS)]
    cons_kv = [np.zeros((2, 8, 64, H, D), np.uint16) for _ in range(LAYERS)]
    rs = HeadReshard(BlockFormat(HeadOrder.NHD, 16, H, D, 2), BlockFormat(HeadOrder.NHD, 64, H, D, 2),
                     num_tokens=n)
    with Connector("prefill0", backend="tcp", registry=registry_url) as prod, \
            Connector("decode0", backend="tcp", registry=registry_url) as cons:
        prod.register(prod_kv, block_dim=1)
        cons.register(cons_kv, block_dim=1)
        h = cons.expect("req#tp0", dst, timeout=10)
        hs = [prod.push("req#tp0", src, layers=[0, 1], last=False, timeout=10, reshard=rs),
              prod.push("req#tp0", src, layers=[2], last=True, timeout=10, reshard=lambda meta: rs)]
        for x in hs:
            x.wait(10)
        h.wait(10)
        assert hs[0].nbytes == 2 * 2 * n * H * D * 2
        for t, u in zip(prod_kv, cons_kv):
            assert np.array_equal(_tokens(u, dst, 0, n), _tokens(t, src, 0, n))
            assert not _tokens(u, dst, n, 128 - n).any()
        finished_once(prod, EventKind.CONSUMED, "req#tp0")


def test_two_layer_groups_of_one_request_pulled_concurrently(make):
    # a hybrid model: group 0 (layer 0) and group 1 (layers 1, 2) have their own block ids
    prod, pkv = make("prefill0", H, 1)
    cons, ckv = make("decode0", H, None)
    groups = {0: ([0], [5, 6, 7], [1, 2, 3]), 1: ([1, 2], [10, 11], [8, 9])}
    handles = {g: cons.pull(publication_key("req", 0, g), dst, timeout=10, layers=lay)
               for g, (lay, _, dst) in groups.items()}
    for g, (_, src, _) in groups.items():
        prod.publish(publication_key("req", 0, g), src, ttl=10)
    for h in handles.values():
        h.wait(10)
    for lay, src, dst in groups.values():
        for i in lay:
            assert np.array_equal(ckv[i][:, dst], pkv[i][:, src])
            others = [b for b in range(NB) if b not in dst]
            assert not ckv[i][:, others].any()
    ends = sorted((f.request_id, f.kind) for f in (prod.requests.wait_finished(10) for _ in groups))
    assert ends == [("req#tp0#g0", EventKind.CONSUMED), ("req#tp0#g1", EventKind.CONSUMED)]
