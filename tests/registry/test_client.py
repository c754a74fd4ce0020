"""The client API against both registries (embedded server and real Redis): same behaviour."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

from kvxfer.registry.base import LinkState
from kvxfer.registry.client import connect_registry, connect_registry_async
from kvxfer.registry.errors import (AlreadyClaimedError, DuplicateRequestError, NameTakenError, NotAPartyError,
                                    RegistryAuthError, RegistryTimeoutError, RegistryUnavailableError,
                                    RequestFailedError, UnknownConnectorError, UnknownRequestError)
from kvxfer.registry.messages import Claim, EventKind, Mode, RequestState, Role
from kvxfer.registry.server import RegistryServer

from regutil import RedisProcess, free_port, need_redis


class Party:
    """A registered client plus a queue of the events it receives."""

    def __init__(self, url: str, name: str, lease: float = 1.0, token: str | None = None):
        self.client = connect_registry(url, name=name, token=token)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.client.add_event_listener(self.events.put)
        self.client.register(name.encode() + b"-meta", lease)

    def event(self, timeout: float = 5.0):
        return self.events.get(timeout=timeout)

    def close(self) -> None:
        self.client.close()


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


def test_publish_pull_complete(parties):
    p, c = parties("p"), parties("c")
    p.client.publish("r1", [5, 6, 7], 10)
    assert c.client.lookup("p") == b"p-meta"
    claim = c.client.pull("r1", 2)
    assert claim == Claim("r1", "p", (5, 6, 7), b"p-meta")
    info = p.client.query("r1")
    assert (info.mode, info.state, info.producer, info.consumer) == (Mode.PULL, RequestState.CLAIMED, "p", "c")
    c.client.complete("r1")
    ev = p.event()
    assert (ev.request_id, ev.kind, ev.role) == ("r1", EventKind.CONSUMED, Role.PRODUCER)
    with pytest.raises(UnknownRequestError):
        p.client.query("r1")  # the entry is gone


def test_pull_waits_for_publication_and_exactly_once(parties):
    p, c1, c2 = parties("p"), parties("c1"), parties("c2")
    results: dict[str, object] = {}

    def pull(party: Party) -> None:
        try:
            results[party.client.name] = party.client.pull("r", 5)
        except Exception as exc:  # the test looks at which error
            results[party.client.name] = exc
    threads = [threading.Thread(target=pull, args=(x,)) for x in (c1, c2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    p.client.publish("r", [1], 10)
    for t in threads:
        t.join(10)
    assert time.monotonic() - t0 < 1.0
    kinds = sorted(type(v).__name__ for v in results.values())
    assert kinds == ["AlreadyClaimedError", "Claim"], results


def test_errors_are_the_same_on_both(parties):
    p, c = parties("p"), parties("c")
    p.client.publish("r", [1], 10)
    with pytest.raises(DuplicateRequestError):
        p.client.publish("r", [1], 10)
    with pytest.raises(UnknownRequestError):
        c.client.pull("absent", 0)
    t0 = time.monotonic()
    with pytest.raises(RegistryTimeoutError):
        c.client.pull("absent", 0.3)
    assert 0.25 < time.monotonic() - t0 < 1.5
    with pytest.raises(NotAPartyError):
        c.client.complete("r")
    with pytest.raises(UnknownConnectorError):
        c.client.lookup("nobody")
    c.client.pull("r", 1)
    with pytest.raises(AlreadyClaimedError):
        c.client.pull("r", 1)
    with pytest.raises(NameTakenError):
        other = connect_registry(p.client.impl.url.__str__(), name="p")
        try:
            other.register(b"x", 1.0)
        finally:
            other.close()


def test_push_cycle(parties):
    p, c = parties("p"), parties("c")
    c.client.expect("r", [3, 4], 10)
    exp = p.client.await_expect("r", 2)
    assert (exp.consumer, exp.dst_blocks, exp.metadata) == ("c", (3, 4), b"c-meta")
    with pytest.raises(AlreadyClaimedError):
        parties("p2").client.await_expect("r", 1)
    p.client.complete("r")
    ev = c.event()
    assert (ev.kind, ev.role) == (EventKind.DELIVERED, Role.CONSUMER)
    c.client.complete("r")
    assert p.event().kind is EventKind.CONSUMED


def test_await_expect_waits(parties):
    p, c = parties("p"), parties("c")
    threading.Timer(0.2, lambda: c.client.expect("r", [1], 10)).start()
    assert p.client.await_expect("r", 5).dst_blocks == (1,)


def test_ttl_expiry_and_cancel(parties):
    p, c = parties("p"), parties("c")
    p.client.publish("short", [1], 0.3)
    ev = p.event(3)
    assert (ev.request_id, ev.kind) == ("short", EventKind.EXPIRED)
    with pytest.raises(RequestFailedError, match="expired"):
        c.client.pull("short", 1)
    p.client.publish("r", [1], 10)
    c.client.pull("r", 1)
    c.client.cancel("r", "no room")
    ev = p.event()
    assert ev.kind is EventKind.CANCELLED and "no room" in ev.reason


def test_unregistered_producer_fails_consumer(parties):
    p, c = parties("p", lease=0.5), parties("c")
    p.client.publish("r", [1], 30)
    c.client.pull("r", 1)
    p.client.close()  # a clean close unregisters: the consumer hears at once
    ev = c.event(2)
    assert ev.kind is EventKind.FAILED and "'p'" in ev.reason


def test_crashed_producer_lease_expires(parties):
    p, c = parties("p", lease=0.5), parties("c")
    p.client.publish("r", [1], 30)
    c.client.pull("r", 1)
    for task in list(getattr(p.client.impl, "_bg", ())) + list(getattr(p.client.impl, "_tasks", ())):
        p.client._loop.call_soon_threadsafe(task.cancel)  # heartbeats stop, as if the process hung
    t0 = time.monotonic()
    ev = c.event(3)
    assert ev.kind is EventKind.FAILED and "lease" in ev.reason
    assert time.monotonic() - t0 < 2 * 0.5 + 0.5


def test_async_client(registry_url):
    async def main() -> None:
        p = await connect_registry_async(registry_url, name="ap")
        c = await connect_registry_async(registry_url, name="ac")
        got: asyncio.Queue = asyncio.Queue()
        p.add_event_listener(got.put_nowait)
        await p.register(b"m", 1.0)
        await c.register(b"n", 1.0)
        pull = asyncio.ensure_future(c.pull("r", 2))
        await asyncio.sleep(0.05)
        await p.publish("r", [9], 5)
        claim = await pull
        assert claim.blocks == (9,) and claim.metadata == b"m"
        await c.complete("r")
        ev = await asyncio.wait_for(got.get(), 5)
        assert ev.kind is EventKind.CONSUMED
        await p.close()
        await c.close()
    asyncio.run(main())


def test_embedded_server_token():
    with RegistryServer(token="sesame") as srv:
        with pytest.raises(RegistryAuthError):
            connect_registry(srv.url, name="x")
        with pytest.raises(RegistryAuthError):
            connect_registry(srv.url, name="x", token="wrong")
        ok = Party(srv.url, "x", token="sesame")
        ok.client.publish("r", [1], 5)
        ok.close()


def test_redis_token(tmp_path):
    need_redis()
    rp = RedisProcess(tmp_path, password="sesame")
    rp.start()
    try:
        with pytest.raises(RegistryAuthError):
            connect_registry(rp.url, name="x")
        with pytest.raises(RegistryAuthError):
            connect_registry(rp.url, name="x", token="wrong")
        ok = Party(rp.url, "x", token="sesame")
        ok.client.publish("r", [1], 5)
        ok.close()
    finally:
        rp.stop()


def test_unreachable_registry():
    with pytest.raises(RegistryUnavailableError):
        connect_registry(f"kvxfer://127.0.0.1:{free_port()}", name="x")


@pytest.mark.parametrize("kind", ["kvxfer", "redis"])
def test_registry_restart_clear_error_then_reconnect(kind, tmp_path):
    if kind == "redis":
        need_redis()
        proc = RedisProcess(tmp_path)
        start, stop, url = proc.start, proc.stop, proc.url
    else:
        port = free_port()
        holder: list[RegistryServer] = []
        start = lambda: holder.append(RegistryServer(port=port).start())  # noqa: E731
        stop = lambda: holder.pop().close()  # noqa: E731
        url = f"kvxfer://127.0.0.1:{port}"
    start()
    p = Party(url, "p", lease=0.5)
    links: queue.SimpleQueue = queue.SimpleQueue()
    p.client.add_link_listener(links.put)
    try:
        fut = p.client.submit(lambda impl: impl.pull("never", 30))
        time.sleep(0.2)
        stop()
        if kind == "kvxfer":  # the pending wait fails at once with a clear error
            with pytest.raises(RegistryUnavailableError, match="lost"):
                fut.result(5)
        with pytest.raises(RegistryUnavailableError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                p.client.publish("x", [1], 5)
                time.sleep(0.05)
        start()
        deadline = time.monotonic() + 10
        while True:  # the directory entry comes back by itself (re-registration)
            try:
                assert p.client.lookup("p") == b"p-meta"
                break
            except (UnknownConnectorError, RegistryUnavailableError):
                assert time.monotonic() < deadline, "client did not re-register after the restart"
                time.sleep(0.1)
        p.client.publish("after", [1], 5)
        assert links.get(timeout=5) is LinkState.LOST
        fut.cancel()
    finally:
        p.close()
        stop()
