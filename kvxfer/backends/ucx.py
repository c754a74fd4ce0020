"""UCX backend: one-sided RMA on registered KV memory, through ucxx and a small libucp binding.

Layer: backends. ucxx gives the UCX context, the worker, its progress thread and endpoints;
:mod:`kvxfer.backends._ucp` adds what ucxx's Python API lacks: ``ucp_mem_map``/rkeys,
``ucp_get_nbx``/``ucp_put_nbx``, ``ucp_ep_flush_nbx`` and active messages (AM).

This module is the backend: context, worker, progress and work threads, registration of the
KV tensors, connect and the answer to a peer's HELLO, the pid watch, shutdown. The rest:

- :mod:`kvxfer.backends.ucx_link`: one peer's link and the DIRECT and PACKED transfer paths
  (how a transfer moves is told there);
- :mod:`kvxfer.backends.ucx_staging`: registered staging buffers and the packer;
- :mod:`kvxfer.backends.ucx_protocol`: control messages, encoded and checked without I/O;
- :mod:`kvxfer.backends.ucx_config`: kvxfer's own settings (``KVXFER_UCX_*``).

AUTO picks PACKED when a plan has at least ``pack_min_ranges`` ranges averaging under
``pack_below`` bytes (see ``bench/bench_ucx.py`` for the crossover), else DIRECT.

Control messages arrive on the progress thread (:meth:`UcxBackend._on_am`) and are handed to
the work thread; malformed ones are dropped with a logged reason. A lost peer (UCX endpoint
error, or for error-handling-free same-host links a vanished pid) fails every pending handle
with PeerLostError.

UCX configuration (docs)
------------------------
UCX reads its own ``UCX_*`` variables when the backend starts (one UCX context per connector):

- ``UCX_TLS``: transports. ``tcp`` (anywhere), ``sm`` or ``posix,cma``/``sysv`` (same host,
  shared memory), ``cuda_copy,cuda_ipc`` (GPU memory; cuda_ipc between GPUs of one host),
  ``rc,ud`` or ``ib`` (InfiniBand/RoCE verbs). Typical: ``UCX_TLS=tcp,sm,cuda_copy,cuda_ipc``
  on one host, ``UCX_TLS=rc,sm,cuda_copy,cuda_ipc`` across an IB fabric.
- ``UCX_NET_DEVICES``: which NICs, e.g. ``mlx5_0:1`` or ``eth0``; default: all.
- ``UCX_TCP_CM_REUSEADDR``, ``UCX_KEEPALIVE_INTERVAL`` (peer-failure detection period),
  ``UCX_RNDV_THRESH``, ``UCX_LOG_LEVEL=info`` (print the transports each endpoint uses).
- PyPI's ``libucx`` has tcp, shared memory, cuda_copy and cuda_ipc but NO verbs. For
  InfiniBand/RoCE install a system UCX (>= 1.15, built with verbs and CUDA) and set
  ``RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true`` so that ``libucx`` loads it.
- Shared-memory transports have no UCX peer-failure handler. With error handling on (the
  default), UCX 1.21 therefore moves even same-host traffic over tcp when tcp is allowed.
  With ``UCX_TLS=sm`` alone, endpoints are created WITHOUT error handling
  (``KVXFER_UCX_ERROR_HANDLING=auto``) and a same-host peer is watched by pid: a peer that
  dies while idle fails the link cleanly, but a peer that dies while an RMA is in flight makes
  UCX abort this process (UCX treats transport errors as fatal without error handling). Use
  sm-only only where both processes live and die together.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from typing import Any, Callable

from .._tensors import MemoryKind
from ..errors import (
    BackendUnavailableError,
    KvxferError,
    PeerLostError,
    RemoteProtocolError,
    TransferTimeoutError,
    TransportError,
)
from ..handle import Op, TransferHandle
from ..layout import KVLayout
from ..metadata import PeerMetadata, boot_id
from ..plan import TransferPlan, transfer_shape
from .base import Backend, BackendLink, LocalSide, TransferRequest
from .ucx_config import ErrorHandling, Progress, TransferMode, UcxConfig, ucx_config

try:  # ucxx is optional: the Connector treats ImportError as "ucx not available"
    import ucxx._lib.libucxx as _ucxx
except Exception as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"ucxx is not importable: {_exc!r}") from None

from . import _ucp
from . import ucx_protocol as proto
from .ucx_link import UcxLink
from .ucx_protocol import Msg
from .ucx_staging import Packer, StagingPool

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
        self.ucp = _ucp.load()
        self.session = f"{os.getpid():x}-{id(self):x}-{os.urandom(4).hex()}"
        try:
            feats = (_ucxx.Feature.AM, _ucxx.Feature.RMA, _ucxx.Feature.WAKEUP)
            self._ctx = _ucxx.UCXContext({}, feature_flags=feats)
            self._worker = _ucxx.UCXWorker(self._ctx)
        except Exception as exc:
            raise BackendUnavailableError(f"UCX could not start: {exc!r}") from None
        self._ctx_h = int(self._ctx.handle)
        self._worker_h = int(self._worker.handle)
        self._address = self._worker.address.tobytes()
        self._old_eps: list[Any] = []
        self._links: dict[str, UcxLink] = {}
        self._by_ep: dict[int, UcxLink] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._regions: list[_ucp.MemRegion] = []
        self.tensor_params: list[Any] = []
        self.layout: KVLayout | None = None
        self._pool: StagingPool | None = None
        self._packer: Packer | None = None
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._am_cb = self.ucp.set_am_handler(self._worker_h, proto.AM_ID, self._on_am)
        self._polling = self._wants_polling(local.layout)
        self._worker.start_progress_thread(polling_mode=self._polling, epoll_timeout=self.config.wakeup_ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work_loop, name="kvxfer-ucx-work", daemon=True)
        self._thread.start()
        self._watch = threading.Thread(target=self._watch_loop, name="kvxfer-ucx-watch", daemon=True)
        self._watch.start()
        self._finalizer = weakref.finalize(self, UcxBackend._shutdown, self._worker, self._stop, self._work)

    # -- plumbing ----------------------------------------------------------------------------
    def wake(self) -> None:
        """Wake the progress thread after posting from another thread (a busy-polling one never
        sleeps: no signal, one system call less on every post)."""
        if not self._polling:
            self.ucp.signal(self._worker_h)

    def defer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the work thread (never on the progress thread)."""
        self._work.put((fn, args))

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except RemoteProtocolError as exc:
                # the link is an argument, or the object whose bound method this is (link.on_message)
                link = next((a for a in (*args, getattr(fn, "__self__", None)) if isinstance(a, UcxLink)), None)
                log.warning("dropping link to %r: %s", getattr(getattr(link, "peer", None), "name", "?"), exc)
                if link is not None:
                    link.close(PeerLostError(f"link to {link.peer.name!r} dropped: {exc}"))
            except KvxferError as exc:
                log.warning("UCX work item failed: %s", exc)
            except Exception:
                log.exception("unexpected error in the UCX work thread")

    def _watch_loop(self) -> None:
        # every liveness_interval: abandoned reads past their deadline (UcxLink.overdue), and
        # same-host peers on links without UCX error handling: is their process still there?
        while not self._stop.wait(self.config.liveness_interval):
            with self._lock:
                links = list(self._links.values())
            now = time.monotonic()
            for lk in links:
                x = lk.overdue(now)
                if x is not None:
                    self.defer(lk.close_overdue, x)
                if not lk.error_handling and lk.peer.boot_id == boot_id() and not _pid_alive(lk.peer.pid):
                    lk.ep_failed = True  # closing an endpoint to a dead peer without error handling may abort
                    self.defer(lk.close, PeerLostError(f"peer {lk.peer.name!r} (pid {lk.peer.pid}) is gone"))

    # -- active messages (progress thread) ---------------------------------------------------
    def _on_am(self, data: bytes, reply_ep: int) -> None:
        try:
            kind, session, h = proto.decode_envelope(data)
        except RemoteProtocolError as exc:
            log.warning("dropping a malformed UCX control message (%d B): %s", len(data), exc)
            return
        if kind is Msg.HELLO:
            self.defer(self._on_hello, h)
            return
        with self._lock:
            link = self._links.get(session)
        if link is None:
            log.info("dropping %s from unknown session %r", kind.name, session)
            return
        self.defer(link.on_message, kind, h, time.perf_counter())

    # -- Backend interface -------------------------------------------------------------------
    def endpoint(self) -> dict[str, Any]:
        return {
            "addr": self._address,
            "session": self.session,
            "regions": [[r.address, r.length, r.rkey] for r in self._regions],
        }

    def can_reach(self, peer: PeerMetadata) -> bool:
        ep = peer.backends.get("ucx")
        return isinstance(ep, dict) and isinstance(ep.get("addr"), bytes) and bool(ep.get("regions")) and bool(self._regions)

    def _wants_polling(self, layout: KVLayout | None) -> bool:
        mode = self.config.progress
        if mode is Progress.AUTO:
            return layout is not None and layout.memory is MemoryKind.CUDA
        return mode is Progress.POLL

    def on_layout_registered(self, layout: KVLayout) -> None:
        if self._wants_polling(layout) and not self._polling:
            # AUTO with GPU memory: restart the progress thread busy-polling (before any peer,
            # which is why a layout is registered before connect)
            self._worker.stop_progress_thread()
            self._worker.start_progress_thread(polling_mode=True, epoll_timeout=self.config.wakeup_ms)
            self._polling = True
        mt = _ucp.MemoryType.HOST if layout.memory is MemoryKind.HOST else _ucp.MemoryType.CUDA
        for addr, t in zip(layout.addrs.tolist(), layout.geometry.tensors):
            memh = self.ucp.mem_map(self._ctx_h, int(addr), t.span, mt)
            self._regions.append(_ucp.MemRegion(int(addr), t.span, memh, self.ucp.rkey_pack(self._ctx_h, memh)))
            self.tensor_params.append(self.ucp.request_param(memh))
        self.layout = layout

    def staging(self) -> StagingPool:
        """The registered staging buffers (made at first use, from any thread)."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    assert self.layout is not None
                    self._pool = StagingPool(self.ucp, self._ctx_h, self.layout.memory, self.layout.device,
                                             self.config.staging_cache)
        return self._pool

    def packer(self) -> Packer:
        if self._packer is None:
            assert self.layout is not None
            self._packer = Packer(self.layout)
        return self._packer

    def choose_packed(self, plan: TransferPlan) -> bool:
        """Whether ``plan`` moves packed (see :class:`~kvxfer.backends.ucx_config.TransferMode`)."""
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
        ua = _ucxx.UCXAddress.create_from_buffer(addr)
        same_host = peer.boot_id == boot_id()
        gpu_both = (self.layout is not None and self.layout.memory is MemoryKind.CUDA
                    and peer.geometry is not None and peer.geometry.memory is MemoryKind.CUDA)
        if mode is ErrorHandling.AUTO and same_host and gpu_both:
            # UCX's cuda_ipc lanes carry no peer-failure handling: an endpoint that asks for it
            # moves GPU memory over tcp. Same host: go without it and watch the peer's pid.
            mode = ErrorHandling.NONE
        if mode is not ErrorHandling.NONE:
            try:
                return _ucxx.UCXEndpoint.create_from_worker_address(self._worker, ua, True), True
            except Exception as exc:
                if mode is ErrorHandling.PEER or not same_host:
                    raise PeerLostError(f"UCX cannot reach {peer.name!r} with error handling on: {exc!r}") from None
                log.info("UCX reaches %r only without error handling (shared memory?); watching its pid", peer.name)
        try:
            return _ucxx.UCXEndpoint.create_from_worker_address(self._worker, ua, False), False
        except Exception as exc:
            raise PeerLostError(f"UCX cannot reach {peer.name!r}: {exc!r}") from None

    def _register(self, link: UcxLink, session: str) -> None:
        with self._lock:
            old = self._links.get(session)
            self._links[session] = link
            self._by_ep[link.ep_handle] = link
        if old is not None:
            old.close(PeerLostError(f"peer {link.peer.name!r} reconnected"))
        if link.error_handling:
            link.ep.set_close_callback(self._on_ep_closed, cb_args=(weakref.ref(link),))

    def _on_ep_closed(self, ref: weakref.ref, *args: Any) -> None:
        link = ref()
        if link is not None and not link.closed:
            link.ep_failed = True
            self.defer(link.close, PeerLostError(f"UCX endpoint to {link.peer.name!r} failed (peer lost)"))

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
        link = UcxLink(self, peer, ep, eh)
        self._register(link, session)
        try:
            self.defer(link.hello, self.local.local_metadata().to_bytes(), self._address)
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

    def _on_hello(self, h: dict) -> None:
        try:
            hello = proto.decode_hello(h)
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
        link = UcxLink(self, peer, ep, eh)
        self._register(link, hello.session)
        link.incoming = True  # connect() to this peer reuses it instead of replacing it
        link.ready.set()
        link.send(Msg.HELLO_ACK, proto.hello_ack_body(ok, None if ok else "no KV layout registered"))

    def _caller_ready(self) -> Any:
        """GPU memory: an event on the caller's current stream that every access to our blocks
        waits for (call on the caller's thread); None for host memory."""
        if self.layout is None or self.layout.memory is not MemoryKind.CUDA:
            return None
        from ..ops.cuda import caller_ready_event

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
            self.defer(link.start, req, plan, handle, ready)

    # -- closing -----------------------------------------------------------------------------
    def forget(self, link: UcxLink) -> None:
        with self._lock:
            for k, v in list(self._links.items()):
                if v is link:
                    del self._links[k]
            self._by_ep.pop(link.ep_handle, None)

    def close_endpoint(self, ep: Any, failed: bool) -> None:
        """Close a link's endpoint (work thread). A failed endpoint is being torn down by
        ucxx's own error path on the progress thread: closing it again races that (and
        crashed in testing), so it is only kept referenced until the worker stops."""
        self._old_eps.append(ep)
        try:
            if failed or not ep.alive:
                return
            ep.remove_close_callback()
            ep.close()
        except Exception as exc:
            log.debug("closing a UCX endpoint: %r", exc)

    @staticmethod
    def _shutdown(worker: Any, stop: threading.Event, work: queue.SimpleQueue) -> None:
        stop.set()
        work.put(None)
        try:
            worker.stop_progress_thread()
        except Exception:
            log.debug("stopping the UCX progress thread", exc_info=True)

    def on_work_thread(self) -> bool:
        return threading.current_thread() is self._thread or not self._thread.is_alive()

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
            lk.send(Msg.BYE, {})
            self.ucp.flush(lk.ep_handle, one)
        if links:
            self.wake()
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
        self.defer(self._close_links, done)
        done.wait(2 * self.config.close_timeout)
        self._finalizer()
        self._thread.join(self.config.close_timeout)
        self._watch.join(self.config.close_timeout)
        self._old_eps.clear()
        if self._pool is not None:
            self._pool.close()
        for r in self._regions:
            self.ucp.mem_unmap(self._ctx_h, r.memh)
        self._regions = []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
