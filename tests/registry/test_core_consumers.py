"""Publications for several consumers in the registry core (fake clock, no sockets)."""

from __future__ import annotations

import pytest

from kvxfer.errors import RemoteProtocolError
from kvxfer.registry.core import CoreConfig, RegistryCore, WaitResolved
from kvxfer.registry.errors import ErrorCode
from kvxfer.registry.messages import (Ack, Cancel, Claim, Complete, EventKind, Heartbeat, Publish, Pull, Query,
                                      Register, RequestState, Role, from_wire, to_wire)

from test_core import Clock, advance, code, events

NAMES = ("p", "c0", "c1", "c2")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> RegistryCore:
    c = RegistryCore(CoreConfig(), clock=clock)
    for name in NAMES:
        assert c.handle(Register(name, name + "-i", name.encode(), 1.0))
    return c


def keep_alive(core: RegistryCore, *names: str) -> None:
    for n in names:
        core.handle(Heartbeat(n, n + "-i"))


def test_two_consumers_each_claim_once_producer_told_when_both_confirmed(core):
    assert core.handle(Publish("r#tp0", "p", (4, 5), 5.0, consumers=2)) == Ack()
    assert core.handle(Pull("r#tp0", "c0", 1.0), wait_id=1) == Claim("r#tp0", "p", (4, 5), b"p")
    info = core.handle(Query("r#tp0"))
    assert (info.state, info.consumer, info.consumers, info.claimed, info.confirmed) == \
        (RequestState.PUBLISHED, "c0", 2, 1, 0)
    res = core.handle(Pull("r#tp0", "c0", 1.0), wait_id=2)   # the same consumer again
    assert code(res) is ErrorCode.ALREADY_CLAIMED and "itself" in res.message
    assert core.handle(Pull("r#tp0", "c1", 1.0), wait_id=3) == Claim("r#tp0", "p", (4, 5), b"p")
    assert core.handle(Query("r#tp0")).state is RequestState.CLAIMED
    res = core.handle(Pull("r#tp0", "c2", 1.0), wait_id=4)   # a third consumer: none left
    assert code(res) is ErrorCode.ALREADY_CLAIMED and "2 consumers" in res.message
    assert core.drain() == []
    assert core.handle(Complete("r#tp0", "c1", True, "")) == Ack()
    assert events(core.drain()) == [("c1", "r#tp0", EventKind.CONSUMED, Role.CONSUMER)]   # the producer waits
    assert core.handle(Query("r#tp0")).confirmed == 1
    # a consumer that confirmed is no longer a party: it can neither confirm again nor fail it
    assert code(core.handle(Complete("r#tp0", "c1", True, ""))) is ErrorCode.NOT_A_PARTY
    assert code(core.handle(Complete("r#tp0", "c1", False, "late"))) is ErrorCode.NOT_A_PARTY
    assert core.handle(Complete("r#tp0", "c0", True, "")) == Ack()
    assert events(core.drain()) == [("p", "r#tp0", EventKind.CONSUMED, Role.PRODUCER),
                                    ("c0", "r#tp0", EventKind.CONSUMED, Role.CONSUMER)]
    assert core.request_ids() == []


def test_waiters_before_the_publication_take_its_consumer_slots(core):
    for wid, name in enumerate(("c0", "c1", "c2"), 1):
        assert core.handle(Pull("r", name, 2.0), wait_id=wid) is None
    assert core.handle(Pull("r", "c0", 2.0), wait_id=9) is None    # a second wait of c0
    assert core.handle(Publish("r", "p", (7,), 5.0, consumers=2)) == Ack()
    out = {o.wait_id: o.result for o in core.drain() if isinstance(o, WaitResolved)}
    assert out[1] == out[2] == Claim("r", "p", (7,), b"p")
    assert code(out[3]) is ErrorCode.ALREADY_CLAIMED and code(out[9]) is ErrorCode.ALREADY_CLAIMED
    assert core.pending_waits() == 0 and core.handle(Query("r")).state is RequestState.CLAIMED


def test_one_consumer_failing_fails_the_request_once_for_everyone_left(core):
    core.handle(Publish("r", "p", (1,), 5.0, consumers=3))
    for n in ("c0", "c1", "c2"):
        core.handle(Pull("r", n, 1.0), wait_id=hash(n) & 0xFFFF)
    core.handle(Complete("r", "c0", True, ""))
    core.drain()
    assert core.handle(Complete("r", "c1", False, "read failed")) == Ack()
    evs = events(core.drain())
    # the producer once; c2 (still reading) too; c0 had its part already
    assert sorted(evs) == sorted([("p", "r", EventKind.FAILED, Role.PRODUCER),
                                  ("c1", "r", EventKind.FAILED, Role.CONSUMER),
                                  ("c2", "r", EventKind.FAILED, Role.CONSUMER)])
    assert core.request_ids() == []
    assert code(core.handle(Complete("r", "c2", True, ""))) is ErrorCode.UNKNOWN_REQUEST
    res = core.handle(Pull("r", "c2", 1.0), wait_id=77)
    assert code(res) is ErrorCode.REQUEST_FAILED and "read failed" in res.message   # the tombstone


def test_expiry_before_every_consumer_came(core, clock):
    core.handle(Publish("r", "p", (1,), 2.0, consumers=2))
    advance(core, clock, 0.5)
    keep_alive(core, *NAMES)
    core.handle(Pull("r", "c0", 1.0), wait_id=1)   # renews the ttl to now + 2
    core.handle(Complete("r", "c0", True, ""))
    assert events(core.drain()) == [("c0", "r", EventKind.CONSUMED, Role.CONSUMER)]
    for _ in range(3):
        out = advance(core, clock, 0.5)
        keep_alive(core, *NAMES)
        assert events(out) == []
    out = advance(core, clock, 0.6)
    assert events(out) == [("p", "r", EventKind.EXPIRED, Role.PRODUCER)]   # once; c0 is done already
    assert core.request_ids() == []


def test_cancel_by_one_consumer_ends_it_for_the_producer_once(core):
    core.handle(Publish("r", "p", (1,), 5.0, consumers=2))
    core.handle(Pull("r", "c0", 1.0), wait_id=1)
    core.handle(Pull("r", "c1", 1.0), wait_id=2)
    assert code(core.handle(Cancel("r", "c2", "not mine"))) is ErrorCode.NOT_A_PARTY
    assert core.handle(Cancel("r", "c1", "preempted")) == Ack()
    evs = events(core.drain())
    assert sorted(evs) == sorted([("p", "r", EventKind.CANCELLED, Role.PRODUCER),
                                  ("c0", "r", EventKind.CANCELLED, Role.CONSUMER),
                                  ("c1", "r", EventKind.CANCELLED, Role.CONSUMER)])
    assert core.request_ids() == []


def test_a_lost_consumer_fails_it_but_one_that_confirmed_does_not(core, clock):
    core.handle(Publish("r", "p", (1,), 30.0, consumers=3))
    for wid, n in enumerate(("c0", "c1", "c2")):
        core.handle(Pull("r", n, 1.0), wait_id=wid)
    core.handle(Complete("r", "c0", True, ""))
    core.drain()
    advance(core, clock, 0.6)
    keep_alive(core, "p", "c1", "c2")          # c0 (done) stops its heartbeats
    assert events(advance(core, clock, 0.6)) == []
    assert core.handle(Query("r")).confirmed == 1
    keep_alive(core, "p", "c1")                # c2 (still reading) is lost
    out = advance(core, clock, 0.6)
    assert sorted(events(out)) == sorted([("p", "r", EventKind.FAILED, Role.PRODUCER),
                                          ("c1", "r", EventKind.FAILED, Role.CONSUMER),
                                          ("c2", "r", EventKind.FAILED, Role.CONSUMER)])


def test_bad_consumer_counts_are_refused(core):
    for n in (0, 1025):
        res = core.handle(Publish("r", "p", (1,), 5.0, consumers=n))
        assert code(res) is ErrorCode.INVALID and "consumers" in res.message
    assert core.request_ids() == []


def test_publish_wire_field_defaults_to_one_consumer():
    wire = to_wire(Publish("r", "p", (1, 2), 5.0))
    assert wire["consumers"] == 1
    del wire["consumers"]                      # a client of the previous version
    assert from_wire(Publish, wire) == Publish("r", "p", (1, 2), 5.0, 1)
    with pytest.raises(RemoteProtocolError, match="consumers"):
        from_wire(Publish, {**wire, "consumers": "two"})
    with pytest.raises(RemoteProtocolError, match="ttl_s"):
        from_wire(Publish, {k: v for k, v in wire.items() if k != "ttl_s"})   # no default: still required
