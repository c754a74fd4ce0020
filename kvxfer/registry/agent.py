"""RequestAgent: a Connector's requests matched through the registry (pull and push mode).

Layer: registry, above the Connector's read/write. The Connector holds one agent and forwards
``publish``/``pull``/``expect``/``push`` to it. Every method that returns a
:class:`TransferHandle` returns at once; waiting for the other side happens on the registry
client's event loop, blocking Connector calls (connect, submitting a transfer) on a small
thread pool, so the caller's thread never blocks and every wait has a timeout.

* Pull: the producer publishes; the consumer's ``pull`` claims the publication (exactly once),
  connects to the producer from its directory metadata, reads the blocks, then completes the
  request in the registry, which tells the producer (``finished()``).
* Push: the consumer's ``expect`` names its blocks; the producer's ``push`` (once per layer
  group, ``last=True`` on the final one) takes the expectation, writes those layers, and after
  the last write completes its side; the consumer is told DELIVERED, confirms, and the producer
  is told CONSUMED.
* Several consumers of one publication (``publish(..., consumers=n)``: decode ranks of a wider
  tensor-parallel group reading one prefill rank's blocks): each pulls it once; the producer is
  told CONSUMED once all have confirmed, or the first failure, cancellation or expiry, once.
* Layout changes: ``pull``/``push`` take ``reshard=`` (a :class:`~kvxfer.reshard.HeadReshard`,
  or a function of the peer's :class:`~kvxfer.metadata.PeerMetadata` returning one) and
  ``layers=``; the peer is then connected with ``allow_layout_change`` and the Connector's
  planner checks the block lists (which may differ in length where the reshard maps tokens).
  One key per producer rank and KV-cache group (:func:`~kvxfer.registry.keys.publication_key`)
  lets a consumer pull from several producer connectors into one destination, concurrently.
* A party that is lost (lease expired), a TTL that runs out, a cancellation: every handle on
  that request fails with :class:`RequestFailedError` naming the reason. In push mode the
  consumer does not wait for the lease of a producer whose data link drops: its ``expect``
  handle fails with :class:`PeerLostError` at once (the Connector's link-lost listener).
* A ``push`` for a request that already ended here (consumed, failed, cancelled, expired while
  this connector was its producer) fails at once, even where the registry no longer remembers
  the request (restarted, or its tombstone is gone).
* The handles are :class:`RequestHandle`: their ``stats`` time what the caller waited (from the
  call), their ``transfer_stats`` the transfer alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..errors import ConfigError, KvxferError, PeerLostError, RegistryError, TransferTimeoutError
from ..handle import Op, TransferHandle, TransferStats, TransferStatus
from ..metadata import PeerMetadata
from ..reshard import HeadReshard
from .base import DEFAULT_LEASE_S, AsyncRegistry, LinkState
from .client import RegistryClient
from .errors import NotAPartyError, RegistryTimeoutError, RequestFailedError, UnknownRequestError
from .messages import MAX_CONSUMERS, EventKind, Mode, RequestEvent, RequestState, Role

__all__ = ["RequestAgent", "RequestHandle", "FinishedRequest", "ReshardSpec"]

ReshardSpec = Union[HeadReshard, Callable[[PeerMetadata], Union[HeadReshard, None]], None]
"""What ``pull``/``push`` take as ``reshard=``: a reshard, a function of the peer's metadata (the
producer's on a pull, the consumer's on a push) returning one (or None: no layout change), or
None."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """A request this connector produced has ended: its blocks may be freed."""

    request_id: str
    kind: EventKind
    reason: str


class RequestHandle(TransferHandle):
    """The handle of ``pull``/``expect``/``push``: a :class:`TransferHandle` of one request.

    ``stats`` (and ``wait()``'s result) time what the caller waited: from the call, so for a
    pull or an expect they include waiting for the other side (e.g. the whole prefill).
    ``transfer_stats`` is the transfer's own: the bytes the backend moved, the seconds that
    transfer took and its backend; ``None`` until it completed, if it failed, and always for
    ``expect`` (the producer moves those bytes: its ``push`` handles carry the figures).

    ``cancel(timeout=None)`` (of a pull or an expect) fences like ``TransferHandle.cancel``
    through the read it started, if any (a pull not yet claimed starts none), then cancels the
    request in the registry: its producer hears CANCELLED once. An expect has no transfer of
    its own here: its cancel tells the registry, and the producer cancels its writes when it
    hears it; bytes of a write already in flight may still land until then (no local fence).
    """

    __slots__ = ("mode", "request_id", "transfer_stats", "_inner", "_stop", "_starting", "_cond")

    def __init__(self, request_id: str, mode: Mode, op: Op, nbytes: int, dst_blocks: np.ndarray):
        super().__init__(op, "?", nbytes, "registry", dst_blocks)
        self.request_id = request_id
        self.mode = mode
        self.transfer_stats: TransferStats | None = None
        self._inner: TransferHandle | None = None  # the transfer this request started
        self._stop = False  # cancelled: start no transfer
        self._starting = False  # a transfer is being started (its handle not yet in _inner)
        self._cond = threading.Condition()

    def _may_start(self) -> bool:
        """The agent is about to start this request's transfer: False once it was cancelled."""
        with self._cond:
            if self._stop or self.done():
                return False
            self._starting = True
            return True

    def _started(self, inner: TransferHandle | None) -> None:
        with self._cond:
            self._inner, self._starting = inner, False
            self._cond.notify_all()

    def _stop_transfer(self, timeout: float | None) -> bool:
        """No transfer of this request starts any more; the one started is cancelled (with its
        fence). False when it finished by itself meanwhile.

        Raises:
            TransferTimeoutError: the transfer could not be fenced within ``timeout``.
        """
        with self._cond:
            self._stop = True
            if not self._cond.wait_for(lambda: not self._starting, timeout=60.0 if timeout is None else timeout):
                raise TransferTimeoutError(f"request {self.request_id!r}: its transfer is still being started")
            inner = self._inner
        return inner is None or inner.cancel(timeout) or inner.status is TransferStatus.CANCELLED

    def _fence(self, agent: RequestAgent, timeout: float | None) -> bool:
        """This handle's canceller: :meth:`_stop_transfer`, then the registry is told."""
        if not self._stop_transfer(timeout):
            return False  # it finished by itself: its completion finishes this handle
        try:
            agent.cancel(self.request_id, "cancelled by the consumer")
        except KvxferError as exc:
            log.info("request %r cancelled here; the registry was not told: %s", self.request_id, exc)
        return True

    def __repr__(self) -> str:
        return f"<RequestHandle {self.request_id!r} {self.mode.value} {super().__repr__()[1:-1]}>"


class _Ended:
    """Requests this connector produced that ended, remembered for a while (loop thread only).

    The registry keeps a tombstone of an ended request for a minute; this memory outlives it
    (and a registry restart), so that a late ``push`` fails at once instead of waiting its whole
    timeout for an expectation that will never come.
    """

    __slots__ = ("_entries", "_keep_s", "_max")

    def __init__(self, keep_s: float = 600.0, max_entries: int = 65536):
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._keep_s = keep_s
        self._max = max_entries

    def add(self, rid: str, kind: EventKind, reason: str) -> None:
        now = time.monotonic()
        self._entries.pop(rid, None)
        self._entries[rid] = (now + self._keep_s, f"request {rid!r} already ended ({kind.value}): {reason}")
        while self._entries:
            oldest, (until, _) = next(iter(self._entries.items()))
            if until > now and len(self._entries) <= self._max:
                break
            del self._entries[oldest]

    def get(self, rid: str) -> str | None:
        entry = self._entries.get(rid)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def forget(self, rid: str) -> None:
        self._entries.pop(rid, None)


@dataclass(slots=True)
class _Publication:
    blocks: tuple[int, ...]
    ttl_s: float
    consumers: int = 1


class _PushState:
    __slots__ = ("expectation", "handles", "last_seen", "failed")

    def __init__(self, expectation: asyncio.Future):
        self.expectation = expectation
        self.handles: list[RequestHandle] = []
        self.last_seen = False
        self.failed = False


class RequestAgent:
    """Publish/pull/expect/push for one Connector through the registry at ``registry_url``.

    Raises (constructor): ConfigError (bad URL), RegistryAuthError, RegistryUnavailableError,
    NameTakenError (another live connector holds this connector's name).
    """

    def __init__(self, connector: Any, registry_url: str, token: str | None = None, *,
                 lease_s: float = DEFAULT_LEASE_S, workers: int = 4):
        self._connector = connector
        self._client = RegistryClient(registry_url, token=token, name=connector.name)
        self._impl: AsyncRegistry = self._client.impl
        self._lease_s = lease_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"kvxfer-agent-{connector.name}")
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._registered_meta: bytes | None = None
        self._finished: queue.SimpleQueue[FinishedRequest] = queue.SimpleQueue()
        self._published: dict[str, _Publication] = {}
        self._waiting: dict[str, RequestHandle] = {}      # consumer handles, by request id
        self._pushes: dict[str, _PushState] = {}          # producer push state (loop thread only)
        self._ended = _Ended()                             # producer requests that ended (loop thread only)
        self._peers: dict[tuple[str, bytes], Any] = {}
        self._closed = False
        self._client.add_event_listener(self._on_event)
        self._client.add_link_listener(self._on_link)
        add_listener = getattr(connector, "add_link_lost_listener", None)
        if add_listener is not None:
            add_listener(self._on_peer_lost)
        try:
            self._ensure_registered()
        except BaseException:
            self._client.close()
            self._pool.shutdown(wait=False)
            raise

    # -- directory ----------------------------------------------------------------------
    def _ensure_registered(self) -> None:
        meta = self._connector.metadata()
        if meta != self._registered_meta:
            self._client.register(meta, self._lease_s)
            self._registered_meta = meta

    # -- producer, pull mode ------------------------------------------------------------
    def publish(self, request_id: str, blocks: Sequence[int], *, ttl: float = 60.0, consumers: int = 1) -> None:
        """Announce that ``request_id``'s KV sits in ``blocks`` for ``ttl`` seconds, for
        ``consumers`` distinct consumers (connectors) to pull, each once.

        :meth:`finished` reports the request once: CONSUMED when every consumer has confirmed,
        else the first FAILED (a consumer failed or gave up, a party was lost), CANCELLED or
        EXPIRED (the TTL ran out, e.g. before every consumer came; each claim renews it).

        Raises: ConfigError (``consumers`` not in 1..MAX_CONSUMERS), DuplicateRequestError,
        InvalidRequestError, RegistryUnavailableError.
        """
        if isinstance(consumers, bool) or not isinstance(consumers, (int, np.integer)) \
                or not 1 <= consumers <= MAX_CONSUMERS:
            raise ConfigError(f"consumers={consumers!r}; expected an int in 1..{MAX_CONSUMERS} "
                              "(the consumer ranks that read this publication)")
        self._ensure_registered()
        ids = tuple(int(b) for b in np.asarray(blocks, dtype=np.int64).ravel())
        self._client.publish(request_id, ids, ttl, int(consumers))
        with self._lock:
            self._published[request_id] = _Publication(ids, ttl, int(consumers))

    def lookup(self, name: str) -> bytes:
        """The directory metadata of connector ``name`` (e.g. a prefill rank): the bytes that
        ``Connector.connect`` takes; :meth:`PeerMetadata.from_bytes` reads its layout.

        Raises: UnknownConnectorError (not registered, or its lease expired),
        RegistryUnavailableError.
        """
        return self._client.lookup(name)

    def finished(self) -> list[FinishedRequest]:
        """Requests this connector produced that ended since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._finished.get_nowait())
            except queue.Empty:
                return out

    def wait_finished(self, timeout: float) -> FinishedRequest:
        """The next finished request, waiting up to ``timeout`` s. Raises TransferTimeoutError."""
        try:
            return self._finished.get(timeout=timeout)
        except queue.Empty:
            raise TransferTimeoutError(f"no request finished within {timeout} s") from None

    # -- consumer, pull mode ------------------------------------------------------------
    def pull(self, request_id: str, dst_blocks: Sequence[int], *, timeout: float = 60.0, skip: int = 0,
             reshard: ReshardSpec = None, layers: Sequence[int | str] | None = None) -> RequestHandle:
        """Wait (in the background) for ``request_id``'s publication, read it into ``dst_blocks``.

        ``skip``: the first ``skip`` blocks are already here (a local prefix-cache hit for the
        same tokens): only the publication's blocks after them are read, into
        ``dst_blocks[skip:]``; ``dst_blocks`` still names one block per published block.

        ``reshard``: the layout change of this read (see :data:`ReshardSpec`; a function gets
        the producer's metadata once the publication is claimed, so it can size the change
        from the producer's layout). With a reshard the registry leaves the block lists to it:
        they may differ in length where it maps token ranges (``HeadReshard.num_tokens``:
        block sizes may differ), and ``skip`` drops the first ``skip`` blocks of both lists, so
        it must be 0 for a token-mapped reshard (whose ``src_start``/``dst_start`` skip a
        cached prefix, mid-block if need be). ``layers``: only these
        registered tensors (positions or names): one KV-cache group of a hybrid model, its
        blocks published under its own key.

        Returns a handle at once; its ``stats`` time the whole wait from this call, its
        ``transfer_stats`` the read alone (with ``layers`` or ``reshard``, ``nbytes`` becomes
        the read's own once it is planned). It fails with RegistryTimeoutError (not published
        in time), AlreadyClaimedError (taken by as many consumers as it was published for, or
        by this connector already), RequestFailedError (producer lost, request expired or
        cancelled, unequal block lists without a reshard), or the transfer's own error
        (PeerLostError, LayoutError or BlockIdError from the reshard's plan ...).

        Raises:
            ConfigError: ``skip`` is not in ``0..len(dst_blocks)``, or ``skip`` with a
                token-mapped reshard.
            LayoutError: ``layers`` names tensors this connector did not register.
        """
        self._ensure_registered()
        dst = np.asarray(dst_blocks, dtype=np.int64).ravel()
        if not 0 <= int(skip) <= dst.size:
            raise ConfigError(f"skip={skip}; expected 0..{dst.size} (the blocks already held, of {dst.size})")
        skip = int(skip)
        if isinstance(reshard, HeadReshard):
            _check_skip(reshard, skip)
        self._check_layers(layers)
        handle = self._new_handle(request_id, Mode.PULL, Op.READ, dst[skip:])
        handle.set_canceller(lambda t: handle._fence(self, t))
        lay = None if layers is None else list(layers)
        with self._lock:
            self._waiting[request_id] = handle
        handle.add_done_callback(lambda h: self._forget_waiting(request_id, h))
        self._client.submit(lambda impl: self._pull_task(impl, request_id, dst, timeout, handle, skip, reshard, lay))
        return handle

    async def _pull_task(self, impl: AsyncRegistry, rid: str, dst: np.ndarray, timeout: float,
                         handle: RequestHandle, skip: int = 0, reshard: ReshardSpec = None,
                         layers: list | None = None) -> None:
        claimed = False
        try:
            claim = await impl.pull(rid, timeout)
            claimed = True
            if handle.done() or handle._stop:  # failed or cancelled meanwhile (cancel, close)
                await self._complete(impl, rid, False, "consumer gave up")
                return
            rs = _resolve_reshard(reshard, claim.metadata)
            if rs is None and len(claim.blocks) != len(dst):
                raise RequestFailedError(f"request {rid!r}: producer published {len(claim.blocks)} blocks, "
                                         f"consumer asked for {len(dst)}")
            if rs is not None:
                _check_skip(rs, skip)
            handle.peer_name = claim.producer
            peer = await self._in_pool(self._peer, claim.producer, claim.metadata, rs is not None)
            if not handle._may_start():
                await self._complete(impl, rid, False, "consumer gave up")
                return
            inner = None
            try:
                inner = await self._in_pool(self._connector.read, peer, list(claim.blocks[skip:]), dst[skip:],
                                            layers=layers, reshard=rs)
            finally:
                handle._started(inner)
            if rs is not None or layers is not None:
                handle.nbytes = inner.nbytes
            handle.backend = inner.backend
            loop = asyncio.get_running_loop()
            inner.add_done_callback(lambda h: loop.call_soon_threadsafe(self._spawn_finish, impl, rid, h, handle))
        except Exception as exc:
            if not isinstance(exc, KvxferError):  # a bug must still fail the handle rather than hang it
                log.exception("pull of %r failed", rid)
                exc = RequestFailedError(f"pull of {rid!r} failed: {type(exc).__name__}: {exc}")
            # fail the caller's handle first: reporting to an unreachable registry may take its
            # whole call timeout, and the handle must fail within the transfer's own
            handle.set_failed(exc)
            if claimed:
                await self._complete(impl, rid, False, f"{type(exc).__name__}: {exc}")

    def _spawn_finish(self, impl: AsyncRegistry, rid: str, inner: TransferHandle, outer: RequestHandle) -> None:
        asyncio.get_running_loop().create_task(self._finish_read(impl, rid, inner, outer))

    async def _finish_read(self, impl: AsyncRegistry, rid: str, inner: TransferHandle, outer: RequestHandle) -> None:
        exc = inner.exception()
        if exc is None:
            outer.transfer_stats = inner.stats
            await self._complete(impl, rid, True, "")
            outer.set_done()
        elif inner.status is TransferStatus.CANCELLED:  # by a cancel here, which tells the registry
            outer.set_failed(RequestFailedError(f"request {rid!r} cancelled here"))
        else:
            outer.set_failed(exc)  # before the report, which may wait on an unreachable registry
            await self._complete(impl, rid, False, f"{type(exc).__name__}: {exc}")

    # -- consumer, push mode ------------------------------------------------------------
    def expect(self, request_id: str, dst_blocks: Sequence[int], *, timeout: float = 60.0) -> RequestHandle:
        """Ask the producer to write ``request_id`` into ``dst_blocks`` within ``timeout`` s.

        Returns a handle at once; it is done when the producer wrote every layer (and this side
        confirmed), and fails with RequestFailedError (expired, cancelled, producer lost by its
        lease), PeerLostError (the data link of the producer that took the request dropped), or
        the registry's refusal (DuplicateRequestError ...). Its ``transfer_stats`` stay None:
        the producer's push handles time the writes.
        """
        self._ensure_registered()
        dst = np.asarray(dst_blocks, dtype=np.int64).ravel()
        handle = self._new_handle(request_id, Mode.PUSH, Op.READ, dst)
        handle.set_canceller(lambda t: handle._fence(self, t))
        with self._lock:
            self._waiting[request_id] = handle
        handle.add_done_callback(lambda h: self._forget_waiting(request_id, h))

        async def run(impl: AsyncRegistry) -> None:
            try:
                await impl.expect(request_id, [int(b) for b in dst], timeout)
            except KvxferError as exc:
                handle.set_failed(exc)
                return
            # The registry's TTL normally ends it (EXPIRED event); this bounds the wait even if
            # the registry itself is lost meanwhile.
            grace = timeout + 2 * self._lease_s + 1.0
            asyncio.get_running_loop().call_later(grace, lambda: handle.set_failed(RegistryTimeoutError(
                f"request {request_id!r}: no push completed within {grace:g} s")))
        self._client.submit(run)
        return handle

    # -- producer, push mode ------------------------------------------------------------
    def push(self, request_id: str, src_blocks: Sequence[int], *, layers: Sequence[int | str] | None = None,
             last: bool = True, timeout: float = 60.0, reshard: ReshardSpec = None) -> RequestHandle:
        """Write ``layers`` (default: all) of ``src_blocks`` into the expecting consumer's blocks.

        ``reshard`` (see :data:`ReshardSpec`; a function gets the consumer's metadata): the
        layout change of this write; the block lists are then the reshard's to check.

        Call once per layer group; ``last=True`` on the final call completes the producer's side
        once every write of the request is done. Returns a handle at once (``transfer_stats``:
        this write alone); it fails with RegistryTimeoutError (nobody expects the request within
        ``timeout``), AlreadyClaimedError, RequestFailedError (the request ended: at once when it
        ended while this connector was its producer, naming why), or the transfer's own error.
        """
        self._ensure_registered()
        src = np.asarray(src_blocks, dtype=np.int64).ravel()
        handle = self._new_handle(request_id, Mode.PUSH, Op.WRITE, src)
        lay = None if layers is None else list(layers)
        self._check_layers(layers)
        self._client.submit(lambda impl: self._push_task(impl, request_id, src, lay, last, timeout, handle, reshard))
        return handle

    async def _push_task(self, impl: AsyncRegistry, rid: str, src: np.ndarray, layers: list | None, last: bool,
                         timeout: float, handle: RequestHandle, reshard: ReshardSpec = None) -> None:
        state = self._pushes.get(rid)
        if state is None:
            ended = self._ended.get(rid)
            if ended is not None and not await self._expected_again(impl, rid):
                handle.set_failed(RequestFailedError(ended))
                return
            state = self._pushes.get(rid)  # another push of this request may have begun meanwhile
        if state is None:
            self._ended.forget(rid)
            fut = asyncio.ensure_future(impl.await_expect(rid, timeout))
            state = self._pushes[rid] = _PushState(fut)
        state.handles.append(handle)
        state.last_seen = state.last_seen or last
        taken = False
        try:
            exp = await asyncio.shield(state.expectation)
            taken = True
            rs = _resolve_reshard(reshard, exp.metadata)
            if rs is None and len(exp.dst_blocks) != len(src):
                raise RequestFailedError(f"request {rid!r}: consumer expects {len(exp.dst_blocks)} blocks, "
                                         f"producer pushes {len(src)}")
            handle.peer_name = exp.consumer
            peer = await self._in_pool(self._peer, exp.consumer, exp.metadata, rs is not None)
            inner = await self._in_pool(self._connector.write, peer, src, list(exp.dst_blocks), layers=layers,
                                        reshard=rs)
            handle._started(inner)
            if rs is not None:
                handle.nbytes = inner.nbytes
            handle.backend = inner.backend
            loop = asyncio.get_running_loop()
            inner.add_done_callback(lambda h: loop.call_soon_threadsafe(self._on_write_done, impl, rid, h, handle))
        except Exception as exc:
            if not isinstance(exc, KvxferError):
                log.exception("push of %r failed", rid)
                exc = RequestFailedError(f"push of {rid!r} failed: {type(exc).__name__}: {exc}")
            await self._fail_push(impl, rid, exc, registry_knows=not taken)

    async def _expected_again(self, impl: AsyncRegistry, rid: str, grace: float = 1.0) -> bool:
        """Whether a consumer expects ``rid`` anew (an id reused after the request ended here).

        The consumer's new ``expect`` may reach the registry just after our ``push``: ask again
        for up to ``grace`` seconds before calling the push late.
        """
        deadline = asyncio.get_running_loop().time() + grace
        while True:
            try:
                info = await impl.query(rid)
                if info.mode is Mode.PUSH and info.state is RequestState.EXPECTED:
                    return True
            except RegistryError:
                pass
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.1)

    def _on_write_done(self, impl: AsyncRegistry, rid: str, inner: TransferHandle, outer: RequestHandle) -> None:
        exc = inner.exception()
        loop = asyncio.get_running_loop()
        if exc is not None:
            loop.create_task(self._fail_push(impl, rid, exc, registry_knows=False))
            return
        outer.transfer_stats = inner.stats
        outer.set_done()
        state = self._pushes.get(rid)
        if state is not None and state.last_seen and all(h.done() and h.exception() is None for h in state.handles):
            del self._pushes[rid]
            loop.create_task(self._complete(impl, rid, True, ""))

    async def _fail_push(self, impl: AsyncRegistry, rid: str, exc: KvxferError, *, registry_knows: bool) -> None:
        state = self._pushes.pop(rid, None)
        for h in state.handles if state is not None else ():
            h.set_failed(exc)
        if not registry_knows:
            # this side took the request and fails it: later pushes of it must not wait
            self._ended.add(rid, EventKind.FAILED, f"push failed here: {type(exc).__name__}: {exc}")
            await self._complete(impl, rid, False, f"{type(exc).__name__}: {exc}")

    # -- both ---------------------------------------------------------------------------
    def cancel(self, request_id: str, reason: str = "cancelled by the caller") -> None:
        """Cancel a request this connector is a party of; its handles here fail.

        The request ends for every party still in it: the producer is told CANCELLED once, even
        when other consumers of the publication are still reading (they fail too). A pull of
        this connector that has not claimed the publication yet fails here without an error;
        should its claim still come, it reports the pull failed, and the producer is told
        FAILED once (so it frees its blocks now rather than at the TTL).

        A pull's read already started is cancelled first, with its fence
        (``TransferHandle.cancel``): no byte of it lands in the pull's blocks after this returns
        (a fence that times out is logged; the handle fails all the same). For an expect, see
        :class:`RequestHandle`.

        Raises: UnknownRequestError, NotAPartyError (neither for a pull waiting here),
        RegistryUnavailableError.
        """
        with self._lock:
            self._published.pop(request_id, None)
            handle = self._waiting.pop(request_id, None)
        if handle is not None and not handle.done():
            try:
                handle._stop_transfer(None)
            except TransferTimeoutError as exc:
                log.warning("kvxfer agent %s: the transfer of %r was not fenced: %s", self._connector.name,
                            request_id, exc)
        try:
            self._client.cancel(request_id, reason)
        except (UnknownRequestError, NotAPartyError):
            # A pull that has not claimed the publication yet: nothing of it is in the registry.
            # If its claim still comes, the pull reports it failed ("consumer gave up"), which
            # ends the request for its producer (FAILED, once) and every other consumer.
            if handle is None or handle.mode is not Mode.PULL:
                raise
        finally:
            if handle is not None:
                handle.set_failed(RequestFailedError(f"request {request_id!r} cancelled here: {reason}"))

    def close(self) -> None:
        """Fail pending handles, unregister, stop the client (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            waiting, self._waiting = dict(self._waiting), {}
        for rid, h in waiting.items():
            h.set_failed(RequestFailedError(f"request {rid!r}: connector {self._connector.name!r} closed"))
        self._client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- internals ----------------------------------------------------------------------
    def _new_handle(self, rid: str, mode: Mode, op: Op, blocks: np.ndarray) -> RequestHandle:
        layout = getattr(self._connector, "layout", None)
        nbytes = int(len(blocks) * layout.block_nbytes) if layout is not None else 0
        return RequestHandle(rid, mode, op, nbytes, blocks)

    def _forget_waiting(self, rid: str, handle: RequestHandle) -> None:
        with self._lock:
            if self._waiting.get(rid) is handle:
                del self._waiting[rid]

    async def _in_pool(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _check_layers(self, layers: Sequence[int | str] | None) -> None:
        layout = getattr(self._connector, "layout", None)
        if layers is not None and layout is not None:
            layout.resolve_layers(list(layers))  # raises LayoutError naming the unknown layer

    def _peer(self, name: str, metadata: bytes, allow_layout_change: bool = False) -> Any:
        # One connect at a time: concurrent connects to one peer (several layer groups pushed
        # at once) would open parallel links, and a transfer on a replaced link never finishes.
        # A peer connected for a reshard serves plain transfers too: the planner checks each.
        key = (name, metadata)
        with self._connect_lock:
            peer = self._peers.get(key)
            if peer is None or peer.closed:
                peer = (self._connector.connect(metadata, allow_layout_change=True) if allow_layout_change
                        else self._connector.connect(metadata))
                self._peers[key] = peer
            return peer

    async def _complete(self, impl: AsyncRegistry, rid: str, ok: bool, reason: str) -> None:
        try:
            await impl.complete(rid, ok, reason)
        except UnknownRequestError:
            pass  # already ended (expired, cancelled, or a party was lost): the event says why
        except RegistryError as exc:
            log.warning("kvxfer agent %s: could not report %r %s: %s", self._connector.name, rid,
                        "done" if ok else "failed", exc)

    def _on_event(self, event: RequestEvent) -> None:
        """Runs on the registry client's loop thread."""
        rid = event.request_id
        if event.role is Role.PRODUCER:
            if event.kind.is_final:
                with self._lock:
                    publication = self._published.pop(rid, None)
                self._finished.put(FinishedRequest(rid, event.kind, event.reason))
                if publication is None:  # pushed from here: a later push of it must fail at once
                    self._ended.add(rid, event.kind, event.reason)
                state = self._pushes.pop(rid, None)
                if state is not None and event.kind is not EventKind.CONSUMED:
                    for h in state.handles:
                        inner = h._inner
                        if event.kind is EventKind.CANCELLED and inner is not None and not inner.done():
                            self._pool.submit(inner.cancel, 10.0)  # stop writing into the consumer's blocks
                        h.set_failed(RequestFailedError(event.reason))
            return
        with self._lock:
            handle = self._waiting.get(rid)
        if handle is None:
            return
        if event.kind is EventKind.DELIVERED:
            asyncio.get_running_loop().create_task(self._confirm(rid, handle))
        elif event.kind is not EventKind.CONSUMED:
            handle.set_failed(RequestFailedError(event.reason))

    async def _confirm(self, rid: str, handle: RequestHandle) -> None:
        await self._complete(self._impl, rid, True, "")
        handle.set_done()

    def _on_peer_lost(self, peer: PeerMetadata, exc: KvxferError) -> None:
        """A data link dropped (backend thread): fail push-mode requests whose producer it was.

        Only the registry knows which producer took an expectation, so each pending expect is
        looked up there; one that the lost peer is pushing fails now rather than after that
        producer's lease. One already DELIVERED is left to finish.
        """
        if self._closed:
            return
        with self._lock:
            rids = [rid for rid, h in self._waiting.items() if h.mode is Mode.PUSH]
        if not rids:
            return
        try:
            self._client.submit(lambda impl: self._fail_lost_producer(impl, peer.name, exc, rids))
        except RuntimeError:  # the client's loop stopped: closing
            pass

    async def _fail_lost_producer(self, impl: AsyncRegistry, name: str, exc: KvxferError, rids: list[str]) -> None:
        async def check(rid: str) -> None:
            try:
                info = await impl.query(rid)
            except RegistryError:
                return  # ended meanwhile, or the registry is away: its events and timeouts decide
            if info.state is not RequestState.PUSHING or info.producer != name:
                return
            with self._lock:
                handle = self._waiting.get(rid)
            if handle is None:
                return
            handle.peer_name = name
            if handle.set_failed(PeerLostError(f"request {rid!r}: link to its producer {name!r} lost: {exc}")):
                await self._complete(impl, rid, False, f"link to producer {name!r} lost: {exc}")
        await asyncio.gather(*(check(rid) for rid in rids))

    def _on_link(self, state: LinkState) -> None:
        """After a reconnect, publish again what the registry may have lost (it restarted)."""
        if state is not LinkState.RECONNECTED:
            return
        with self._lock:
            pubs = dict(self._published)
        if pubs:
            asyncio.get_running_loop().create_task(self._republish(pubs))

    async def _republish(self, pubs: dict[str, _Publication]) -> None:
        for rid, pub in pubs.items():
            try:
                await self._impl.query(rid)
            except UnknownRequestError:
                try:
                    await self._impl.publish(rid, pub.blocks, pub.ttl_s, pub.consumers)
                    log.info("kvxfer agent %s: published %r again after reconnecting", self._connector.name, rid)
                except RegistryError as exc:
                    log.warning("kvxfer agent %s: could not publish %r again: %s", self._connector.name, rid, exc)
            except RegistryError:
                pass


def _resolve_reshard(reshard: ReshardSpec, metadata: bytes) -> HeadReshard | None:
    """The reshard of one transfer, from the caller's spec and the peer's directory metadata."""
    if reshard is None or isinstance(reshard, HeadReshard):
        return reshard
    rs = reshard(PeerMetadata.from_bytes(metadata))
    if rs is not None and not isinstance(rs, HeadReshard):
        raise ConfigError(f"the reshard function returned {type(rs).__name__}; expected a HeadReshard or None")
    return rs


def _check_skip(reshard: HeadReshard, skip: int) -> None:
    if skip and (reshard.maps_tokens
                 or reshard.src_format.block_size != reshard.dst_format.block_size):
        raise ConfigError(f"skip={skip} with a token-mapped reshard (block size {reshard.src_format.block_size} "
                          f"-> {reshard.dst_format.block_size}); expected skip=0: the reshard's src_start / "
                          "dst_start skip a cached prefix")
