"""The registry state machine: directory of connectors under leases, and request matching.

Layer: registry, pure logic. No sockets, no threads, no sleeping: the caller passes typed
messages in (:meth:`RegistryCore.handle`), gets a result back or ``None`` when the operation
waits, and takes what happened meanwhile (resolved waits, events for connectors) from
:meth:`RegistryCore.drain`. Time comes from an injectable clock; the caller calls
:meth:`RegistryCore.tick` at :meth:`RegistryCore.next_deadline` (every operation ticks too).

Rules (the Redis store implements the same ones):

* A connector holds its name under a lease renewed by heartbeats. A name held by a live
  instance cannot be taken by another one. When the lease runs out the connector is dropped,
  every request it is a party of fails, and every wait it made fails.
* Pull mode: the producer publishes for ``consumers`` consumers (default 1); each of the first
  ``consumers`` distinct connectors to pull claims it once (a connector that claimed it, and
  every pull beyond that count, gets :class:`AlreadyClaimedError`); each consumer confirms.
  The request is CONSUMED when every one has confirmed: the producer is told once. A consumer
  that confirms before the others is told CONSUMED for its own part at once and is no longer
  a party. One consumer's failure or cancellation, a lost party or the TTL ends the whole
  request for everyone still in it (the producer is told once, and frees its blocks once).
* Push mode: the consumer expects; the first producer to await-expect takes it; the producer
  completes its writes (the consumer is told DELIVERED); the consumer confirms.
* Every party gets one final event (consumed, expired, failed, cancelled); the entry is gone.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from ..errors import RegistryError
from .errors import (DuplicateRequestError, ErrorCode, InvalidRequestError, NameTakenError, NotAPartyError,
                     UnknownConnectorError, UnknownRequestError, code_of, error_from_code)
from .messages import (MAX_CONSUMERS, Ack, AwaitExpect, Cancel, Claim, Complete, ConnectorInfo, EventKind, Expect,
                       Expectation, Failure, Heartbeat, Lease, Lookup, Mode, Publish, Pull, Query, RegRequest,
                       RegResult, Register, RequestEvent, RequestInfo, RequestState, Role, Unregister)

__all__ = ["RegistryCore", "CoreConfig", "WaitResolved", "Notice", "Output"]


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """Limits of the registry core."""

    min_lease_s: float = 0.05
    max_lease_s: float = 3600.0
    max_ttl_s: float = 24 * 3600.0
    max_wait_s: float = 3600.0
    tombstone_s: float = 60.0   # how long a finished request id still answers pulls with its fate


@dataclass(frozen=True, slots=True)
class WaitResolved:
    """A wait registered with ``wait_id`` finished: a Claim, an Expectation, or a Failure."""

    wait_id: int
    result: RegResult


@dataclass(frozen=True, slots=True)
class Notice:
    """An event for the connector named ``to``."""

    to: str
    event: RequestEvent


Output = Union[WaitResolved, Notice]


class _Due(Enum):
    LEASE = 1
    TTL = 2
    WAIT = 3
    TOMB = 4


class _WaitKind(Enum):
    PULL = 1
    AWAIT_EXPECT = 2


@dataclass(slots=True)
class _Connector:
    name: str
    instance: str
    metadata: bytes
    lease_s: float
    expires_at: float
    requests: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Request:
    request_id: str
    mode: Mode
    state: RequestState
    producer: str | None
    consumer: str | None
    blocks: tuple[int, ...]
    ttl_s: float
    expires_at: float
    need: int = 1                                                  # pull: consumers to confirm
    claimants: dict[str, bool] = field(default_factory=dict)      # pull: consumer -> confirmed

    def unconfirmed(self) -> list[str]:
        """The consumers still in the request (claimed, not confirmed) in claim order."""
        if self.mode is Mode.PUSH:
            return [] if self.consumer is None else [self.consumer]
        return [name for name, done in self.claimants.items() if not done]


@dataclass(slots=True)
class _Wait:
    wait_id: int
    kind: _WaitKind
    request_id: str
    party: str
    deadline: float


class RegistryCore:
    """Registry state and rules; see the module docstring. Not thread-safe: one owner calls it."""

    def __init__(self, config: CoreConfig = CoreConfig(), clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._connectors: dict[str, _Connector] = {}
        self._requests: dict[str, _Request] = {}
        self._waits: dict[int, _Wait] = {}
        self._waiters: dict[tuple[_WaitKind, str], list[int]] = {}
        self._heap: list[tuple[float, int, _Due, object]] = []
        self._seq = itertools.count()
        self._out: list[Output] = []
        self._tombs: dict[str, Failure] = {}

    # -- driving ------------------------------------------------------------------------
    def handle(self, msg: RegRequest, wait_id: int | None = None) -> RegResult | None:
        """Apply one request; its result, ``None`` when it waits (resolved later under
        ``wait_id`` through :meth:`drain`), or a :class:`Failure` for a refusal."""
        try:
            return self._dispatch(msg, wait_id)
        except RegistryError as exc:
            return Failure(code_of(exc), str(exc))

    def drain(self) -> list[Output]:
        """Take every resolved wait and event produced since the last drain."""
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """The earliest clock value at which :meth:`tick` may have work (None: nothing timed)."""
        return self._heap[0][0] if self._heap else None

    def tick(self) -> None:
        """Expire leases, TTLs and waits that are due now."""
        now = self._clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, due, key = heapq.heappop(heap)
            if due is _Due.LEASE:
                conn = self._connectors.get(key)  # type: ignore[arg-type]
                if conn is None:
                    continue
                if conn.expires_at > now:  # renewed since: look again later
                    self._schedule(conn.expires_at, _Due.LEASE, conn.name)
                    continue
                self._drop_connector(conn, f"connector {conn.name!r} lost: lease of {conn.lease_s:g} s expired")
            elif due is _Due.TTL:
                req = self._requests.get(key)  # type: ignore[arg-type]
                if req is None:
                    continue
                if req.expires_at > now:
                    self._schedule(req.expires_at, _Due.TTL, req.request_id)
                    continue
                self._finish(req, EventKind.EXPIRED,
                             f"request {req.request_id!r} expired ({req.state.value}, ttl {req.ttl_s:g} s)")
            elif due is _Due.TOMB:
                self._tombs.pop(key, None)  # type: ignore[arg-type]
            else:
                wait = self._waits.get(key)  # type: ignore[arg-type]
                if wait is not None:
                    what = "published" if wait.kind is _WaitKind.PULL else "expected by a consumer"
                    self._resolve(wait, Failure(ErrorCode.TIMEOUT, f"request {wait.request_id!r} not {what} within the timeout"))

    def forget_waits(self, wait_ids: list[int]) -> None:
        """Drop waits whose caller went away (nothing is resolved for them)."""
        for wid in wait_ids:
            wait = self._waits.pop(wid, None)
            if wait is not None:
                self._unlist(wait)

    # -- introspection (tests, admin) ---------------------------------------------------
    def connectors(self) -> list[str]:
        return sorted(self._connectors)

    def request_ids(self) -> list[str]:
        return sorted(self._requests)

    def pending_waits(self) -> int:
        return len(self._waits)

    # -- operations ---------------------------------------------------------------------
    def _dispatch(self, msg: RegRequest, wait_id: int | None) -> RegResult | None:
        self.tick()
        if isinstance(msg, Publish):
            return self._publish(msg)
        if isinstance(msg, Pull):
            return self._pull(msg, wait_id)
        if isinstance(msg, Complete):
            return self._complete(msg)
        if isinstance(msg, Heartbeat):
            return self._heartbeat(msg)
        if isinstance(msg, Expect):
            return self._expect(msg)
        if isinstance(msg, AwaitExpect):
            return self._await_expect(msg, wait_id)
        if isinstance(msg, Cancel):
            return self._cancel(msg)
        if isinstance(msg, Register):
            return self._register(msg)
        if isinstance(msg, Unregister):
            return self._unregister(msg)
        if isinstance(msg, Lookup):
            conn = self._live(msg.name)
            return ConnectorInfo(conn.name, conn.metadata)
        if isinstance(msg, Query):
            req = self._request(msg.request_id)
            return RequestInfo(req.request_id, req.mode, req.state, req.producer, req.consumer, req.need,
                               len(req.claimants), sum(req.claimants.values()))
        raise InvalidRequestError(f"{type(msg).__name__} is not handled by the registry core")

    def _register(self, msg: Register) -> Lease:
        _check_name(msg.name, "connector name")
        lease = min(max(msg.lease_s, self.config.min_lease_s), self.config.max_lease_s)
        now = self._clock()
        conn = self._connectors.get(msg.name)
        if conn is not None and conn.instance != msg.instance:
            raise NameTakenError(f"connector name {msg.name!r} is held by another live instance "
                                 f"(lease ends in {conn.expires_at - now:.2f} s)")
        if conn is None:
            conn = _Connector(msg.name, msg.instance, msg.metadata, lease, now + lease)
            self._connectors[msg.name] = conn
            self._schedule(conn.expires_at, _Due.LEASE, conn.name)
        else:
            conn.metadata, conn.lease_s, conn.expires_at = msg.metadata, lease, now + lease
        return Lease(lease)

    def _heartbeat(self, msg: Heartbeat) -> Lease:
        conn = self._connectors.get(msg.name)
        if conn is None or conn.instance != msg.instance:
            raise UnknownConnectorError(f"connector {msg.name!r} holds no lease (expired, or the registry restarted)")
        conn.expires_at = self._clock() + conn.lease_s
        return Lease(conn.lease_s)

    def _unregister(self, msg: Unregister) -> Ack:
        conn = self._connectors.get(msg.name)
        if conn is not None and conn.instance == msg.instance:
            self._drop_connector(conn, f"connector {msg.name!r} unregistered")
        return Ack()

    def _publish(self, msg: Publish) -> Ack:
        _check_name(msg.request_id, "request id")
        ttl = self._check_ttl(msg.ttl_s)
        if not 1 <= msg.consumers <= MAX_CONSUMERS:
            raise InvalidRequestError(f"consumers={msg.consumers}; expected 1..{MAX_CONSUMERS}")
        producer = self._live(msg.producer)
        if msg.request_id in self._requests:
            raise DuplicateRequestError(f"request {msg.request_id!r} is already in the registry")
        self._tombs.pop(msg.request_id, None)
        req = _Request(msg.request_id, Mode.PULL, RequestState.PUBLISHED, producer.name, None, msg.blocks, ttl,
                       self._clock() + ttl, msg.consumers)
        self._add(req)
        for wait in self._take_waiters(_WaitKind.PULL, req.request_id):
            if (req.state is RequestState.PUBLISHED and wait.party in self._connectors
                    and wait.party not in req.claimants):
                self._resolve(wait, self._claim(req, wait.party))
            else:
                self._resolve(wait, _already(req, wait.party))
        return Ack()

    def _pull(self, msg: Pull, wait_id: int | None) -> Claim | None:
        consumer = self._live(msg.consumer)
        req = self._requests.get(msg.request_id)
        if req is None:
            _check_name(msg.request_id, "request id")
            self._check_tomb(msg.request_id)
            return self._wait(_WaitKind.PULL, msg.request_id, consumer.name, msg.timeout_s, wait_id,
                              f"request {msg.request_id!r} is not published")
        if req.mode is not Mode.PULL:
            raise NotAPartyError(f"request {msg.request_id!r} is in push mode; it cannot be pulled")
        if req.state is not RequestState.PUBLISHED or consumer.name in req.claimants:
            raise _exc(_already(req, consumer.name))
        return self._claim(req, consumer.name)

    def _expect(self, msg: Expect) -> Ack:
        _check_name(msg.request_id, "request id")
        ttl = self._check_ttl(msg.ttl_s)
        consumer = self._live(msg.consumer)
        if msg.request_id in self._requests:
            raise DuplicateRequestError(f"request {msg.request_id!r} is already in the registry")
        self._tombs.pop(msg.request_id, None)
        req = _Request(msg.request_id, Mode.PUSH, RequestState.EXPECTED, None, consumer.name, msg.dst_blocks, ttl,
                       self._clock() + ttl)
        self._add(req)
        for wait in self._take_waiters(_WaitKind.AWAIT_EXPECT, req.request_id):
            if req.state is RequestState.EXPECTED and wait.party in self._connectors:
                self._resolve(wait, self._take(req, wait.party))
            else:
                self._resolve(wait, _already(req))
        return Ack()

    def _await_expect(self, msg: AwaitExpect, wait_id: int | None) -> Expectation | None:
        producer = self._live(msg.producer)
        req = self._requests.get(msg.request_id)
        if req is None:
            _check_name(msg.request_id, "request id")
            self._check_tomb(msg.request_id)
            return self._wait(_WaitKind.AWAIT_EXPECT, msg.request_id, producer.name, msg.timeout_s, wait_id,
                              f"request {msg.request_id!r} is not expected by any consumer")
        if req.mode is not Mode.PUSH:
            raise NotAPartyError(f"request {msg.request_id!r} is in pull mode; nobody expects a push")
        if req.state is not RequestState.EXPECTED:
            raise _exc(_already(req))
        return self._take(req, producer.name)

    def _complete(self, msg: Complete) -> Ack:
        req = self._request(msg.request_id)
        role = _role_of(req, msg.party)
        if not msg.ok:
            self._finish(req, EventKind.FAILED, f"{role.value} {msg.party!r} failed request {req.request_id!r}: "
                         f"{msg.reason or 'no reason given'}")
            return Ack()
        if role is Role.CONSUMER and req.mode is Mode.PULL:
            done = sum(req.claimants.values()) + 1
            if done >= req.need:  # the last one: told with the producer, as every party still in it
                self._finish(req, EventKind.CONSUMED, f"consumer {msg.party!r} has request {req.request_id!r}"
                             + (f" (the last of {req.need} consumers)" if req.need > 1 else ""))
            else:  # its part is done: it leaves the request (its loss no longer fails it)
                req.claimants[msg.party] = True
                conn = self._connectors.get(msg.party)
                if conn is not None:
                    conn.requests.discard(req.request_id)
                self._out.append(Notice(msg.party, RequestEvent(
                    req.request_id, EventKind.CONSUMED, Role.CONSUMER,
                    f"consumer {msg.party!r} has request {req.request_id!r} ({done} of {req.need} consumers)")))
        elif role is Role.CONSUMER and req.state in (RequestState.PUSHING, RequestState.DELIVERED):
            self._finish(req, EventKind.CONSUMED, f"consumer {msg.party!r} has request {req.request_id!r}")
        elif role is Role.PRODUCER and req.state is RequestState.PUSHING:
            req.state = RequestState.DELIVERED
            req.expires_at = max(req.expires_at, self._clock() + req.ttl_s)
            assert req.consumer is not None
            self._out.append(Notice(req.consumer, RequestEvent(req.request_id, EventKind.DELIVERED, Role.CONSUMER,
                                                               f"producer {msg.party!r} wrote every layer")))
        else:
            raise NotAPartyError(f"{role.value} {msg.party!r} cannot complete request {req.request_id!r} "
                                 f"({req.mode.value} mode, {req.state.value})")
        return Ack()

    def _cancel(self, msg: Cancel) -> Ack:
        req = self._request(msg.request_id)
        role = _role_of(req, msg.party)
        self._finish(req, EventKind.CANCELLED, f"{role.value} {msg.party!r} cancelled request "
                     f"{req.request_id!r}: {msg.reason or 'no reason given'}")
        return Ack()

    # -- helpers ------------------------------------------------------------------------
    def _schedule(self, when: float, due: _Due, key: object) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), due, key))

    def _live(self, name: str) -> _Connector:
        conn = self._connectors.get(name)
        if conn is None:
            raise UnknownConnectorError(f"connector {name!r} is not registered (or its lease expired)")
        return conn

    def _request(self, request_id: str) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise UnknownRequestError(f"request {request_id!r} is not in the registry "
                                      "(never published, finished, expired or cancelled)")
        return req

    def _check_ttl(self, ttl: float) -> float:
        if not 0 < ttl <= self.config.max_ttl_s:
            raise InvalidRequestError(f"ttl {ttl} s is outside (0, {self.config.max_ttl_s:g}]")
        return ttl

    def _add(self, req: _Request) -> None:
        self._requests[req.request_id] = req
        for name in (req.producer, req.consumer):
            if name is not None:
                self._connectors[name].requests.add(req.request_id)
        self._schedule(req.expires_at, _Due.TTL, req.request_id)

    def _claim(self, req: _Request, consumer: str) -> Claim:
        req.claimants[consumer] = False
        if req.consumer is None:
            req.consumer = consumer
        if len(req.claimants) >= req.need:
            req.state = RequestState.CLAIMED
        req.expires_at = max(req.expires_at, self._clock() + req.ttl_s)
        self._connectors[consumer].requests.add(req.request_id)
        assert req.producer is not None
        return Claim(req.request_id, req.producer, req.blocks, self._connectors[req.producer].metadata)

    def _take(self, req: _Request, producer: str) -> Expectation:
        req.state, req.producer = RequestState.PUSHING, producer
        req.expires_at = max(req.expires_at, self._clock() + req.ttl_s)
        self._connectors[producer].requests.add(req.request_id)
        assert req.consumer is not None
        return Expectation(req.request_id, req.consumer, req.blocks, self._connectors[req.consumer].metadata)

    def _wait(self, kind: _WaitKind, request_id: str, party: str, timeout: float, wait_id: int | None,
              absent: str) -> None:
        if wait_id is None or timeout <= 0:
            raise UnknownRequestError(absent)
        if wait_id in self._waits:
            raise InvalidRequestError(f"wait id {wait_id} is already in use")
        timeout = min(timeout, self.config.max_wait_s)
        wait = _Wait(wait_id, kind, request_id, party, self._clock() + timeout)
        self._waits[wait_id] = wait
        self._waiters.setdefault((kind, request_id), []).append(wait_id)
        self._schedule(wait.deadline, _Due.WAIT, wait_id)
        return None

    def _take_waiters(self, kind: _WaitKind, request_id: str) -> list[_Wait]:
        ids = self._waiters.pop((kind, request_id), [])
        return [w for w in (self._waits.get(i) for i in ids) if w is not None]

    def _unlist(self, wait: _Wait) -> None:
        ids = self._waiters.get((wait.kind, wait.request_id))
        if ids is not None and wait.wait_id in ids:
            ids.remove(wait.wait_id)
            if not ids:
                del self._waiters[(wait.kind, wait.request_id)]

    def _resolve(self, wait: _Wait, result: RegResult) -> None:
        if self._waits.pop(wait.wait_id, None) is None:
            return
        self._unlist(wait)
        self._out.append(WaitResolved(wait.wait_id, result))

    def _check_tomb(self, request_id: str) -> None:
        tomb = self._tombs.get(request_id)
        if tomb is not None:
            raise _exc(tomb)

    def _finish(self, req: _Request, kind: EventKind, reason: str) -> None:
        self._requests.pop(req.request_id, None)
        if self.config.tombstone_s > 0:
            code = ErrorCode.ALREADY_CLAIMED if kind is EventKind.CONSUMED else ErrorCode.REQUEST_FAILED
            self._tombs[req.request_id] = Failure(code, f"request {req.request_id!r} already ended "
                                                  f"({kind.value}): {reason}")
            self._schedule(self._clock() + self.config.tombstone_s, _Due.TOMB, req.request_id)
        parties = [(Role.PRODUCER, req.producer)] + [(Role.CONSUMER, name) for name in req.unconfirmed()]
        for role, name in parties:
            if name is None:
                continue
            conn = self._connectors.get(name)
            if conn is not None:
                conn.requests.discard(req.request_id)
            self._out.append(Notice(name, RequestEvent(req.request_id, kind, role, reason)))

    def _drop_connector(self, conn: _Connector, reason: str) -> None:
        del self._connectors[conn.name]
        for rid in sorted(conn.requests):
            req = self._requests.get(rid)
            if req is not None:
                self._finish(req, EventKind.FAILED, reason)
        for wait in [w for w in self._waits.values() if w.party == conn.name]:
            self._resolve(wait, Failure(ErrorCode.UNKNOWN_CONNECTOR, reason))


def _check_name(value: str, what: str) -> None:
    if not value:
        raise InvalidRequestError(f"{what} must not be empty")


def _role_of(req: _Request, party: str) -> Role:
    if party == req.producer:
        return Role.PRODUCER
    if req.mode is Mode.PULL:
        confirmed = req.claimants.get(party)
        if confirmed is False:
            return Role.CONSUMER
        if confirmed:
            raise NotAPartyError(f"consumer {party!r} already confirmed request {req.request_id!r} "
                                 f"({sum(req.claimants.values())} of {req.need} consumers); it is no longer a party")
    elif party == req.consumer:
        return Role.CONSUMER
    raise NotAPartyError(f"{party!r} is not a party of request {req.request_id!r}")


def _already(req: _Request, puller: str | None = None) -> Failure:
    if req.mode is Mode.PULL and puller is not None and puller in req.claimants:
        return Failure(ErrorCode.ALREADY_CLAIMED, f"request {req.request_id!r} was already claimed by {puller!r} "
                       f"itself (each consumer claims a publication once)")
    if req.mode is Mode.PULL and req.need > 1:
        return Failure(ErrorCode.ALREADY_CLAIMED, f"request {req.request_id!r} was already taken by its "
                       f"{req.need} consumers {list(req.claimants)} ({req.mode.value} mode, {req.state.value})")
    who = req.consumer if req.mode is Mode.PULL else req.producer
    return Failure(ErrorCode.ALREADY_CLAIMED, f"request {req.request_id!r} was already taken by {who!r} "
                   f"({req.mode.value} mode, {req.state.value})")


def _exc(failure: Failure) -> RegistryError:
    return error_from_code(failure.code, failure.message)
