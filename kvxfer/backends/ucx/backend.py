"""The UCX backend: connect and the answer to a peer's HELLO, DIRECT or PACKED, the pid watch.

Layer: backends/ucx, the top of the package (see :mod:`kvxfer.backends.ucx` for how a transfer
moves and how UCX is configured). The backend owns one :class:`~.worker.Worker` (UCX context,
worker, threads), one :class:`~.memory.LocalMemory` (registrations, staging) and the links; a
link is given a :class:`~.context.LinkContext` and uses nothing else of the backend. Importing
this module imports ucxx (ImportError when it is missing).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

from ..._tensors import MemoryKind
from ...errors import (
    KvxferError,
    PeerLostError,
    RemoteProtocolError,
    TransferTimeoutError,
    TransportError,
)
from ...handle import Op, TransferHandle
from ...layout import KVLayout
from ...metadata import PeerMetadata, boot_id
from ...plan import TransferPlan, transfer_shape
from ...protocol.messages import Goodbye, HelloAck, TransferRequest, encode
from ..base import Backend, BackendLink, LocalSide
from . import messages as proto
from .config import ErrorHandling, Progress, TransferMode, UcxConfig, ucx_config
from .context import LinkContext
from .link import UcxLink
from .memory import LocalMemory
from .messages import Msg
from .worker import Worker, import_ucxx

try:  # ucxx is optional: the Connector treats ImportError as "ucx not available"
    import_ucxx()
except Exception as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"ucxx is not importable: {_exc!r}") from None

__all__ = ["Msg", "UcxBackend", "UcxLink"]

log = logging.getLogger(__name__)


class UcxBackend(Backend):
    """Moves plans with UCX RMA; one UCX context, worker and progress thread per connector.

    Raises (constructor):
        BackendUnavailableError: UCX cannot start here (no usable transport, libucp missing).
    """

    name = "ucx"

    def __init__(self, local: LocalSide, config: UcxConfig | None = None):
        self.local = local
        self.config = config or ucx_config()
        self.session = f"{os.getpid():x}-{id(self):x}-{os.urandom(4).hex()}"
        self._links: dict[str, UcxLink] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.layout: KVLayout | None = None
        self.worker = Worker(self._on_am, polling=self._wants_polling(local.layout), wakeup_ms=self.config.wakeup_ms)
        self.memory = LocalMemory(self.worker.ucp, self.worker.context, self.config.staging_cache)
        self._link_ctx = LinkContext(self.worker, self.memory, self.config, local, self.session, self.forget)
        self._watch = threading.Thread(target=self._watch_loop, name="kvxfer-ucx-watch", daemon=True)
        self._watch.start()

    def _watch_loop(self) -> None:
        # every liveness_interval: abandoned reads past their deadline (UcxLink.overdue), and
        # same-host peers on links without UCX error handling: is their process still there?
        while not self.worker.stopping.wait(self.config.liveness_interval):
            with self._lock:
                links = list(self._links.values())
            now = time.monotonic()
            for lk in links:
                x = lk.overdue(now)
                if x is not None:
                    self.worker.defer(lk.close_overdue, x)
                if not lk.error_handling and lk.peer.boot_id == boot_id() and not _pid_alive(lk.peer.pid):
                    lk.ep_failed = True  # closing an endpoint to a dead peer without error handling may abort
                    self.worker.defer(lk.close, PeerLostError(f"peer {lk.peer.name!r} (pid {lk.peer.pid}) is gone"))

    # -- active messages (progress thread) ---------------------------------------------------
    def _on_am(self, data: bytes, reply_ep: int) -> None:
        try:
            kind, session, h = proto.decode_envelope(data)
        except RemoteProtocolError as exc:
            log.warning("dropping a malformed UCX control message (%d B): %s", len(data), exc)
            return
        if kind is Msg.HELLO:
            self.worker.defer(self._on_hello, h, session)
            return
        with self._lock:
            link = self._links.get(session)
        if link is None:
            log.info("dropping %s from unknown session %r", kind.name, session)
            return
        self.worker.defer(link.on_message, kind, h, time.perf_counter())

    # -- Backend interface -------------------------------------------------------------------
    def endpoint(self) -> dict[str, Any]:
        return {
            "addr": self.worker.address,
            "session": self.session,
            "regions": self.memory.described(),
        }

    def can_reach(self, peer: PeerMetadata) -> bool:
        ep = peer.backends.get("ucx")
        return isinstance(ep, dict) and isinstance(ep.get("addr"), bytes) and bool(ep.get("regions")) and bool(self.memory.regions)

    def _wants_polling(self, layout: KVLayout | None) -> bool:
        mode = self.config.progress
        if mode is Progress.AUTO:
            return layout is not None and layout.memory is MemoryKind.CUDA
        return mode is Progress.POLL

    def on_layout_registered(self, layout: KVLayout) -> None:
        if self._wants_polling(layout):
            # AUTO with GPU memory: restart the progress thread busy-polling (before any peer,
            # which is why a layout is registered before connect)
            self.worker.poll()
        self.memory.register(layout)
        self.layout = layout

    def choose_packed(self, plan: TransferPlan) -> bool:
        """Whether ``plan`` moves packed (see :class:`~kvxfer.backends.ucx.config.TransferMode`)."""
        return self._packs(plan.nbytes, plan.nruns)

    def _packs(self, nbytes: int, nruns: int) -> bool:
        """Whether a transfer of ``nbytes`` in ``nruns`` contiguous ranges moves packed."""
        mode = self.config.mode
        if mode is not TransferMode.AUTO:
            return mode is TransferMode.PACKED
        need = self._runs_to_pack(nbytes)
        return need is not None and nruns >= need

    def _runs_to_pack(self, nbytes: int) -> int | None:
        """AUTO: the fewest contiguous ranges from which a transfer of ``nbytes`` packs (more
        ranges only make packing likelier); None when it never packs."""
        cfg = self.config
        if nbytes > cfg.staging_max:
            return None
        if self.layout is not None and self.layout.memory is MemoryKind.CUDA:
            # GPU memory: one gather launch and one large RMA beat thousands of RMAs posted from
            # Python (BENCHMARKS.md: 2.7 GB/s for 32 KiB gets one by one, 254 GB/s for one 256 MiB get)
            return cfg.pack_min_ranges
        # host memory: also the ranges must average under pack_below bytes
        return max(cfg.pack_min_ranges, nbytes // cfg.pack_below + 1) if cfg.pack_below else None

    def _runs_deciding(self, nbytes: int) -> int:
        """The run count from which :meth:`_packs` gives ``nbytes`` the same answer for every
        larger count: 0 when runs never change it."""
        if self.config.mode is not TransferMode.AUTO:
            return 0
        return self._runs_to_pack(nbytes) or 0

    def _make_ep(self, addr: bytes, peer: PeerMetadata) -> tuple[Any, bool]:
        mode = self.config.error_handling
        same_host = peer.boot_id == boot_id()
        gpu_both = (self.layout is not None and self.layout.memory is MemoryKind.CUDA
                    and peer.geometry is not None and peer.geometry.memory is MemoryKind.CUDA)
        if mode is ErrorHandling.AUTO and same_host and gpu_both:
            # UCX's cuda_ipc lanes carry no peer-failure handling: an endpoint that asks for it
            # moves GPU memory over tcp. Same host: go without it and watch the peer's pid.
            mode = ErrorHandling.NONE
        if mode is not ErrorHandling.NONE:
            try:
                return self.worker.endpoint(addr, True), True
            except Exception as exc:
                if mode is ErrorHandling.PEER or not same_host:
                    raise PeerLostError(f"UCX cannot reach {peer.name!r} with error handling on: {exc!r}") from None
                log.info("UCX reaches %r only without error handling (shared memory?); watching its pid", peer.name)
        try:
            return self.worker.endpoint(addr, False), False
        except Exception as exc:
            raise PeerLostError(f"UCX cannot reach {peer.name!r}: {exc!r}") from None

    def _register(self, link: UcxLink, session: str) -> None:
        with self._lock:
            old = self._links.get(session)
            self._links[session] = link
        if old is not None:
            old.close(PeerLostError(f"peer {link.peer.name!r} reconnected"))
        if link.error_handling:
            link.ep.set_close_callback(self._on_ep_closed, cb_args=(weakref.ref(link),))

    def _on_ep_closed(self, ref: weakref.ref, *args: Any) -> None:
        link = ref()
        if link is not None and not link.closed:
            link.ep_failed = True
            self.worker.defer(link.close, PeerLostError(f"UCX endpoint to {link.peer.name!r} failed (peer lost)"))

    def connect(self, peer: PeerMetadata, timeout: float) -> UcxLink:
        ep_desc = peer.backends.get("ucx") or {}
        addr, session = ep_desc.get("addr"), ep_desc.get("session")
        if not isinstance(addr, bytes) or not isinstance(session, str):
            raise RemoteProtocolError(f"peer {peer.name!r} advertises a malformed ucx endpoint")
        with self._lock:
            existing = self._links.get(session)
        if existing is not None and existing.incoming and not existing.closed:
            # the peer connected to us already: that link carries both directions (a second
            # endpoint would replace it on the peer's side and fail whatever is pending on it)
            return existing
        ep, eh = self._make_ep(addr, peer)
        link = UcxLink(self._link_ctx, peer, ep, eh)
        self._register(link, session)
        try:
            self.worker.defer(link.hello, self.local.local_metadata().to_bytes(), self.worker.address)
            if not link.ready.wait(timeout):
                raise TransferTimeoutError(f"no UCX handshake answer from {peer.name!r} within {timeout} s")
            if link.closed:
                raise PeerLostError(f"UCX link to {peer.name!r} closed during the handshake")
            if link.refusal is not None:
                raise TransportError(f"peer {peer.name!r} refused the UCX connection: {link.refusal}")
        except BaseException as exc:
            link.close(exc if isinstance(exc, KvxferError) else None)
            raise
        return link

    def _on_hello(self, h: dict, session: str) -> None:
        try:
            hello = proto.decode_hello(h, session)
        except RemoteProtocolError:
            log.warning("dropping a malformed UCX HELLO")
            return
        ok = self.layout is not None
        try:
            peer = PeerMetadata.from_bytes(hello.meta)
            ep, eh = self._make_ep(hello.addr, peer)
        except KvxferError as exc:
            log.warning("dropping a UCX HELLO: %s", exc)
            return
        link = UcxLink(self._link_ctx, peer, ep, eh)
        self._register(link, hello.session)
        link.incoming = True  # connect() to this peer reuses it instead of replacing it
        link.ready.set()
        link.send(Msg.HELLO_ACK, encode(HelloAck(None if ok else "no KV layout registered")))

    def _caller_ready(self) -> Any:
        """GPU memory: an event on the caller's current stream that every access to our blocks
        waits for (call on the caller's thread); None for host memory."""
        if self.layout is None or self.layout.memory is not MemoryKind.CUDA:
            return None
        from ...ops.cuda import caller_ready_event

        return caller_ready_event(self.layout)

    def start_early(self, link: BackendLink, req: TransferRequest, timeout: float) -> Any:
        """A packed read's request goes out before the caller's plan is made: the peer starts
        staging while we validate and plan (0.2-0.4 ms of a 1 GiB read on 2x H200). Only where
        the plan is sure to move packed: same decision (:meth:`_packs`) from the transfer's
        shape, computed without the plan. Returns the token for :meth:`submit_early` /
        :meth:`abandon_early`, or None (the transfer is then submitted as usual)."""
        if (not isinstance(link, UcxLink) or link.closed or req.op is not Op.READ or req.reshard is not None
                or self.layout is None or link.peer.geometry is None):
            return None
        shape = transfer_shape(link.peer.geometry, self.layout.geometry, req.src_blocks, req.dst_blocks, req.layers,
                               enough=self._runs_deciding)
        if shape is None or shape[0] == 0 or not self._packs(*shape):
            return None
        x = link.start_packed_early(req, shape[0], timeout)
        if x is None:
            return None
        try:  # recorded after the post: the request is on the read's critical path, the event is not
            x.ready = self._caller_ready()
        except BaseException:
            link.abandon(x)
            raise
        return link, x

    def submit_early(self, early: Any, plan: TransferPlan, handle: TransferHandle) -> None:
        """The plan and handle of a transfer :meth:`start_early` started."""
        link, x = early
        link.attach(x, plan, handle)

    def abandon_early(self, early: Any) -> None:
        """The caller's plan of an early-started transfer failed: nothing of ours is touched;
        the staging buffer is kept until the peer is done with it (or the link is closed when
        the peer is not done within the transfer's timeout: see :meth:`UcxLink.abandon`)."""
        link, x = early
        link.abandon(x)

    def submit(self, link: BackendLink, req: TransferRequest, plan: TransferPlan, handle: TransferHandle) -> None:
        assert isinstance(link, UcxLink)
        if link.closed:
            raise PeerLostError(f"link to {link.peer.name!r} is closed")
        ready = self._caller_ready() if plan.nbytes else None
        if plan.nbytes and self.choose_packed(plan):
            link.start_packed(req, plan, handle, ready)
        else:
            self.worker.defer(link.start, link.prepare_direct(req, plan, handle, ready))

    # -- closing -----------------------------------------------------------------------------
    def forget(self, link: BackendLink) -> None:
        """Stop routing the peer's messages to ``link`` (closed)."""
        with self._lock:
            for k, v in list(self._links.items()):
                if v is link:
                    del self._links[k]

    def _close_links(self, done: threading.Event) -> None:
        # work thread: say BYE, let it leave (bounded), then close every link
        with self._lock:
            links = [lk for lk in self._links.values() if not lk.closed]
        left = [len(links)]
        flushed = threading.Event()
        count_lock = threading.Lock()

        def one(status: int) -> None:
            with count_lock:
                left[0] -= 1
                if left[0] <= 0:
                    flushed.set()

        for lk in links:
            lk.send(Msg.BYE, encode(Goodbye()))
            self.worker.ucp.flush(lk.ep_handle, one)
        if links:
            self.worker.wake()
            flushed.wait(min(0.5, self.config.close_timeout))
        for lk in links:
            lk.close(PeerLostError("connector closed"))
        done.set()

    def close(self) -> None:
        """Close every link (peers get BYE), stop the threads, release registrations. Idempotent."""
        if self._closed:
            return
        self._closed = True
        done = threading.Event()
        self.worker.defer(self._close_links, done)
        done.wait(2 * self.config.close_timeout)
        self.worker.shutdown(self.config.close_timeout)
        self._watch.join(self.config.close_timeout)
        self.worker.release_endpoints()
        self.memory.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
