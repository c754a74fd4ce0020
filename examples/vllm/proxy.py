"""Prefill/decode proxy for vLLM instances joined by kvxfer (see README.md). Python stdlib only.

For each OpenAI ``/v1/completions`` or ``/v1/chat/completions`` request it picks the next
prefill instance and the next decode instance (round robin on each side) and a transfer id,
then:

* pull mode (default): sends the prefill instance a copy with ``max_tokens=1``, ``stream=false``
  and ``kv_transfer_params={"do_remote_decode": true, "kvxfer_id": ID}``; sends the decode
  instance the client's request with the ``kv_transfer_params`` the prefill instance returned,
  and relays the decode instance's answer (streamed SSE included) as it arrives;
* push mode: sends both at once, the decode instance with ``{"do_remote_prefill": true,
  "kvxfer_id": ID}``; the prefill instance writes each layer into the decode instance's blocks.

An upstream's error (status and body) goes back to the client unchanged. An upstream that
refuses the connection is skipped for that request. ``GET /v1/models`` is forwarded to a decode
instance; ``GET /health`` asks every upstream's ``/health`` and answers 200 only if all do.
SIGINT/SIGTERM stop accepting, let requests in flight finish (``--grace`` seconds), then exit.

Run: ``python proxy.py --prefill http://127.0.0.1:8100 [URL ...] --decode
http://127.0.0.1:8200 [URL ...] --port 8000 [--mode push]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("kvxfer.proxy")

__all__ = ["Mode", "Proxy", "ProxyConfig", "Upstream", "main"]

_MAX_HEAD = 64 * 1024
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "content-length", "host",
})
_FORWARDED_REQUEST_HEADERS = ("authorization", "x-request-id", "accept")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}
_GENERATE = ("/v1/completions", "/v1/chat/completions")


class Mode(Enum):
    """Must match ``kv_connector_extra_config.mode`` on both instances."""

    PULL = "pull"
    PUSH = "push"


class HttpError(Exception):
    """A request fails with ``status``; ``body`` is the JSON answer (OpenAI error form)."""

    def __init__(self, status: int, message: str, kind: str = "ProxyError"):
        super().__init__(message)
        self.status = status
        self.body = _error_body(status, message, kind)


def _error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


# -- HTTP/1.1 wire: heads and bodies over asyncio streams -------------------------------------

@dataclass(frozen=True, slots=True)
class Head:
    """A parsed request line or status line with its headers (names lower-cased)."""

    start: tuple[str, str, str]
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return default


def parse_head(raw: bytes) -> Head:
    """Parse ``raw`` (up to and including the blank line).

    Raises:
        ValueError: a malformed start line or header line.
    """
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2:
        raise ValueError(f"malformed start line {lines[0][:80]!r}")
    start = (parts[0], parts[1], parts[2] if len(parts) > 2 else "")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return Head(start, tuple(headers))


async def read_head(reader: asyncio.StreamReader, timeout: float) -> Head | None:
    """The next head on ``reader``; None if the peer closed before sending one.

    Raises:
        ValueError: malformed, or longer than 64 KiB. TimeoutError: nothing within ``timeout``.
    """
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise ValueError("connection closed inside a message head") from None
    except asyncio.LimitOverrunError:
        raise ValueError("message head longer than 64 KiB") from None
    return parse_head(raw)


async def iter_body(reader: asyncio.StreamReader, head: Head, timeout: float, *,
                    until_eof: bool) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive (chunked, Content-Length, or up to EOF if ``until_eof``).

    ``timeout`` bounds each wait for bytes, not the whole body: a stream may last long.

    Raises:
        ValueError: malformed framing. TimeoutError: no bytes within ``timeout``.
        asyncio.IncompleteReadError: the peer closed inside the body.
    """
    if "chunked" in (head.get("transfer-encoding") or "").lower():
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ValueError(f"malformed chunk size line {line[:40]!r}") from None
            if size == 0:
                while (await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)) != b"\r\n":
                    pass  # trailers
                return
            data = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            yield data[:-2]
        return
    length = head.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ValueError(f"bad Content-Length {length!r}")
        left = int(length)
        while left:
            data = await asyncio.wait_for(reader.read(min(left, 1 << 16)), timeout)
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            yield data
        return
    if until_eof:
        while data := await asyncio.wait_for(reader.read(1 << 16), timeout):
            yield data


async def read_body(reader: asyncio.StreamReader, head: Head, timeout: float, limit: int, *,
                    until_eof: bool) -> bytes:
    """The whole body, at most ``limit`` bytes.

    Raises:
        HttpError: 413 when longer than ``limit``; and what :func:`iter_body` raises.
    """
    parts, n = [], 0
    async for piece in iter_body(reader, head, timeout, until_eof=until_eof):
        n += len(piece)
        if n > limit:
            raise HttpError(413, f"body longer than {limit} bytes")
        parts.append(piece)
    return b"".join(parts)


def _start(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- upstreams --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Upstream:
    """One vLLM instance's base URL (``http://host:port``)."""

    url: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """Raises: ValueError: not an ``http://host[:port]`` URL."""
        u = urlsplit(url.rstrip("/"))
        if u.scheme != "http" or not u.hostname or u.path or u.query:
            raise ValueError(f"upstream {url!r}: expected http://host[:port] (no path; https is not supported)")
        return cls(f"http://{u.netloc}", u.hostname, u.port or 80)


class UpstreamDown(Exception):
    """The connection was refused or failed before the request was sent."""


@dataclass(slots=True)
class Exchange:
    """One request sent to an upstream; ``head`` is its answer's status line and headers."""

    upstream: Upstream
    head: Head
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    timeout: float

    @property
    def status(self) -> int:
        return int(self.head.start[1])

    def body(self) -> AsyncIterator[bytes]:
        return iter_body(self.reader, self.head, self.timeout, until_eof=True)

    async def read(self, limit: int) -> bytes:
        return await read_body(self.reader, self.head, self.timeout, limit, until_eof=True)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


async def send(upstream: Upstream, method: str, path: str, body: bytes | None,
               headers: Sequence[tuple[str, str]], *, connect_timeout: float, timeout: float) -> Exchange:
    """Send one request on a new connection and read the answer's head.

    Raises:
        UpstreamDown: connecting failed. TimeoutError: no answer within ``timeout``.
        ValueError: a malformed answer. OSError: the connection broke.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(upstream.host, upstream.port, limit=_MAX_HEAD), connect_timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise UpstreamDown(f"{upstream.url}: {exc or type(exc).__name__}") from None
    try:
        lines = [f"{method} {path} HTTP/1.1", f"host: {upstream.url.removeprefix('http://')}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body is not None:
            lines += ["content-type: application/json", f"content-length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        await asyncio.wait_for(writer.drain(), timeout)
        head = await read_head(reader, timeout)
        if head is None:
            raise ValueError(f"{upstream.url} closed the connection without answering")
        if not head.start[1].isdigit():
            raise ValueError(f"{upstream.url} answered a malformed status line")
        return Exchange(upstream, head, reader, writer, timeout)
    except BaseException:
        writer.close()
        raise


# -- the proxy --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """prefill, decode: the upstreams of each side (round robin). mode: pull or push.
    timeout: seconds an upstream may stay silent (per read, so long streams are fine).
    connect_timeout: seconds to connect to an upstream. idle_timeout: seconds a client's
    keep-alive connection may wait for its next request. max_body: largest request body."""

    prefill: tuple[Upstream, ...]
    decode: tuple[Upstream, ...]
    mode: Mode = Mode.PULL
    timeout: float = 600.0
    connect_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_body: int = 64 << 20

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("at least one prefill and one decode upstream are needed")


def check_single(body: dict[str, Any]) -> None:
    """Refuse what one KV transfer per request cannot serve.

    Raises:
        HttpError: 400 for a batch of prompts or ``n`` > 1 (several sequences would each load,
            or each produce, the same transfer).
    """
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(type(t) is int for t in prompt):
        raise HttpError(400, "a batch of prompts cannot go through the prefill/decode proxy; "
                             "send one prompt per request")
    if body.get("n") not in (None, 1):
        raise HttpError(400, f"n={body['n']!r}: the prefill/decode proxy serves one sequence per request (n=1)")


def prefill_body(body: dict[str, Any], xid: str) -> dict[str, Any]:
    """The prefill instance's copy of a client request: one token, no stream, the handoff asked."""
    pre = dict(body)
    pre.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True, "kvxfer_id": xid})
    if "max_completion_tokens" in pre:
        pre["max_completion_tokens"] = 1
    for key in ("stream_options", "min_tokens"):
        pre.pop(key, None)
    return pre


@dataclass(slots=True)
class _Side:
    name: str
    upstreams: tuple[Upstream, ...]
    turn: itertools.count = field(default_factory=itertools.count)

    def order(self) -> list[Upstream]:
        """All upstreams, starting with the one whose turn it is."""
        i = next(self.turn) % len(self.upstreams)
        return list(self.upstreams[i:] + self.upstreams[:i])


@dataclass(slots=True)
class _Reply:
    """Where one client request's answer goes: keep-alive or not, chunked (HTTP/1.1) or not."""

    writer: asyncio.StreamWriter
    keep: bool
    http11: bool

    async def full(self, status: int, headers: Sequence[tuple[str, str]], body: bytes) -> None:
        hs = [*headers, ("content-length", str(len(body))), ("connection", "keep-alive" if self.keep else "close")]
        self.writer.write(_start(status, hs) + body)
        await self.writer.drain()

    async def error(self, exc: HttpError) -> None:
        if exc.status >= 500:
            log.warning("%d: %s", exc.status, exc)
        await self.full(exc.status, [("content-type", "application/json")], exc.body)

    def begin_stream(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        if self.http11:
            headers = [*headers, ("transfer-encoding", "chunked"), ("connection", "keep-alive" if self.keep else "close")]
        else:
            self.keep = False  # an HTTP/1.0 client reads to the end of the connection
            headers = [*headers, ("connection", "close")]
        self.writer.write(_start(status, headers))

    async def piece(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data) if self.http11 else data)
        await self.writer.drain()

    async def end_stream(self) -> None:
        if self.http11:
            self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


class Proxy:
    """The proxy server: :meth:`start`, then :meth:`shutdown` (or run :func:`serve`)."""

    def __init__(self, config: ProxyConfig):
        self.config = config
        self._prefill = _Side("prefill", config.prefill)
        self._decode = _Side("decode", config.decode)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()  # connections inside a request
        self._closing = False

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: any free port, see :attr:`port`). Raises: OSError."""
        self._server = await asyncio.start_server(self._connection, host, port, limit=_MAX_HEAD)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; wait up to ``grace`` s for requests in flight, then cut the rest."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in self._conns - self._busy:
            task.cancel()  # idle keep-alive connections
        if self._busy:
            await asyncio.wait(set(self._busy), timeout=grace)
        for task in self._conns:
            task.cancel()
        if self._conns:
            await asyncio.wait(set(self._conns), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    # -- a client connection ----------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while not self._closing:
                try:
                    head = await read_head(reader, self.config.idle_timeout)
                except ValueError as exc:
                    await _Reply(writer, keep=False, http11=False).error(HttpError(400, str(exc)))
                    break
                if head is None:
                    break
                self._busy.add(task)
                try:
                    keep = await self._request(head, reader, writer)
                finally:
                    self._busy.discard(task)
                if not keep:
                    break
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled; its upstream connections are closed by now
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _request(self, head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; whether the connection stays open for the next."""
        method, target, version = head.start
        http11 = version == "HTTP/1.1"
        keep = http11 and (head.get("connection") or "").lower() != "close" and not self._closing
        reply = _Reply(writer, keep, http11)
        path = target.split("?", 1)[0]
        try:
            if (head.get("expect") or "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            raw = await read_body(reader, head, self.config.idle_timeout, self.config.max_body, until_eof=False)
        except ValueError as exc:
            await _Reply(writer, keep=False, http11=http11).error(HttpError(400, str(exc)))
            return False
        except HttpError as exc:
            await _Reply(writer, keep=False, http11=http11).error(exc)  # the rest of the body is unread
            return False
        try:
            if path in _GENERATE:
                if method != "POST":
                    raise HttpError(405, f"{path} takes POST")
                await self._generate(path, raw, head, reply)
            elif path == "/v1/models" and method == "GET":
                await self._relay(await self._send(self._decode, "GET", path, None, self._headers(head, None)), reply)
            elif path == "/health" and method == "GET":
                await self._health(reply)
            else:
                raise HttpError(404, f"no route {method} {path}; this proxy serves POST {' and '.join(_GENERATE)}, "
                                     "GET /v1/models and GET /health")
        except HttpError as exc:
            await reply.error(exc)
        return reply.keep

    # -- upstream calls ---------------------------------------------------------------------
    @staticmethod
    def _headers(client: Head, xid: str | None) -> list[tuple[str, str]]:
        hs = [(k, v) for k, v in client.headers if k in _FORWARDED_REQUEST_HEADERS and k != "x-request-id"]
        if xid is not None:
            hs.append(("x-request-id", xid))
        return hs

    async def _send(self, side: _Side, method: str, path: str, body: bytes | None,
                    headers: list[tuple[str, str]]) -> Exchange:
        """Send to the side's next upstream, skipping any that refuse the connection.

        Raises: HttpError: 502 when none accepts or the answer is broken, 504 when it is late.
        """
        down = []
        for up in side.order():
            try:
                return await send(up, method, path, body, headers,
                                  connect_timeout=self.config.connect_timeout, timeout=self.config.timeout)
            except UpstreamDown as exc:
                log.warning("%s upstream down, trying the next: %s", side.name, exc)
                down.append(str(exc))
            except asyncio.TimeoutError:
                raise HttpError(504, f"{side.name} upstream {up.url} did not answer within {self.config.timeout} s") from None
            except (ValueError, OSError) as exc:
                raise HttpError(502, f"{side.name} upstream {up.url}: {exc}") from None
        raise HttpError(502, f"no {side.name} upstream accepted the connection: {'; '.join(down)}")

    async def _read_json(self, ex: Exchange, what: str) -> tuple[bytes, Any]:
        """The whole answer and its JSON (None if it is not JSON); closes ``ex``.

        Raises: HttpError: 502 broken, 504 stalled."""
        try:
            raw = await ex.read(self.config.max_body)
        except asyncio.TimeoutError:
            raise HttpError(504, f"{what} {ex.upstream.url} stalled in its answer") from None
        except (ValueError, OSError, asyncio.IncompleteReadError) as exc:
            raise HttpError(502, f"{what} {ex.upstream.url}: broken answer: {exc!r}") from None
        finally:
            await ex.close()
        try:
            return raw, json.loads(raw)
        except ValueError:
            return raw, None

    async def _prefill_params(self, path: str, body: dict[str, Any], head: Head, xid: str) -> dict[str, Any]:
        """Run the prefill half; its ``kv_transfer_params``.

        Raises: HttpError: the prefill instance's own error (its status and body), or 502."""
        data = json.dumps(prefill_body(body, xid)).encode()
        ex = await self._send(self._prefill, "POST", path, data, self._headers(head, xid))
        raw, answer = await self._read_json(ex, "prefill instance")
        if ex.status != 200:
            err = HttpError(ex.status, f"prefill instance {ex.upstream.url} answered {ex.status}")
            if answer is not None:
                err.body = raw  # its own error body, unchanged
            raise err
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict) or not params:
            raise HttpError(502, f"prefill instance {ex.upstream.url} returned no kv_transfer_params; "
                                 "is it started with kvxfer's --kv-transfer-config and kv_role kv_producer?")
        return params

    async def _generate(self, path: str, raw: bytes, head: Head, reply: _Reply) -> None:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise HttpError(400, f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        check_single(body)
        xid = uuid.uuid4().hex
        if self.config.mode is Mode.PULL:
            params = await self._prefill_params(path, body, head, xid)
            await self._decode_half(path, body, params, head, xid, reply)
            return
        # push: the decode side names its blocks under xid while the prefill side computes and writes them
        prefill = asyncio.ensure_future(self._prefill_params(path, body, head, xid))
        params = {"do_remote_prefill": True, "do_remote_decode": False, "kvxfer_id": xid}
        try:
            await self._decode_half(path, body, params, head, xid, reply)
        except BaseException:
            prefill.cancel()  # nothing left to write into
            prefill.add_done_callback(_consume)
            raise
        try:
            await prefill
        except HttpError as exc:
            # the decode instance then got no blocks: its kv_load_failure_policy applied
            log.warning("request %s: prefill side failed in push mode: %s", xid, exc)

    async def _decode_half(self, path: str, body: dict[str, Any], params: dict[str, Any], head: Head,
                           xid: str, reply: _Reply) -> None:
        data = json.dumps(dict(body, kv_transfer_params=params)).encode()
        await self._relay(await self._send(self._decode, "POST", path, data, self._headers(head, xid)), reply)

    async def _relay(self, ex: Exchange, reply: _Reply) -> None:
        """Pass an upstream's answer on as it arrives (status, headers, body); closes ``ex``.

        Raises: HttpError: before the status went out. ConnectionError: after (the stream is cut).
        """
        hs = [(k, v) for k, v in ex.head.headers if k not in _HOP_BY_HOP]
        if ex.head.get("content-length") is not None and ex.head.get("transfer-encoding") is None:
            raw, _ = await self._read_json(ex, "upstream")
            await reply.full(ex.status, hs, raw)
            return
        try:
            reply.begin_stream(ex.status, hs)
            try:
                async for data in ex.body():
                    if data:
                        await reply.piece(data)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                # the status line is out: all that is left is to end the stream early
                log.warning("upstream %s broke off its answer: %r", ex.upstream.url, exc)
                raise ConnectionError(f"upstream {ex.upstream.url} broke off") from None
            await reply.end_stream()
        finally:
            await ex.close()

    async def _health(self, reply: _Reply) -> None:
        async def one(up: Upstream) -> int | str:
            try:
                ex = await send(up, "GET", "/health", None, [], connect_timeout=self.config.connect_timeout,
                                timeout=min(self.config.timeout, 10.0))
                await self._read_json(ex, "health")
                return ex.status
            except (UpstreamDown, HttpError, ValueError, OSError) as exc:
                return f"unreachable: {exc or type(exc).__name__}"

        sides = {"prefill": self.config.prefill, "decode": self.config.decode}
        result = {name: dict(zip((u.url for u in ups), await asyncio.gather(*(one(u) for u in ups))))
                  for name, ups in sides.items()}
        ok = all(s == 200 for side in result.values() for s in side.values())
        body = json.dumps({"status": "ok" if ok else "degraded", **result}).encode()
        await reply.full(200 if ok else 503, [("content-type", "application/json")], body)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a failure after the client left is not worth a warning


async def serve(config: ProxyConfig, host: str, port: int, grace: float) -> None:
    """Run the proxy until SIGINT or SIGTERM, then shut it down within ``grace`` seconds."""
    proxy = Proxy(config)
    await proxy.start(host, port)
    print(f"kvxfer proxy listening on http://{host}:{proxy.port} ({config.mode.value} mode; "
          f"prefill {[u.url for u in config.prefill]}, decode {[u.url for u in config.decode]})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: waiting up to %s s for requests in flight", grace)
    await proxy.shutdown(grace)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill vLLM instances (kv_producer)")
    p.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode vLLM instances (kv_consumer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--mode", choices=[m.value for m in Mode], default="pull",
                   help="must match kv_connector_extra_config.mode")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds an upstream may stay silent")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to finish requests in flight at shutdown")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ProxyConfig(tuple(map(Upstream.parse, args.prefill)), tuple(map(Upstream.parse, args.decode)),
                             Mode(args.mode), timeout=args.timeout)
    except ValueError as exc:
        p.error(str(exc))
    asyncio.run(serve(config, args.host, args.port, args.grace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
