"""RequestAgent with two Connectors in one process, on both registries: the handle contract."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kvxfer.connector import Connector
from kvxfer.registry.agent import RequestAgent
from kvxfer.registry.errors import (AlreadyClaimedError, DuplicateRequestError, RegistryTimeoutError,
                                    RequestFailedError)
from kvxfer.registry.messages import EventKind

from mp_parties import LAYERS, make_kv


@pytest.fixture
def pair(registry_url):
    made = []

    def make(name: str, seed: int | None):
        kv = make_kv(seed)
        conn = Connector(name, registry=registry_url)
        conn.register(kv)
        conn._agent = RequestAgent(conn, registry_url, lease_s=1.0)
        made.append(conn)
        return conn, kv
    yield make
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
