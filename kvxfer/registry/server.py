"""The embedded registry server: :class:`RegistryCore` behind msgpack frames over TCP (asyncio).

Layer: registry I/O shell. Binds loopback unless told otherwise; port 0 picks a free port.
Use :class:`AsyncRegistryServer` inside a running event loop, or :class:`RegistryServer` to run
one in a background thread with its own loop (tests, single-host deployments, the CLI).

A connection must open with a ``hello`` carrying the shared token when the server has one.
Malformed, oversized or unexpected frames drop that connection with a logged reason; the
server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import RegistryError, RemoteProtocolError
from ..protocol.frames import MAX_HEADER_BYTES
from .core import CoreConfig, Notice, RegistryCore, WaitResolved
from .errors import ErrorCode
from .messages import (Ack, AwaitExpect, Failure, FrameDecoder, Hello, Pull, Register, decode_request,
                       encode_event, encode_reply)

__all__ = ["ServerConfig", "AsyncRegistryServer", "RegistryServer"]

log = logging.getLogger(__name__)

_UNDELIVERED_PER_NAME = 4096


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the embedded registry listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    max_header_bytes: int = MAX_HEADER_BYTES
    max_write_buffer: int = 16 << 20   # a client that stops reading is dropped past this
    hello_timeout_s: float = 5.0
    core: CoreConfig = field(default_factory=CoreConfig)


class _Conn(asyncio.Protocol):
    """One client connection: bytes in through the sans-I/O decoder, replies out in batches."""

    def __init__(self, server: AsyncRegistryServer):
        self.server = server
        self.decoder = FrameDecoder(server.config.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.names: set[str] = set()
        self.waits: set[int] = set()
        self.outbox: list[bytes] = []
        self.closed = False
        self.greeted = False
        self.hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.server._conns.add(self)
        self.hello_timer = asyncio.get_running_loop().call_later(self.server.config.hello_timeout_s, self._no_hello)

    def _no_hello(self) -> None:
        if not self.greeted and not self.closed:
            log.warning("kvxfer registry: dropping %s: no hello within %.1f s", self.peer,
                        self.server.config.hello_timeout_s)
            self.server._abort(self, "no hello")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.decoder.feed(data)
        server = self.server
        try:
            for frame in self.decoder.frames():
                seq, msg = decode_request(frame)
                if not self.greeted:
                    if not self._greet(seq, msg):
                        return
                    continue
                server._on_request(self, seq, msg)
        except RemoteProtocolError as exc:
            log.warning("kvxfer registry: dropping connection from %s: %s", self.peer, exc)
            server._abort(self, f"protocol error: {exc}", hard=True)
        server._schedule_flush()

    def _greet(self, seq: int, msg: object) -> bool:
        if not isinstance(msg, Hello):
            raise RemoteProtocolError(f"first registry request must be hello, got {type(msg).__name__}")
        if not self.server._token_ok(msg.token):
            log.warning("kvxfer registry: refused %s (%s): wrong or missing token", self.peer, msg.client)
            assert self.transport is not None
            self.transport.write(encode_reply(seq, Failure(ErrorCode.AUTH, "registry refused the token "
                                                           "(missing or wrong shared token)")))
            self.server._abort(self, "token refused")  # close() sends what is buffered first
            return False
        self.greeted = True
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        self.server._send(self, encode_reply(seq, Ack()))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._abort(self, f"connection lost: {exc}" if exc else "connection closed by the client")


class AsyncRegistryServer:
    """The registry server on the current event loop.

    ``await start()`` binds (raises OSError when it cannot); ``await close()`` stops it.
    """

    def __init__(self, config: ServerConfig = ServerConfig()):
        self.config = config
        self.core = RegistryCore(config.core, clock=time.monotonic)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._by_name: dict[str, _Conn] = {}
        self._wait_owner: dict[int, tuple[_Conn, int]] = {}
        self._wait_ids = itertools.count(1)
        self._undelivered: dict[str, deque[bytes]] = {}
        self._dirty: set[_Conn] = set()
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None, "server not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"kvxfer://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), self.config.host, self.config.port)
        log.info("kvxfer registry listening on %s", self.url)

    async def close(self) -> None:
        """Stop accepting and drop every connection (idempotent)."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            self._abort(conn, "server closing", hard=True)
        await self._server.wait_closed()
        if self._timer is not None:
            self._timer.cancel()
        self._server = None

    async def __aenter__(self) -> AsyncRegistryServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _token_ok(self, token: str | None) -> bool:
        expected = self.config.token
        if expected is None:
            return True
        return token is not None and hmac.compare_digest(token.encode(), expected.encode())

    def _abort(self, conn: _Conn, reason: str, hard: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        self._dirty.discard(conn)
        if conn.hello_timer is not None:
            conn.hello_timer.cancel()
        self.core.forget_waits(list(conn.waits))
        for wid in conn.waits:
            self._wait_owner.pop(wid, None)
        for name in conn.names:
            if self._by_name.get(name) is conn:
                del self._by_name[name]
        log.debug("kvxfer registry: connection %s closed: %s", conn.peer, reason)
        if conn.transport is not None:
            conn.transport.abort() if hard else conn.transport.close()

    # -- requests -----------------------------------------------------------------------
    def _on_request(self, conn: _Conn, seq: int, msg: object) -> None:
        if isinstance(msg, Hello):
            raise RemoteProtocolError("hello sent twice on one connection")
        wait_id = None
        if isinstance(msg, (Pull, AwaitExpect)):
            wait_id = next(self._wait_ids)
        result = self.core.handle(msg, wait_id)  # type: ignore[arg-type]
        if result is None:
            assert wait_id is not None
            self._wait_owner[wait_id] = (conn, seq)
            conn.waits.add(wait_id)
            self._arm_timer()
            return
        if isinstance(msg, Register) and not isinstance(result, Failure):
            self._bind(conn, msg.name)
        self._send(conn, encode_reply(seq, result))

    def _bind(self, conn: _Conn, name: str) -> None:
        old = self._by_name.get(name)
        if old is not None and old is not conn:
            old.names.discard(name)
        self._by_name[name] = conn
        conn.names.add(name)
        for data in self._undelivered.pop(name, ()):
            self._send(conn, data)
        self._arm_timer()

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.closed:
            return
        conn.outbox.append(data)
        self._dirty.add(conn)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for out in self.core.drain():
            if isinstance(out, WaitResolved):
                owner = self._wait_owner.pop(out.wait_id, None)
                if owner is not None:
                    conn, seq = owner
                    conn.waits.discard(out.wait_id)
                    self._send(conn, encode_reply(seq, out.result))
            elif isinstance(out, Notice):
                data = encode_event(out.event)
                conn = self._by_name.get(out.to)
                if conn is not None:
                    self._send(conn, data)
                else:  # kept for a connector that reconnects while its lease lives
                    self._undelivered.setdefault(out.to, deque(maxlen=_UNDELIVERED_PER_NAME)).append(data)
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            if conn.closed or not conn.outbox:
                continue
            data = b"".join(conn.outbox) if len(conn.outbox) > 1 else conn.outbox[0]
            conn.outbox.clear()
            assert conn.transport is not None
            conn.transport.write(data)
            if conn.transport.get_write_buffer_size() > self.config.max_write_buffer:
                log.warning("kvxfer registry: dropping %s: it stopped reading (%d B unsent)", conn.peer,
                            conn.transport.get_write_buffer_size())
                self._abort(conn, "slow reader", hard=True)
        self._arm_timer()

    # -- time ---------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        due = self.core.next_deadline()
        if due is None or due >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        delay = max(0.0, due - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self.core.tick()
        self._drop_stale_undelivered()
        self._flush()

    def _drop_stale_undelivered(self) -> None:
        live = set(self.core.connectors())
        for name in [n for n in self._undelivered if n not in live]:
            del self._undelivered[name]


class RegistryServer:
    """An :class:`AsyncRegistryServer` in a background thread with its own event loop.

    ``start()`` returns once bound (raises OSError when it cannot bind); ``close()`` stops it
    and joins the thread (idempotent). Also a context manager.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 config: ServerConfig | None = None):
        self.config = config if config is not None else ServerConfig(host=host, port=port, token=token)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: AsyncRegistryServer | None = None
        self._stop: asyncio.Event | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.port

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        return self._server.url

    def start(self, timeout: float = 10.0) -> RegistryServer:
        """Start the thread and bind. Raises OSError (cannot bind) or RegistryError (no start)."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="kvxfer-registry", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RegistryError(f"registry server did not start within {timeout} s")
        if failure:
            self._thread.join(timeout)
            self._thread = None
            raise failure[0]
        return self

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = AsyncRegistryServer(self.config)
            self._stop = asyncio.Event()
            try:
                loop.run_until_complete(self._server.start())
            except BaseException as exc:  # handed to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_until_complete(self._stop.wait())
            loop.run_until_complete(self._server.close())
        finally:
            loop.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop already closed
                pass
        thread.join(timeout)

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
