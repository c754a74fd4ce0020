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
from .messages import (Ack, AwaitExpect, Failure, FrameDecoder, Hello, Pull, Register, RegResult, decode_request,
                       encode_event, encode_reply)

__all__ = ["ServerConfig", "AsyncRegistryServer", "RegistryServer"]

log = logging.getLogger(__name__)

_READ_CHUNK = 1 << 16
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


class _Conn:
    __slots__ = ("writer", "peer", "names", "waits", "outbox", "closed")

    def __init__(self, writer: asyncio.StreamWriter, peer: str):
        self.writer = writer
        self.peer = peer
        self.names: set[str] = set()
        self.waits: set[int] = set()
        self.outbox: list[bytes] = []
        self.closed = False


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
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._tasks: set[asyncio.Task] = set()

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
        self._server = await asyncio.start_server(self._serve, self.config.host, self.config.port,
                                                  limit=_READ_CHUNK)
        log.info("kvxfer registry listening on %s", self.url)

    async def close(self) -> None:
        """Stop accepting and drop every connection (idempotent)."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._conns):
            self._abort(conn, "server closing")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        if self._timer is not None:
            self._timer.cancel()
        self._server = None

    async def __aenter__(self) -> AsyncRegistryServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections --------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        conn = _Conn(writer, f"{peername[0]}:{peername[1]}" if peername else "?")
        self._conns.add(conn)
        decoder = FrameDecoder(self.config.max_header_bytes)
        reason = "connection closed by the client"
        try:
            if not await self._handshake(conn, reader, decoder):
                return
            while not conn.closed:
                data = await reader.read(_READ_CHUNK)
                if not data:
                    break
                decoder.feed(data)
                for frame in decoder.frames():
                    seq, msg = decode_request(frame)
                    self._on_request(conn, seq, msg)
                self._flush()
                if conn.writer.transport.get_write_buffer_size() > self.config.max_write_buffer // 2:
                    await asyncio.wait_for(conn.writer.drain(), timeout=30.0)
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("kvxfer registry: dropping connection from %s: %s", conn.peer, exc)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            reason = "server closing"
        finally:
            self._abort(conn, reason)
            self._tasks.discard(task)

    async def _handshake(self, conn: _Conn, reader: asyncio.StreamReader, decoder: FrameDecoder) -> bool:
        deadline = time.monotonic() + self.config.hello_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("kvxfer registry: dropping %s: no hello within %.1f s", conn.peer, self.config.hello_timeout_s)
                return False
            data = await asyncio.wait_for(reader.read(_READ_CHUNK), timeout=remaining)
            if not data:
                return False
            decoder.feed(data)
            frames = decoder.frames()
            frame = next(frames, None)
            if frame is None:
                continue
            seq, msg = decode_request(frame)
            if not isinstance(msg, Hello):
                raise RemoteProtocolError(f"first registry request must be hello, got {type(msg).__name__}")
            if not self._token_ok(msg.token):
                log.warning("kvxfer registry: refused %s (%s): wrong or missing token", conn.peer, msg.client)
                conn.writer.write(encode_reply(seq, Failure(ErrorCode.AUTH, "registry refused the token "
                                                            "(missing or wrong shared token)")))
                await asyncio.wait_for(conn.writer.drain(), timeout=1.0)
                return False
            conn.outbox.append(encode_reply(seq, Ack()))
            self._dirty.add(conn)
            for frame in frames:  # requests pipelined right behind the hello
                seq, req = decode_request(frame)
                self._on_request(conn, seq, req)
            self._flush()
            return True

    def _token_ok(self, token: str | None) -> bool:
        expected = self.config.token
        if expected is None:
            return True
        return token is not None and hmac.compare_digest(token.encode(), expected.encode())

    def _abort(self, conn: _Conn, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        self._dirty.discard(conn)
        self.core.forget_waits(list(conn.waits))
        for wid in conn.waits:
            self._wait_owner.pop(wid, None)
        for name in conn.names:
            if self._by_name.get(name) is conn:
                del self._by_name[name]
        log.debug("kvxfer registry: connection %s closed: %s", conn.peer, reason)
        conn.writer.transport.abort() if reason.startswith("protocol") else conn.writer.close()

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

    def _flush(self) -> None:
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
            conn.writer.write(data)
            if conn.writer.transport.get_write_buffer_size() > self.config.max_write_buffer:
                log.warning("kvxfer registry: dropping %s: it stopped reading (%d B unsent)", conn.peer,
                            conn.writer.transport.get_write_buffer_size())
                self._abort(conn, "slow reader")
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
