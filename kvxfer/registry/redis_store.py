"""The registry on Redis (``redis://host:port/db``): the same rules as the embedded server.

Layer: registry (Redis backend). Every operation is one Lua script (atomic: exactly-once
claims), keys carry TTLs as a backstop, and every script first sweeps due leases and TTLs on
the Redis server's clock, pushing the resulting events onto each party's event list. Each
client reads its event list with a bounded BLPOP on a dedicated connection; waiting operations
(pull, await-expect) register themselves in Redis, are woken through that list, and also retry
at a short bounded interval so that a lost wake-up only costs ``poll_s``.

The ``token`` of :func:`~kvxfer.registry.client.connect_registry` is used as the Redis
password when the URL has none (``requirepass`` refuses clients without it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import msgpack

from ..errors import BackendUnavailableError, RegistryError, RemoteProtocolError
from .base import DEFAULT_LEASE_S, AsyncRegistry, LinkState, RegistryURL, new_instance_id
from .errors import (ErrorCode, RegistryAuthError, RegistryTimeoutError, RegistryUnavailableError,
                     UnknownConnectorError, UnknownRequestError, error_from_code)
from .messages import (MAX_CONSUMERS, MAX_SECONDS, Claim, Expectation, Mode, RequestEvent, RequestInfo, RequestState, from_wire)
from ._redis_scripts import SCRIPTS

__all__ = ["AsyncRedisRegistry"]

log = logging.getLogger(__name__)

_POLL_S = 0.25
_EVENT_BLOCK_S = 1
_CALL_TIMEOUT_S = 10.0
_NAMESPACE = "kvx:"


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


class AsyncRedisRegistry(AsyncRegistry):
    """One connector's registry client on Redis (asyncio). Create with :meth:`connect`."""

    def __init__(self, url: RegistryURL, name: str, password: str | None, namespace: str = _NAMESPACE,
                 poll_s: float = _POLL_S):
        super().__init__(name)
        try:
            import redis.asyncio as aioredis
            import redis.exceptions as rexc
        except ImportError:
            raise BackendUnavailableError("redis:// registry needs the 'redis' package (pip install kvxfer[redis])") from None
        self.url = url
        self._rexc = rexc
        self._prefix = namespace
        self._poll_s = poll_s
        self._instance = new_instance_id()
        kwargs = dict(host=url.host, port=url.port, db=url.db, password=url.password or password,
                      socket_connect_timeout=5.0)
        self._r = aioredis.Redis(socket_timeout=_CALL_TIMEOUT_S, **kwargs)
        self._ev = aioredis.Redis(socket_timeout=_EVENT_BLOCK_S + 5.0, **kwargs)  # blocking reads only
        self._scripts = {name: self._r.register_script(src) for name, src in SCRIPTS.items()}
        self._wakers: dict[str, asyncio.Event] = {}
        self._registration: tuple[bytes, float] | None = None
        self._lease_s = DEFAULT_LEASE_S
        self._tasks: set[asyncio.Task] = set()
        self._link_ok = True
        self._closed = False

    @classmethod
    async def connect(cls, url: RegistryURL, *, name: str, token: str | None = None,
                      namespace: str = _NAMESPACE) -> AsyncRedisRegistry:
        """Connect and check the link (one script call).

        Raises:
            RegistryAuthError: Redis refused the password/token.
            RegistryUnavailableError: Redis cannot be reached.
        """
        self = cls(url, name, token, namespace)
        try:
            await self._script("sweep")
        except RegistryError:
            await self._close_pools()
            raise
        self._spawn(self._event_loop())
        return self

    # -- plumbing -----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _link(self, ok: bool) -> None:
        if ok != self._link_ok:
            self._link_ok = ok
            self._emit_link(LinkState.RECONNECTED if ok else LinkState.LOST)

    async def _script(self, name: str, *args: Any) -> list[Any]:
        """Run one script; its reply after the status, or raise the matching RegistryError."""
        if self._closed:
            raise RegistryUnavailableError("registry client is closed")
        rexc = self._rexc
        try:
            reply = await self._scripts[name](keys=[], args=[self._prefix, *args])
        except rexc.AuthenticationError as exc:
            raise RegistryAuthError(f"redis {self.url} refused the token/password: {exc}") from None
        except rexc.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise RegistryAuthError(f"redis {self.url} refused the token/password: {exc}") from None
            raise RegistryError(f"redis {self.url} script {name} failed: {exc}") from None
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            self._link(False)
            raise RegistryUnavailableError(f"registry {self.url} unreachable: {exc}") from None
        self._link(True)
        status = reply[0].decode()
        if status == "ok":
            return reply[1:]
        if status == "absent":
            raise UnknownRequestError(reply[1].decode())
        try:
            code = ErrorCode(status)
        except ValueError:
            raise RegistryError(f"redis script {name} answered {status!r}") from None
        raise error_from_code(code, reply[1].decode() if len(reply) > 1 else status)

    async def _event_loop(self) -> None:
        key = f"{self._prefix}e:{self.name}"
        rexc = self._rexc
        while not self._closed:
            try:
                item = await self._ev.blpop([key], timeout=_EVENT_BLOCK_S)
                if item is None:
                    continue
                batch = [item[1]]
                more = await self._ev.lpop(key, 255)
                if more:
                    batch.extend(more)
            except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
                self._link(False)
                log.debug("kvxfer redis registry %s: event read failed: %s", self.name, exc)
                await asyncio.sleep(_POLL_S)
                continue
            except rexc.RedisError as exc:
                log.warning("kvxfer redis registry %s: event read failed: %s", self.name, exc)
                await asyncio.sleep(_POLL_S)
                continue
            for raw in batch:
                self._dispatch(raw)

    def _dispatch(self, raw: bytes) -> None:
        try:
            obj = msgpack.unpackb(raw, raw=False)
            if isinstance(obj, dict) and "wake" in obj:
                waker = self._wakers.get(obj["wake"])
                if waker is not None:
                    waker.set()
                return
            event = from_wire(RequestEvent, obj)
        except (RemoteProtocolError, ValueError, msgpack.UnpackException) as exc:
            log.warning("kvxfer redis registry %s: dropping a malformed event: %s", self.name, exc)
            return
        self._emit_event(event)

    # -- directory ----------------------------------------------------------------------
    async def register(self, metadata: bytes, lease_s: float = DEFAULT_LEASE_S) -> float:
        lease_s = min(max(lease_s, 0.05), 3600.0)
        self._registration = (bytes(metadata), lease_s)
        await self._register_now()
        if not any(t.get_name() == "heartbeat" for t in self._tasks):
            self._spawn(self._heartbeat_loop()).set_name("heartbeat")
        return self._lease_s

    async def _register_now(self) -> None:
        assert self._registration is not None
        metadata, lease_s = self._registration
        reply = await self._script("register", self.name, self._instance, metadata, _ms(lease_s))
        self._lease_s = int(reply[0]) / 1000

    async def _heartbeat_loop(self) -> None:
        while not self._closed and self._registration is not None:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self._script("heartbeat", self.name, self._instance)
            except UnknownConnectorError:
                log.warning("kvxfer redis registry %s: lease lost; registering again", self.name)
                try:
                    await self._register_now()
                except RegistryError as exc:
                    log.warning("kvxfer redis registry %s: re-register failed: %s", self.name, exc)
            except RegistryError as exc:
                log.debug("kvxfer redis registry %s: heartbeat failed: %s", self.name, exc)

    async def unregister(self) -> None:
        self._registration = None
        for task in [t for t in self._tasks if t.get_name() == "heartbeat"]:
            task.cancel()
        await self._script("unregister", self.name, self._instance)

    async def lookup(self, name: str) -> bytes:
        return bytes((await self._script("lookup", name))[0])

    # -- requests -----------------------------------------------------------------------
    async def publish(self, request_id: str, blocks: Sequence[int], ttl_s: float, consumers: int = 1) -> None:
        if isinstance(consumers, bool) or not isinstance(consumers, int) or not 1 <= consumers <= MAX_CONSUMERS:
            raise error_from_code(ErrorCode.INVALID, f"consumers={consumers!r}; expected 1..{MAX_CONSUMERS}")
        await self._create(request_id, blocks, ttl_s, Mode.PULL, RequestState.PUBLISHED, "wp:", consumers)

    async def expect(self, request_id: str, dst_blocks: Sequence[int], ttl_s: float) -> None:
        await self._create(request_id, dst_blocks, ttl_s, Mode.PUSH, RequestState.EXPECTED, "we:")

    async def _create(self, request_id: str, blocks: Sequence[int], ttl_s: float, mode: Mode, state: RequestState,
                      wprefix: str, consumers: int = 1) -> None:
        _check_request(request_id, ttl_s)
        packed = msgpack.packb([int(b) for b in blocks])
        await self._script("create", request_id, self.name, packed, _ms(ttl_s), mode.value, state.value, wprefix,
                           int(consumers))

    async def pull(self, request_id: str, timeout_s: float) -> Claim:
        peer, blocks, meta = await self._take(request_id, timeout_s, Mode.PULL, "wp:", "published")
        return Claim(request_id, peer, blocks, meta)

    async def await_expect(self, request_id: str, timeout_s: float) -> Expectation:
        peer, blocks, meta = await self._take(request_id, timeout_s, Mode.PUSH, "we:", "expected by a consumer")
        return Expectation(request_id, peer, blocks, meta)

    async def _take(self, request_id: str, timeout_s: float, mode: Mode, wprefix: str,
                    what: str) -> tuple[str, tuple[int, ...], bytes]:
        if not request_id:
            raise error_from_code(ErrorCode.INVALID, "request id must not be empty")
        if mode is Mode.PULL:
            args = ("pull", RequestState.PUBLISHED.value, RequestState.CLAIMED.value, "consumer", "producer")
        else:
            args = ("push", RequestState.EXPECTED.value, RequestState.PUSHING.value, "producer", "consumer")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout_s, 0.0), MAX_SECONDS)
        waker = self._wakers.setdefault(request_id, asyncio.Event())
        registered = False
        try:
            while True:
                waker.clear()  # before the attempt: a wake-up that races it is not lost
                wait = "1" if timeout_s > 0 else "0"
                try:
                    reply = await self._script("take", request_id, self.name, wait, *args, wprefix)
                except UnknownRequestError:
                    registered = registered or timeout_s > 0
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        if timeout_s <= 0:
                            raise
                        raise RegistryTimeoutError(f"request {request_id!r} not {what} within {timeout_s:g} s") from None
                    try:
                        await asyncio.wait_for(waker.wait(), timeout=min(remaining, self._poll_s))
                    except TimeoutError:
                        pass
                    continue
                registered = False  # the script removed nothing, but a taken request has no waiters left
                peer, packed, meta = reply
                blocks = tuple(int(b) for b in msgpack.unpackb(packed))
                return peer.decode(), blocks, bytes(meta)
        finally:
            if self._wakers.get(request_id) is waker:
                del self._wakers[request_id]
            if registered:
                try:
                    await self._script("unwait", wprefix, request_id, self.name)
                except RegistryError:
                    pass

    async def complete(self, request_id: str, ok: bool = True, reason: str = "") -> None:
        await self._script("complete", request_id, self.name, "1" if ok else "0", reason)

    async def cancel(self, request_id: str, reason: str = "") -> None:
        await self._script("cancel", request_id, self.name, reason)

    async def query(self, request_id: str) -> RequestInfo:
        mode, state, producer, consumer, need, nclaim, ndone = (v.decode() for v in await self._script("query", request_id))
        return RequestInfo(request_id, Mode(mode), RequestState(state), producer or None, consumer or None,
                           int(need), int(nclaim), int(ndone))

    async def sweep(self) -> None:
        """Expire due leases and TTLs now (every operation also does). Raises RegistryError."""
        await self._script("sweep")

    async def close(self) -> None:
        if self._closed:
            return
        if self._registration is not None:
            try:
                await self.unregister()
            except RegistryError:
                pass
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_pools()

    async def _close_pools(self) -> None:
        for client in (self._r, self._ev):
            try:
                await client.aclose()
            except Exception:  # closing a broken pool must not mask the caller's error
                pass


def _check_request(request_id: str, ttl_s: float) -> None:
    if not request_id:
        raise error_from_code(ErrorCode.INVALID, "request id must not be empty")
    if not 0 < ttl_s <= 24 * 3600.0:
        raise error_from_code(ErrorCode.INVALID, f"ttl {ttl_s} s is outside (0, 86400]")
