"""Registry clients: asyncio and blocking, for ``kvxfer://`` (embedded server) or ``redis://``.

Layer: registry. :func:`connect_registry` (blocking) and :func:`connect_registry_async` pick the
implementation by URL scheme; the operations and their errors are the same for both.

The kvxfer:// client keeps one TCP connection, multiplexes requests by id, renews its lease in
the background, and when the connection drops (registry restarted, network) fails every pending
call with :class:`RegistryUnavailableError`, reconnects with backoff and re-registers its
directory entry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ..errors import RegistryError, RemoteProtocolError
from .base import (DEFAULT_LEASE_S, AsyncRegistry, LinkState, RegistryURL, Scheme, new_instance_id,
                   parse_registry_url)
from .errors import (RegistryAuthError, RegistryTimeoutError, RegistryUnavailableError, UnknownConnectorError,
                     error_from_code)
from .messages import (AwaitExpect, Cancel, Claim, Complete, Expect, Expectation, Failure, FrameDecoder,
                       Heartbeat, Hello, Lease, Lookup, Publish, Pull, Query, Register, RegRequest, RegResult,
                       RequestEvent, RequestInfo, Unregister, decode_event, decode_reply, encode_request,
                       ConnectorInfo)
from ..protocol.frames import FrameType

__all__ = ["AsyncServerClient", "RegistryClient", "connect_registry", "connect_registry_async"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_CALL_TIMEOUT_S = 10.0
_WAIT_MARGIN_S = 5.0
_SWEEP_S = 0.25
_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)


def _default_name() -> str:
    return f"kvxfer-{os.getpid()}-{new_instance_id()[:8]}"


class AsyncServerClient(AsyncRegistry):
    """Client of the embedded registry server (asyncio). Create with :meth:`connect`."""

    def __init__(self, url: RegistryURL, name: str, token: str | None, call_timeout_s: float = _CALL_TIMEOUT_S):
        super().__init__(name)
        self.url = url
        self._token = token
        self._instance = new_instance_id()
        self._call_timeout = call_timeout_s
        self._seq = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[RegResult], float, str]] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._proto: _ClientProtocol | None = None
        self._bg: set[asyncio.Task] = set()
        self._registration: tuple[bytes, float] | None = None
        self._lease_s = DEFAULT_LEASE_S
        self._heartbeat_task: asyncio.Task | None = None
        self._reconnect_task: asyncio.Task | None = None
        self._closed = False
        self._ready = False  # reconnect only a client whose first hello was accepted

    @classmethod
    async def connect(cls, url: str | RegistryURL, *, name: str | None = None, token: str | None = None,
                      call_timeout_s: float = _CALL_TIMEOUT_S) -> AsyncServerClient:
        """Connect and say hello.

        Raises:
            RegistryAuthError: the server refused the token.
            RegistryUnavailableError: the server cannot be reached.
        """
        parsed = parse_registry_url(url) if isinstance(url, str) else url
        self = cls(parsed, name or _default_name(), token, call_timeout_s)
        await self._open()
        self._ready = True
        return self

    # -- link ---------------------------------------------------------------------------
    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientProtocol(self), self.url.host, self.url.port),
                timeout=self._call_timeout)
        except (OSError, TimeoutError) as exc:
            raise RegistryUnavailableError(f"registry {self.url} unreachable: {exc}") from None
        self._proto = proto
        try:
            await self._call(Hello(self._token, self.name))
        except RegistryAuthError:
            self._drop_link(proto, "token refused")
            raise

    def _on_frames(self, proto: _ClientProtocol, data: bytes) -> None:
        proto.decoder.feed(data)
        try:
            for frame in proto.decoder.frames():
                if frame.type is FrameType.REG_REPLY:
                    seq, result = decode_reply(frame)
                    entry = self._pending.pop(seq, None)
                    if entry is not None and not entry[0].done():
                        entry[0].set_result(result)
                elif frame.type is FrameType.REG_EVENT:
                    self._emit_event(decode_event(frame))
                else:
                    raise RemoteProtocolError(f"registry sent an unexpected {frame.type.name} frame")
        except RemoteProtocolError as exc:
            log.warning("kvxfer registry client %s: protocol error from the registry: %s", self.name, exc)
            self._drop_link(proto, f"protocol error from the registry: {exc}")

    def _drop_link(self, proto: _ClientProtocol | None, reason: str) -> None:
        if proto is None or proto is not self._proto:
            return
        self._proto = None
        proto.close()
        pending, self._pending = self._pending, {}
        for fut, _, _ in pending.values():
            if not fut.done():
                fut.set_exception(RegistryUnavailableError(f"connection to registry {self.url} lost ({reason})"))
        if self._closed or not self._ready:
            return
        self._emit_link(LinkState.LOST)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        for attempt in itertools.count():
            if self._closed:
                return
            await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
            try:
                await self._open()
                if self._registration is not None:
                    await self._register_now()
            except RegistryAuthError:
                log.error("kvxfer registry client %s: token refused on reconnect; giving up", self.name)
                return
            except RegistryError as exc:
                log.debug("kvxfer registry client %s: reconnect attempt %d failed: %s", self.name, attempt, exc)
                if self._proto is not None:  # connected, but re-registering failed: try again
                    proto, self._proto = self._proto, None
                    proto.close()
                continue
            log.info("kvxfer registry client %s: reconnected to %s", self.name, self.url)
            self._emit_link(LinkState.RECONNECTED)
            return

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    def _sweep_deadlines(self) -> None:
        # One coarse timer for every pending call instead of one timer per call: calls are
        # many and short, their limits are seconds, so a quarter-second of slack is fine.
        self._sweep_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for seq in [s for s, (_, deadline, _) in self._pending.items() if deadline <= now]:
            fut, _, what = self._pending.pop(seq)
            if not fut.done():
                fut.set_exception(RegistryTimeoutError(f"registry {self.url} did not answer {what} in time"))
        if self._pending:
            self._sweep_handle = loop.call_later(_SWEEP_S, self._sweep_deadlines)

    async def _call(self, msg: RegRequest, timeout: float | None = None) -> RegResult:
        if self._closed:
            raise RegistryUnavailableError("registry client is closed")
        proto = self._proto
        if proto is None:
            raise RegistryUnavailableError(f"not connected to registry {self.url} (reconnecting)")
        loop = asyncio.get_running_loop()
        seq = next(self._seq)
        fut: asyncio.Future[RegResult] = loop.create_future()
        limit = self._call_timeout if timeout is None else timeout
        self._pending[seq] = (fut, loop.time() + limit, f"{type(msg).__name__} within {limit:g} s")
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(_SWEEP_S, self._sweep_deadlines)
        proto.send(encode_request(seq, msg))
        result = await fut
        if isinstance(result, Failure):
            raise error_from_code(result.code, result.message)
        return result

    # -- directory ----------------------------------------------------------------------
    async def register(self, metadata: bytes, lease_s: float = DEFAULT_LEASE_S) -> float:
        self._registration = (bytes(metadata), lease_s)
        await self._register_now()
        if self._heartbeat_task is None:
            self._heartbeat_task = self._spawn(self._heartbeat_loop())
        return self._lease_s

    async def _register_now(self) -> None:
        assert self._registration is not None
        metadata, lease_s = self._registration
        result = await self._call(Register(self.name, self._instance, metadata, lease_s))
        assert isinstance(result, Lease)
        self._lease_s = result.lease_s

    async def _heartbeat_loop(self) -> None:
        while not self._closed and self._registration is not None:
            await asyncio.sleep(self._lease_s / 3)
            if self._proto is None:
                continue
            try:
                await self._call(Heartbeat(self.name, self._instance), timeout=self._lease_s)
            except UnknownConnectorError:
                log.warning("kvxfer registry client %s: lease lost; registering again", self.name)
                try:
                    await self._register_now()
                except RegistryError as exc:
                    log.warning("kvxfer registry client %s: re-register failed: %s", self.name, exc)
            except RegistryError as exc:
                log.debug("kvxfer registry client %s: heartbeat failed: %s", self.name, exc)

    async def unregister(self) -> None:
        self._registration = None
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        await self._call(Unregister(self.name, self._instance))

    async def lookup(self, name: str) -> bytes:
        result = await self._call(Lookup(name))
        assert isinstance(result, ConnectorInfo)
        return result.metadata

    # -- requests -----------------------------------------------------------------------
    async def publish(self, request_id: str, blocks: Sequence[int], ttl_s: float, consumers: int = 1) -> None:
        await self._call(Publish(request_id, self.name, _ints(blocks), float(ttl_s), int(consumers)))

    async def pull(self, request_id: str, timeout_s: float) -> Claim:
        result = await self._call(Pull(request_id, self.name, float(timeout_s)), timeout=timeout_s + _WAIT_MARGIN_S)
        assert isinstance(result, Claim)
        return result

    async def expect(self, request_id: str, dst_blocks: Sequence[int], ttl_s: float) -> None:
        await self._call(Expect(request_id, self.name, _ints(dst_blocks), float(ttl_s)))

    async def await_expect(self, request_id: str, timeout_s: float) -> Expectation:
        result = await self._call(AwaitExpect(request_id, self.name, float(timeout_s)),
                                  timeout=timeout_s + _WAIT_MARGIN_S)
        assert isinstance(result, Expectation)
        return result

    async def complete(self, request_id: str, ok: bool = True, reason: str = "") -> None:
        await self._call(Complete(request_id, self.name, bool(ok), reason))

    async def cancel(self, request_id: str, reason: str = "") -> None:
        await self._call(Cancel(request_id, self.name, reason))

    async def query(self, request_id: str) -> RequestInfo:
        result = await self._call(Query(request_id))
        assert isinstance(result, RequestInfo)
        return result

    async def close(self) -> None:
        if self._closed:
            return
        if self._registration is not None and self._proto is not None:
            try:
                await self.unregister()
            except RegistryError:
                pass
        self._closed = True
        for task in list(self._bg):
            task.cancel()
        self._drop_link(self._proto, "client closing")
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        await asyncio.gather(*self._bg, return_exceptions=True)


class _ClientProtocol(asyncio.Protocol):
    """The client's socket: hands bytes to the client, coalesces writes made in one loop turn."""

    def __init__(self, client: AsyncServerClient):
        self.client = client
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.outbox: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._on_frames(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._drop_link(self, f"{type(exc).__name__}: {exc}" if exc else "registry closed the connection")

    def send(self, data: bytes) -> None:
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outbox.append(data)

    def _flush(self) -> None:
        if self.transport is not None and not self.closed and self.outbox:
            self.transport.write(b"".join(self.outbox))
        self.outbox.clear()

    def close(self) -> None:
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _ints(blocks: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(b) for b in blocks)


async def connect_registry_async(url: str, *, token: str | None = None, name: str | None = None) -> AsyncRegistry:
    """An asyncio registry client for ``kvxfer://host:port`` or ``redis://host:port/db``.

    Raises:
        ConfigError: bad URL. RegistryAuthError: token refused. RegistryUnavailableError:
        unreachable. BackendUnavailableError: redis:// without the ``redis`` package.
    """
    parsed = parse_registry_url(url)
    if parsed.scheme is Scheme.KVXFER:
        return await AsyncServerClient.connect(parsed, name=name, token=token)
    from .redis_store import AsyncRedisRegistry
    return await AsyncRedisRegistry.connect(parsed, name=name or _default_name(), token=token)


class RegistryClient:
    """Blocking registry client: an :class:`AsyncRegistry` driven on a private loop thread.

    Same operations and errors as the async client; each call takes an optional ``timeout``
    bound on top of the operation's own. ``close()`` is idempotent; also a context manager.
    """

    def __init__(self, url: str, *, token: str | None = None, name: str | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvxfer-registry-client", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._impl: AsyncRegistry = self._run(connect_registry_async(url, token=token, name=name), _CALL_TIMEOUT_S * 2)
        except BaseException:
            self._stop_loop()
            raise
        self.name = self._impl.name

    @property
    def impl(self) -> AsyncRegistry:
        return self._impl

    def _run(self, coro: Awaitable[T], timeout: float) -> T:
        if self._closed:
            raise RegistryUnavailableError("registry client is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise RegistryTimeoutError(f"registry call did not finish within {timeout:g} s") from None

    def add_event_listener(self, fn: Callable[[RequestEvent], None]) -> None:
        """``fn(event)`` runs on the client's loop thread; keep it short and thread-safe."""
        self._impl.add_event_listener(fn)

    def add_link_listener(self, fn: Callable[[LinkState], None]) -> None:
        self._impl.add_link_listener(fn)

    def register(self, metadata: bytes, lease_s: float = DEFAULT_LEASE_S) -> float:
        return self._run(self._impl.register(metadata, lease_s), _CALL_TIMEOUT_S + 1)

    def unregister(self) -> None:
        self._run(self._impl.unregister(), _CALL_TIMEOUT_S + 1)

    def lookup(self, name: str) -> bytes:
        return self._run(self._impl.lookup(name), _CALL_TIMEOUT_S + 1)

    def publish(self, request_id: str, blocks: Sequence[int], ttl_s: float, consumers: int = 1) -> None:
        self._run(self._impl.publish(request_id, blocks, ttl_s, consumers), _CALL_TIMEOUT_S + 1)

    def pull(self, request_id: str, timeout_s: float) -> Claim:
        return self._run(self._impl.pull(request_id, timeout_s), timeout_s + _WAIT_MARGIN_S + 1)

    def expect(self, request_id: str, dst_blocks: Sequence[int], ttl_s: float) -> None:
        self._run(self._impl.expect(request_id, dst_blocks, ttl_s), _CALL_TIMEOUT_S + 1)

    def await_expect(self, request_id: str, timeout_s: float) -> Expectation:
        return self._run(self._impl.await_expect(request_id, timeout_s), timeout_s + _WAIT_MARGIN_S + 1)

    def complete(self, request_id: str, ok: bool = True, reason: str = "") -> None:
        self._run(self._impl.complete(request_id, ok, reason), _CALL_TIMEOUT_S + 1)

    def cancel(self, request_id: str, reason: str = "") -> None:
        self._run(self._impl.cancel(request_id, reason), _CALL_TIMEOUT_S + 1)

    def query(self, request_id: str) -> RequestInfo:
        return self._run(self._impl.query(request_id), _CALL_TIMEOUT_S + 1)

    def submit(self, coro_fn: Callable[[AsyncRegistry], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run ``coro_fn(async_client)`` on the client's loop; a future for its result."""
        return asyncio.run_coroutine_threadsafe(coro_fn(self._impl), self._loop)  # type: ignore[arg-type]

    def close(self) -> None:
        """Unregister (best effort), close the link, stop the loop thread (idempotent)."""
        if self._closed:
            return
        try:
            self._run(self._impl.close(), _CALL_TIMEOUT_S)
        except RegistryError:
            pass
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_registry(url: str, *, token: str | None = None, name: str | None = None) -> RegistryClient:
    """A blocking registry client for ``kvxfer://host:port`` or ``redis://host:port/db``.

    Raises:
        ConfigError: bad URL. RegistryAuthError: token refused. RegistryUnavailableError:
        unreachable.
    """
    return RegistryClient(url, token=token, name=name)
