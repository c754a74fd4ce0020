"""RequestAgent with two Connectors in one process, on both registries: the handle contract."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvxfer.connector import Connector
from kvxfer.errors import ConfigError
from kvxfer.registry.agent import RequestAgent, RequestHandle
from kvxfer.registry.core import CoreConfig
from kvxfer.registry.errors import (AlreadyClaimedError, DuplicateRequestError, RegistryTimeoutError,
                                    RequestFailedError)
from kvxfer.registry.messages import EventKind
from kvxfer.registry.server import RegistryServer, ServerConfig

from mp_parties import LAYERS, make_kv


def _pair_maker(url: str, made: list[Connector]):
    def make(name: str, seed: int | None):
        kv = make_kv(seed)
        conn = Connector(name, registry=url)
        conn.register(kv)
        conn._agent = RequestAgent(conn, url, lease_s=1.0)
        made.append(conn)
        return conn, kv
    return make


@pytest.fixture
def pair(registry_url):
    made: list[Connector] = []
    yield _pair_maker(registry_url, made)
    for c in made:
        c.close()


@pytest.fixture
def forgetful_pair():
    """Parties of an embedded registry that keeps no tombstones: it forgets a request once it
    ended, as any registry does after a restart or once the tombstone's minute is over."""
    made: list[Connector] = []
    with RegistryServer(config=ServerConfig(core=CoreConfig(tombstone_s=0))) as srv:
        yield _pair_maker(srv.url, made)
        for c in made:
            c.close()


def test_pull_returns_at_once_and_reads(pair):
    (prod, pkv), (cons, ckv) = pair("prod", 1), pair("cons", None)
    t0 = time.monotonic()
    h = cons.pull("r", [5, 6], timeout=5)
    assert time.monotonic() - t0 < 0.5 and not h.done()   # waiting happens in the background
    prod.publish("r", [1, 2], ttl=10)
    h.wait(5)
    assert h.peer_name == "prod"
    assert all(np.array_equal(ckv[i][[5, 6]], pkv[i][[1, 2]]) for i in range(LAYERS))
    fin = prod.requests.wait_finished(5)
    assert (fin.request_id, fin.kind) == ("r", EventKind.CONSUMED)
    prod.publish("r2", [1], ttl=10)
    with pytest.raises(DuplicateRequestError):
        prod.publish("r2", [1], ttl=10)


def test_pull_skips_the_blocks_the_consumer_already_holds(pair):
    # a local prefix-cache hit: the first two published blocks are already in place here
    (prod, pkv), (cons, ckv) = pair("prod", 1), pair("cons", None)
    for t in ckv:
        t[[5, 6, 7, 8]] = 0
    prod.publish("r", [1, 2, 3, 4], ttl=10)
    h = cons.pull("r", [5, 6, 7, 8], timeout=5, skip=2)
    h.wait(5)
    assert h.nbytes == 2 * cons.layout.block_nbytes
    for i in range(LAYERS):
        assert not ckv[i][[5, 6]].any()  # untouched
        assert np.array_equal(ckv[i][[7, 8]], pkv[i][[3, 4]])
    assert prod.requests.wait_finished(5).kind == EventKind.CONSUMED
    prod.publish("all-held", [1, 2], ttl=10)  # nothing left to read: still claimed and confirmed
    cons.pull("all-held", [5, 6], timeout=5, skip=2).wait(5)
    assert prod.requests.wait_finished(5).request_id == "all-held"
    with pytest.raises(ConfigError, match="skip=3"):
        cons.pull("x", [5, 6], skip=3)


def test_second_consumer_gets_clear_error(pair):
    (prod, _), (c1, _), (c2, _) = pair("prod", 1), pair("c1", None), pair("c2", None)
    prod.publish("r", [1], ttl=10)
    c1.pull("r", [0], timeout=5).wait(5)
    with pytest.raises(AlreadyClaimedError):
        c2.pull("r", [0], timeout=5).wait(5)


def test_pull_timeout_fails_handle(pair):
    (cons, _) = pair("cons", None)
    h = cons.pull("never", [0], timeout=0.3)
    with pytest.raises(RegistryTimeoutError):
        h.wait(5)
    assert list(h.failed_blocks) == [0]


def test_block_count_mismatch_fails_both_sides(pair):
    (prod, _), (cons, _) = pair("prod", 1), pair("cons", None)
    prod.publish("r", [1, 2, 3], ttl=10)
    with pytest.raises(RequestFailedError, match="3 blocks"):
        cons.pull("r", [0], timeout=5).wait(5)
    assert prod.requests.wait_finished(5).kind is EventKind.FAILED


def test_consumer_cancel_tells_producer(pair):
    (prod, _), (cons, _) = pair("prod", 1), pair("cons", None)
    h = cons.expect("r", [0, 1], timeout=10)
    time.sleep(0.2)
    cons.requests.cancel("r", "scheduler preempted it")
    with pytest.raises(RequestFailedError, match="cancelled"):
        h.wait(5)
    p = prod.push("r", [1, 2], timeout=1)
    with pytest.raises(RequestFailedError, match="preempted"):
        p.wait(5)   # the request's fate, not a timeout


def test_push_layer_groups(pair):
    (prod, pkv), (cons, ckv) = pair("prod", 1), pair("cons", None)
    hs = [prod.push("r", [7, 8], layers=[0, 1], last=False, timeout=5)]
    h = cons.expect("r", [2, 3], timeout=10)
    hs.append(prod.push("r", [7, 8], layers=[2, 3], last=True, timeout=5))
    for x in hs:
        x.wait(5)
    h.wait(5)
    assert all(np.array_equal(ckv[i][[2, 3]], pkv[i][[7, 8]]) for i in range(LAYERS))
    assert prod.requests.wait_finished(5).kind is EventKind.CONSUMED


def test_push_nobody_expects(pair):
    (prod, _) = pair("prod", 1)
    with pytest.raises(RegistryTimeoutError):
        prod.push("r", [1], timeout=0.3).wait(5)


@pytest.mark.parametrize("ending", ["cancelled", "expired", "failed", "consumed"])
def test_push_after_request_ended_fails_at_once(forgetful_pair, ending):
    (prod, _), (cons, _) = forgetful_pair("prod", 1), forgetful_pair("cons", None)
    h = cons.expect("r", [2, 3], timeout=1.0 if ending == "expired" else 30)
    if ending == "failed":
        with pytest.raises(RequestFailedError, match="expects 2 blocks"):
            prod.push("r", [7], layers=[0], last=False, timeout=30).wait(5)
    else:
        prod.push("r", [7, 8], layers=[0], last=ending == "consumed", timeout=30).wait(5)
    if ending == "cancelled":
        cons.requests.cancel("r", "scheduler preempted it")
    fin = prod.requests.wait_finished(5)
    assert (fin.request_id, fin.kind.value) == ("r", ending)
    t0 = time.monotonic()
    late = prod.push("r", [7, 8], layers=[1], last=True, timeout=30)
    with pytest.raises(RequestFailedError) as err:
        late.wait(5)   # not a TransferTimeoutError after 5 s: the push waited for nobody
    assert time.monotonic() - t0 < 2
    msg = str(err.value)
    assert "'r'" in msg and f"already ended ({ending})" in msg, msg
    if ending != "consumed":
        with pytest.raises(RequestFailedError):
            h.wait(5)


def test_push_of_a_reused_request_id_proceeds(forgetful_pair):
    (prod, pkv), (cons, ckv) = forgetful_pair("prod", 1), forgetful_pair("cons", None)
    cons.expect("r", [2, 3], timeout=30)
    prod.push("r", [7, 8], layers=[0], last=False, timeout=30).wait(5)
    cons.requests.cancel("r", "preempted")
    assert prod.requests.wait_finished(5).kind is EventKind.CANCELLED
    h = cons.expect("r", [4, 5], timeout=30)   # the scheduler runs the request again, same id
    prod.push("r", [7, 8], timeout=30).wait(5)
    h.wait(5)
    assert all(np.array_equal(ckv[i][[4, 5]], pkv[i][[7, 8]]) for i in range(LAYERS))


def test_pull_transfer_stats_exclude_waiting_for_the_publication(pair):
    (prod, _), (cons, _) = pair("prod", 1), pair("cons", None)
    h = cons.pull("r", [5, 6], timeout=30)
    assert isinstance(h, RequestHandle) and h.transfer_stats is None
    time.sleep(1.0)                      # the producer's prefill
    prod.publish("r", [1, 2], ttl=10)
    total = h.wait(5)
    xfer = h.transfer_stats
    assert xfer is not None
    two_blocks = 2 * cons.layout.block_nbytes
    assert (xfer.nbytes, xfer.backend) == (two_blocks, "tcp")
    assert (total.nbytes, total.backend) == (two_blocks, "tcp")
    assert total.seconds >= 1.0                  # the handle still times what the caller waited
    assert 0 < xfer.seconds < total.seconds - 0.5
    assert h.stats == total


def test_push_transfer_stats_are_the_write(pair):
    (prod, _), (cons, _) = pair("prod", 1), pair("cons", None)
    p = prod.push("r", [7, 8], layers=[0, 1], last=True, timeout=30)
    time.sleep(1.0)                      # nobody expects it yet
    h = cons.expect("r", [2, 3], timeout=10)
    total = p.wait(5)
    h.wait(5)
    xfer = p.transfer_stats
    assert xfer is not None
    assert (xfer.nbytes, xfer.backend) == (cons.layout.block_nbytes, "tcp")   # 2 of 4 layers of 2 blocks
    assert total.seconds >= 1.0 and xfer.seconds < total.seconds - 0.5
    assert h.transfer_stats is None      # the consumer does not see the producer's writes
