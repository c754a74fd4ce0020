"""The registry state machine with a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import pytest

from kvxfer.registry.core import CoreConfig, Notice, RegistryCore, WaitResolved
from kvxfer.registry.errors import ErrorCode
from kvxfer.registry.messages import (Ack, AwaitExpect, Cancel, Claim, Complete, ConnectorInfo, EventKind, Expect,
                                      Expectation, Failure, Heartbeat, Lease, Lookup, Mode, Publish, Pull, Query,
                                      Register, RequestState, Role, Unregister)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> RegistryCore:
    c = RegistryCore(CoreConfig(), clock=clock)
    for name in ("p", "c", "c2"):
        assert c.handle(Register(name, name + "-inst", name.encode(), 1.0)) == Lease(1.0)
    return c


def advance(core: RegistryCore, clock: Clock, dt: float) -> list:
    clock.t += dt
    core.tick()
    return core.drain()


def events(out: list) -> list[tuple[str, str, EventKind, Role]]:
    return [(n.to, n.event.request_id, n.event.kind, n.event.role) for n in out if isinstance(n, Notice)]


def code(result) -> ErrorCode:
    assert isinstance(result, Failure), result
    return result.code


def test_directory_lease_and_heartbeat(core, clock):
    assert core.handle(Lookup("p")) == ConnectorInfo("p", b"p")
    assert code(core.handle(Register("p", "other", b"x", 1.0))) is ErrorCode.NAME_TAKEN
    assert core.handle(Register("p", "p-inst", b"new", 1.0)) == Lease(1.0)  # same instance: update
    assert core.handle(Lookup("p")) == ConnectorInfo("p", b"new")
    for _ in range(5):  # heartbeats keep it alive well past one lease
        advance(core, clock, 0.5)
        assert core.handle(Heartbeat("p", "p-inst")) == Lease(1.0)
    advance(core, clock, 1.01)
    assert "p" not in core.connectors()
    assert code(core.handle(Heartbeat("p", "p-inst"))) is ErrorCode.UNKNOWN_CONNECTOR
    assert code(core.handle(Lookup("p"))) is ErrorCode.UNKNOWN_CONNECTOR
    assert core.handle(Register("p", "other", b"x", 1.0)) == Lease(1.0)  # free again


def test_lease_is_clamped(clock):
    c = RegistryCore(CoreConfig(min_lease_s=0.5, max_lease_s=2.0), clock=clock)
    assert c.handle(Register("a", "i", b"", 0.01)) == Lease(0.5)
    assert c.handle(Register("b", "i", b"", 99.0)) == Lease(2.0)


def test_publish_then_pull_exactly_once(core):
    assert core.handle(Publish("r", "p", (1, 2), 5.0)) == Ack()
    assert code(core.handle(Publish("r", "p", (1,), 5.0))) is ErrorCode.DUPLICATE
    assert core.handle(Pull("r", "c", 1.0), wait_id=1) == Claim("r", "p", (1, 2), b"p")
    assert code(core.handle(Pull("r", "c2", 1.0), wait_id=2)) is ErrorCode.ALREADY_CLAIMED
    assert core.handle(Query("r")).state is RequestState.CLAIMED
    assert core.handle(Complete("r", "c", True, "")) == Ack()
    assert events(core.drain()) == [("p", "r", EventKind.CONSUMED, Role.PRODUCER),
                                    ("c", "r", EventKind.CONSUMED, Role.CONSUMER)]
    assert core.request_ids() == []
    # a late pull gets the request's fate at once, not a wait
    assert code(core.handle(Pull("r", "c2", 5.0), wait_id=3)) is ErrorCode.ALREADY_CLAIMED
    assert core.pending_waits() == 0


def test_waiters_first_wins_others_refused(core, clock):
    assert core.handle(Pull("r", "c", 2.0), wait_id=1) is None
    assert core.handle(Pull("r", "c2", 2.0), wait_id=2) is None
    assert core.handle(Publish("r", "p", (7,), 5.0)) == Ack()
    out = core.drain()
    assert WaitResolved(1, Claim("r", "p", (7,), b"p")) in out
    (loser,) = [o for o in out if isinstance(o, WaitResolved) and o.wait_id == 2]
    assert code(loser.result) is ErrorCode.ALREADY_CLAIMED
    assert core.pending_waits() == 0


def test_pull_timeout_and_immediate_miss(core, clock):
    assert code(core.handle(Pull("r", "c", 0.0), wait_id=None)) is ErrorCode.UNKNOWN_REQUEST
    assert core.handle(Pull("r", "c", 0.5), wait_id=9) is None
    assert core.next_deadline() <= clock.t + 0.5
    assert advance(core, clock, 0.4) == []
    (res,) = advance(core, clock, 0.11)
    assert res.wait_id == 9 and code(res.result) is ErrorCode.TIMEOUT


def test_forgotten_waits_resolve_nothing(core):
    assert core.handle(Pull("r", "c", 2.0), wait_id=1) is None
    core.forget_waits([1])
    core.handle(Publish("r", "p", (1,), 5.0))
    assert [o for o in core.drain() if isinstance(o, WaitResolved)] == []
    assert core.handle(Query("r")).state is RequestState.PUBLISHED


def test_ttl_expiry_tells_producer(core, clock):
    core.handle(Publish("r", "p", (1,), 0.5))
    assert events(advance(core, clock, 0.6)) == [("p", "r", EventKind.EXPIRED, Role.PRODUCER)]
    assert core.request_ids() == []
    assert code(core.handle(Pull("r", "c", 1.0), wait_id=1)) is ErrorCode.REQUEST_FAILED


def test_claim_extends_ttl(core, clock):
    core.handle(Publish("r", "p", (1,), 1.0))
    clock.t += 0.9
    for n in ("p", "c"):
        core.handle(Heartbeat(n, n + "-inst"))
    assert isinstance(core.handle(Pull("r", "c", 1.0), wait_id=1), Claim)
    assert events(advance(core, clock, 0.5)) == []   # would have expired without the claim
    for n in ("p", "c"):
        core.handle(Heartbeat(n, n + "-inst"))
    assert events(advance(core, clock, 0.55))[0][2] is EventKind.EXPIRED


def test_producer_lease_loss_fails_claimed_request_for_both(core, clock):
    core.handle(Publish("r", "p", (1,), 30.0))
    core.handle(Pull("r", "c", 1.0), wait_id=1)
    clock.t += 0.6
    core.handle(Heartbeat("c", "c-inst"))
    out = events(advance(core, clock, 0.5))
    assert ("c", "r", EventKind.FAILED, Role.CONSUMER) in out
    assert core.request_ids() == []


def test_lost_connector_fails_its_waits(core, clock):
    assert core.handle(AwaitExpect("r", "p", 10.0), wait_id=4) is None
    for n in ("c", "c2"):
        core.handle(Heartbeat(n, n + "-inst"))
    clock.t += 1.01
    core.tick()
    (res,) = [o for o in core.drain() if isinstance(o, WaitResolved)]
    assert code(res.result) is ErrorCode.UNKNOWN_CONNECTOR and "lease" in res.result.message


def test_push_mode_full_cycle(core):
    assert core.handle(AwaitExpect("r", "p", 5.0), wait_id=1) is None
    assert core.handle(Expect("r", "c", (3, 4), 5.0)) == Ack()
    assert core.drain() == [WaitResolved(1, Expectation("r", "c", (3, 4), b"c"))]
    assert code(core.handle(AwaitExpect("r", "c2", 5.0), wait_id=2)) is ErrorCode.ALREADY_CLAIMED
    assert code(core.handle(Pull("r", "c2", 5.0), wait_id=3)) is ErrorCode.NOT_A_PARTY
    assert core.handle(Complete("r", "p", True, "")) == Ack()
    assert events(core.drain()) == [("c", "r", EventKind.DELIVERED, Role.CONSUMER)]
    assert core.handle(Query("r")).state is RequestState.DELIVERED
    assert core.handle(Complete("r", "c", True, "")) == Ack()
    assert ("p", "r", EventKind.CONSUMED, Role.PRODUCER) in events(core.drain())


def test_complete_rules(core):
    core.handle(Publish("r", "p", (1,), 5.0))
    assert code(core.handle(Complete("r", "c", True, ""))) is ErrorCode.NOT_A_PARTY       # not claimed yet
    assert code(core.handle(Complete("r", "zz", True, ""))) is ErrorCode.NOT_A_PARTY
    core.handle(Pull("r", "c", 1.0), wait_id=1)
    assert code(core.handle(Complete("r", "p", True, ""))) is ErrorCode.NOT_A_PARTY      # producer can't
    assert core.handle(Complete("r", "c", False, "disk full")) == Ack()
    ev = [n for n in core.drain() if isinstance(n, Notice) and n.to == "p"][0].event
    assert ev.kind is EventKind.FAILED and "disk full" in ev.reason
    assert code(core.handle(Complete("r", "c", True, ""))) is ErrorCode.UNKNOWN_REQUEST


@pytest.mark.parametrize("who", ["p", "c"])
def test_cancel_by_either_side(core, who):
    core.handle(Publish("r", "p", (1,), 5.0))
    core.handle(Pull("r", "c", 1.0), wait_id=1)
    assert core.handle(Cancel("r", who, "changed my mind")) == Ack()
    evs = events(core.drain())
    assert ("p", "r", EventKind.CANCELLED, Role.PRODUCER) in evs and ("c", "r", EventKind.CANCELLED, Role.CONSUMER) in evs
    assert core.request_ids() == []


def test_unregister_fails_requests_and_unknown_party_refused(core):
    assert code(core.handle(Publish("r", "nobody", (1,), 5.0))) is ErrorCode.UNKNOWN_CONNECTOR
    core.handle(Expect("r", "c", (1,), 5.0))
    assert core.handle(Unregister("c", "wrong-instance")) == Ack()   # not ours: no effect
    assert core.request_ids() == ["r"]
    core.handle(Unregister("c", "c-inst"))
    assert core.request_ids() == [] and "c" not in core.connectors()


def test_invalid_arguments(core):
    assert code(core.handle(Publish("", "p", (1,), 5.0))) is ErrorCode.INVALID
    assert code(core.handle(Publish("r", "p", (1,), 0.0))) is ErrorCode.INVALID
    assert code(core.handle(Expect("r", "c", (1,), 1e6))) is ErrorCode.INVALID


def test_republish_after_end_is_allowed(core, clock):
    core.handle(Publish("r", "p", (1,), 0.1))
    advance(core, clock, 0.2)
    assert core.handle(Publish("r", "p", (1,), 5.0)) == Ack()
    assert isinstance(core.handle(Pull("r", "c", 1.0), wait_id=1), Claim)
    assert core.handle(Query("r")).mode is Mode.PULL
