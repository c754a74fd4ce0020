"""Publications for several consumers through the clients, on both registries (same rules)."""

from __future__ import annotations

import queue
import threading

import pytest

from kvxfer.registry.errors import AlreadyClaimedError, InvalidRequestError, NotAPartyError, UnknownRequestError
from kvxfer.registry.messages import Claim, EventKind, RequestState, Role

from test_client import Party


@pytest.fixture
def parties(registry_url):
    made: list[Party] = []

    def make(name: str, lease: float = 1.0) -> Party:
        p = Party(registry_url, name, lease)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def no_event(party: Party, wait: float = 0.4) -> None:
    with pytest.raises(queue.Empty):
        ev = party.event(wait)
        raise AssertionError(f"unexpected event {ev}")


def test_two_consumers_then_consumed_once(parties):
    p, c0, c1, c2 = parties("p"), parties("c0"), parties("c1"), parties("c2")
    p.client.publish("r#tp0", [3, 4], 10, consumers=2)
    assert c0.client.pull("r#tp0", 2) == Claim("r#tp0", "p", (3, 4), b"p-meta")
    with pytest.raises(AlreadyClaimedError, match="itself"):
        c0.client.pull("r#tp0", 0)
    info = p.client.query("r#tp0")
    assert (info.state, info.consumers, info.claimed, info.confirmed) == (RequestState.PUBLISHED, 2, 1, 0)
    assert c1.client.pull("r#tp0", 2).blocks == (3, 4)
    with pytest.raises(AlreadyClaimedError):
        c2.client.pull("r#tp0", 0)
    assert p.client.query("r#tp0").state is RequestState.CLAIMED
    c0.client.complete("r#tp0")
    ev = c0.event()
    assert (ev.kind, ev.role) == (EventKind.CONSUMED, Role.CONSUMER) and "1 of 2" in ev.reason
    no_event(p)
    with pytest.raises(NotAPartyError, match="already confirmed"):
        c0.client.complete("r#tp0", False, "late")
    c1.client.complete("r#tp0")
    ev = p.event()
    assert (ev.request_id, ev.kind, ev.role) == ("r#tp0", EventKind.CONSUMED, Role.PRODUCER)
    assert c1.event().kind is EventKind.CONSUMED
    no_event(p)
    no_event(c0)
    with pytest.raises(UnknownRequestError):
        p.client.query("r#tp0")


def test_waiting_consumers_are_served_when_it_is_published(parties):
    p, c0, c1 = parties("p"), parties("c0"), parties("c1")
    claims: dict[str, Claim] = {}
    ts = [threading.Thread(target=lambda c=c: claims.__setitem__(c.client.name, c.client.pull("r", 5)))
          for c in (c0, c1)]
    for t in ts:
        t.start()
    threading.Timer(0.3, lambda: p.client.publish("r", [9], 10, consumers=2)).start()
    for t in ts:
        t.join(10)
    assert claims == {"c0": Claim("r", "p", (9,), b"p-meta"), "c1": Claim("r", "p", (9,), b"p-meta")}


def test_one_consumer_fails_producer_told_once(parties):
    p, c0, c1 = parties("p"), parties("c0"), parties("c1")
    p.client.publish("r", [1], 10, consumers=2)
    c0.client.pull("r", 1)
    c1.client.pull("r", 1)
    c1.client.complete("r", False, "bad block")
    ev = p.event()
    assert (ev.kind, ev.role) == (EventKind.FAILED, Role.PRODUCER) and "bad block" in ev.reason
    assert c0.event().kind is EventKind.FAILED      # the other reader learns at once
    no_event(p)
    with pytest.raises(UnknownRequestError):
        c0.client.complete("r")


def test_expiry_and_cancel_with_several_consumers(parties):
    p, c0, c1 = parties("p"), parties("c0"), parties("c1")
    p.client.publish("short", [1], 0.6, consumers=2)
    c0.client.pull("short", 1)
    c0.client.complete("short")
    assert c0.event().kind is EventKind.CONSUMED
    ev = p.event(5)
    assert (ev.request_id, ev.kind) == ("short", EventKind.EXPIRED)   # the second never came
    no_event(p)
    no_event(c0)
    p.client.publish("r", [1], 10, consumers=2)
    c0.client.pull("r", 1)
    c1.client.pull("r", 1)
    c0.client.cancel("r", "preempted")
    ev = p.event()
    assert ev.kind is EventKind.CANCELLED and "preempted" in ev.reason
    assert c1.event().kind is EventKind.CANCELLED
    no_event(p)


def test_bad_consumer_count_refused(parties):
    p = parties("p")
    with pytest.raises(InvalidRequestError, match="consumers"):
        p.client.publish("r", [1], 10, consumers=0)
    with pytest.raises(UnknownRequestError):
        p.client.query("r")
