"""UCX backend: one-sided RMA on registered KV memory, through ucxx and a small libucp binding.

Layer: backends. ucxx gives the UCX context, the worker, its progress thread and endpoints;
:mod:`kvxfer.backends._ucp` adds what ucxx's Python API lacks: ``ucp_mem_map``/rkeys,
``ucp_get_nbx``/``ucp_put_nbx``, ``ucp_ep_flush_nbx`` and active messages (AM).

How a transfer moves
--------------------
Each connector registers its KV tensors (``ucp_mem_map``) and puts, in its metadata, its UCX
worker address and one (address, length, packed rkey) per tensor. ``connect`` creates ONE
endpoint to the peer's worker address (reused for every transfer), sends HELLO (our metadata)
and waits for HELLO_ACK; the peer opens its own endpoint back to us (with error handling, so
it learns when we die). The initiator unpacks the peer's rkeys once per link.

- DIRECT (few, large ranges): the initiator posts one put (write) or get (read) per coalesced
  range straight between KV tensors, then one ``ucp_ep_flush_nbx``; when the flush completes
  every byte is in place remotely. The responder's Python is not in the data path; a NOTE
  message carrying the notification follows the flush.
- PACKED (many small ranges): the initiator packs into a registered staging buffer (numpy for
  host memory, the one-launch gather kernel of :mod:`kvxfer.ops.cuda` for GPU memory) and sends
  REQ naming the blocks, its staging address and rkey; the responder validates every id
  against its own layout, then moves one buffer with one RMA (get for a write, put for a read)
  between the two staging buffers, scatters/gathers on its side, and answers DONE or ERR.

AUTO picks PACKED when a plan has at least ``pack_min_ranges`` ranges averaging under
``pack_below`` bytes (see ``bench/bench_ucx.py`` for the crossover), else DIRECT.

Control messages are msgpack maps in eager active messages (``_AM_ID``), each naming the
sender's session; malformed ones are dropped with a logged reason. A lost peer (UCX endpoint
error, or for error-handling-free same-host links a vanished pid) fails every pending handle
with PeerLostError; a handle that times out closes its link, since RMA may still land.

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

kvxfer's own settings: :class:`~kvxfer.backends.ucx_config.UcxConfig` (``KVXFER_UCX_*``).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import weakref
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable

import msgpack
import numpy as np

from .._memory import host_bytes
from .._tensors import MemoryKind
from ..errors import (
    BackendUnavailableError,
    BlockIdError,
    KvxferError,
    LayoutError,
    PeerLostError,
    RemoteProtocolError,
    TransferTimeoutError,
    TransportError,
)
from ..handle import Op, TransferHandle
from ..layout import KVLayout
from ..metadata import PeerMetadata
from ..plan import TransferPlan
from ..reshard import HeadReshard
from .base import Backend, BackendLink, LocalSide, TransferRequest, plan_for_responder, remote_error
from .ucx_config import ErrorHandling, TransferMode, UcxConfig, ucx_config

try:  # ucxx is optional: the Connector treats ImportError as "ucx not available"
    import ucxx._lib.libucxx as _ucxx
except Exception as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"ucxx is not importable: {_exc!r}") from None

from . import _ucp

__all__ = ["UcxBackend", "UcxLink"]

log = logging.getLogger(__name__)

_AM_ID = 17
_WIRE_VERSION = 1
_MAX_IDS = 1 << 22


class Msg(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    REQ = 3
    DONE = 4
    ERR = 5
    NOTE = 6
    BYE = 7


def _ids(raw: Any, what: str) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 8 or len(raw) > 8 * _MAX_IDS:
        raise RemoteProtocolError(f"field {what!r} must be packed int64 block ids")
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def _pack_ids(a: np.ndarray) -> bytes:
    return a.astype("<i8").tobytes()


def _lost(status: int, peer: str) -> PeerLostError:
    return PeerLostError(f"UCX operation with {peer!r} failed: {_ucp.status_name(status)}")


# --------------------------------------------------------------------------------------------
# staging buffers
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Staging:
    """A registered contiguous buffer (host numpy or GPU cupy array)."""

    array: Any
    address: int
    nbytes: int
    memh: int
    rkey: bytes


class _StagingPool:
    """Registered staging buffers, reused by size class (powers of two)."""

    def __init__(self, ucp: _ucp.Ucp, context: int, memory: MemoryKind, device: int, keep: int):
        self._ucp, self._ctx, self._memory, self._device, self._keep = ucp, context, memory, device, keep
        self._free: list[_Staging] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> _Staging:
        size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
        with self._lock:
            for i, s in enumerate(self._free):
                if s.nbytes == size:
                    return self._free.pop(i)
        if self._memory is MemoryKind.HOST:
            arr = np.empty(size, dtype=np.uint8)
            addr, mt = int(arr.ctypes.data), _ucp.MemoryType.HOST
        else:
            import cupy

            with cupy.cuda.Device(self._device):
                arr = cupy.empty(size, dtype=cupy.uint8)
            addr, mt = int(arr.data.ptr), _ucp.MemoryType.CUDA
        memh = self._ucp.mem_map(self._ctx, addr, size, mt)
        return _Staging(arr, addr, size, memh, self._ucp.rkey_pack(self._ctx, memh))

    def put(self, s: _Staging) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(s)
                return
        self._ucp.mem_unmap(self._ctx, s.memh)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for s in free:
            self._ucp.mem_unmap(self._ctx, s.memh)


class _Packer:
    """Gather/scatter between a plan's side of this layout and a contiguous staging buffer."""

    def __init__(self, layout: KVLayout):
        self.layout = layout
        self.host = layout.memory is MemoryKind.HOST
        self._views = None if not self.host else [host_bytes(int(a), t.span) for a, t in zip(layout.addrs, layout.geometry.tensors)]
        self._stream: Any = None

    def _gpu_stream(self) -> Any:
        if self._stream is None:
            import cupy

            with cupy.cuda.Device(self.layout.device):
                self._stream = cupy.cuda.Stream(non_blocking=True)
        return self._stream

    def gather(self, plan: TransferPlan, buf: _Staging) -> None:
        if self.host:
            from ..ops.reference import gather

            gather(plan, self._views, buf.array)
        else:
            from ..ops import cuda as ops_cuda

            s = self._gpu_stream()
            ops_cuda.gather(plan, self.layout, buf.array, stream=s, device=self.layout.device)
            s.synchronize()  # UCX reads the buffer outside any stream

    def scatter(self, plan: TransferPlan, buf: _Staging) -> None:
        if self.host:
            from ..ops.reference import scatter

            scatter(plan, buf.array, self._views)
        else:
            from ..ops import cuda as ops_cuda

            s = self._gpu_stream()
            ops_cuda.scatter(plan, buf.array, self.layout, stream=s, device=self.layout.device)
            s.synchronize()


# --------------------------------------------------------------------------------------------
# links
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Xfer:
    """A transfer this side initiated, until its handle finishes."""

    req: TransferRequest
    plan: TransferPlan
    handle: TransferHandle
    staging: _Staging | None = None
    finished: bool = False


@dataclass(eq=False)
class _Serving:
    """A packed transfer the peer initiated, while we serve it."""

    xid: int
    op: Op
    plan: TransferPlan
    notify: bytes | None
    staging: _Staging
    rkey: int
    extra: dict = field(default_factory=dict)


class UcxLink(BackendLink):
    """One peer over one UCX endpoint (ours, reused for every transfer to that peer)."""

    backend_name = "ucx"

    def __init__(self, backend: UcxBackend, peer: PeerMetadata, ep: Any, error_handling: bool):
        self.backend = backend
        self.peer = peer
        self.ep = ep
        self.ep_handle = int(ep.handle)
        self.error_handling = error_handling
        self.ep_failed = False  # UCX reported an error on the endpoint
        self.ready = threading.Event()
        self.refusal: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._mine: dict[int, _Xfer] = {}
        self._serving: dict[int, _Serving] = {}
        self._rkeys: list[_ucp.RemoteKey] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    # -- peer regions -----------------------------------------------------------------------
    def remote_keys(self) -> list[_ucp.RemoteKey]:
        """The peer's tensor regions, rkeys unpacked once on this link's endpoint."""
        if self._rkeys is None:
            regions = self.peer.backends["ucx"].get("regions")
            geom = self.peer.geometry
            if not isinstance(regions, list) or geom is None or len(regions) != len(geom.tensors):
                raise RemoteProtocolError(f"peer {self.peer.name!r} advertises no valid UCX regions")
            keys = []
            for region, t in zip(regions, geom.tensors):
                if not isinstance(region, list) or len(region) != 3:
                    raise RemoteProtocolError(f"peer {self.peer.name!r} advertises a malformed UCX region")
                addr, length, packed = region
                if type(addr) is not int or type(length) is not int or not isinstance(packed, bytes) or length < t.span:
                    raise RemoteProtocolError(f"peer {self.peer.name!r} advertises a malformed UCX region")
                keys.append(_ucp.RemoteKey(addr, length, self.backend.ucp.rkey_unpack(self.ep_handle, packed)))
            self._rkeys = keys
        return self._rkeys

    # -- sending ----------------------------------------------------------------------------
    def send(self, kind: Msg, body: dict[str, Any]) -> None:
        """Send one control message (eager AM). A failed send closes the link."""
        if self._closed and kind is not Msg.BYE:
            return
        data = msgpack.packb({"v": _WIRE_VERSION, "t": int(kind), "s": self.backend.session, **body}, use_bin_type=True)

        def sent(status: int, _keep: bytes = data) -> None:
            if status != 0 and kind is not Msg.BYE:
                self.ep_failed = True
                self.backend.defer(self.close, _lost(status, self.peer.name))

        self.backend.ucp.am_send(self.ep_handle, _AM_ID, data, sent)
        self.backend.wake()

    def send_notification(self, payload: bytes) -> None:
        """Deliver ``payload`` to the peer's notification queue (after earlier transfers' bytes).

        Raises:
            PeerLostError: the link is closed.
        """
        if self._closed:
            raise PeerLostError(f"link to {self.peer.name!r} is closed")
        self.backend.defer(self.send, Msg.NOTE, {"n": bytes(payload)})

    # -- initiator --------------------------------------------------------------------------
    def start(self, req: TransferRequest, plan: TransferPlan, handle: TransferHandle) -> None:
        """Work thread: begin a transfer this side initiated."""
        if self._closed:
            handle.set_failed(PeerLostError(f"link to {self.peer.name!r} is closed"))
            return
        x = _Xfer(req, plan, handle)
        with self._lock:
            self._mine[req.xfer_id] = x
        handle.add_done_callback(lambda h: self._on_handle_done(x, h))
        try:
            if plan.nbytes == 0:
                self._finish_direct(x, 0)
            elif self.backend.choose_packed(plan):
                self._start_packed(x)
            else:
                self._start_direct(x)
        except KvxferError as exc:
            self._fail(x, exc)

    def _ranges(self, plan: TransferPlan, local_side: str) -> tuple[list, list, list, list, list]:
        remote_side = "dst" if local_side == "src" else "src"
        lt, lo, ll = plan.runs(local_side)
        rt, ro, rl = plan.runs(remote_side)
        if not np.array_equal(ll, rl):  # pragma: no cover - compatible layouts have equal runs
            raise TransportError("the two sides' runs differ; this plan can only move packed")
        keys = self.remote_keys()
        layout = self.backend.layout
        laddr = layout.addrs.astype(np.uint64)[lt] + lo.astype(np.uint64)
        rbase = np.array([k.address for k in keys], dtype=np.uint64)
        raddr = rbase[rt] + ro.astype(np.uint64)
        rk = [keys[i].rkey for i in range(len(keys))]
        params = self.backend.tensor_params
        return (laddr.tolist(), raddr.tolist(), ll.tolist(), [rk[i] for i in rt.tolist()], [params[i] for i in lt.tolist()])

    def _start_direct(self, x: _Xfer) -> None:
        put = x.req.op is Op.WRITE
        la, ra, ln, rk, prm = self._ranges(x.plan, "src" if put else "dst")
        try:
            self.backend.ucp.post_rma(put, self.ep_handle, la, ra, ln, rk, prm)
        except _ucp.UcxCallError as exc:
            raise PeerLostError(f"posting RMA to {self.peer.name!r} failed: {exc}") from None
        self.backend.ucp.flush(self.ep_handle, lambda st: self.backend.defer(self._finish_direct, x, st))
        self.backend.wake()

    def _finish_direct(self, x: _Xfer, status: int) -> None:
        if status != 0:
            self.ep_failed = True
            self.close(_lost(status, self.peer.name))
            return
        if x.req.notify is not None:
            self.send(Msg.NOTE, {"n": x.req.notify})
        self._complete(x)

    def _start_packed(self, x: _Xfer) -> None:
        pool, packer = self.backend.staging(), self.backend.packer()
        x.staging = pool.get(x.plan.nbytes)
        if x.req.op is Op.WRITE:
            packer.gather(x.plan, x.staging)
        r = x.req
        self.send(Msg.REQ, {
            "x": r.xfer_id, "op": "w" if r.op is Op.WRITE else "r", "sb": _pack_ids(r.src_blocks),
            "db": _pack_ids(r.dst_blocks), "l": None if r.layers is None else _pack_ids(r.layers),
            "n": r.notify, "a": x.staging.address, "k": x.staging.rkey, "b": x.plan.nbytes,
            "rs": None if r.reshard is None else r.reshard.to_wire(),
        })

    def _on_done(self, xid: int) -> None:
        with self._lock:
            x = self._mine.get(xid)
        if x is None or x.finished:
            return
        if x.req.op is Op.READ:
            assert x.staging is not None
            self.backend.packer().scatter(x.plan, x.staging)
            if x.req.notify is not None:
                self.send(Msg.NOTE, {"n": x.req.notify})
        self._complete(x)

    def _on_err(self, xid: int, kind: str, msg: str) -> None:
        with self._lock:
            x = self._mine.get(xid)
        if x is not None:
            self._fail(x, remote_error(kind, msg))

    def _release(self, x: _Xfer) -> None:
        with self._lock:
            self._mine.pop(x.req.xfer_id, None)
        x.finished = True
        if x.staging is not None:
            s, x.staging = x.staging, None
            self.backend.staging().put(s)

    def _complete(self, x: _Xfer) -> None:
        self._release(x)
        x.handle.set_done()

    def _fail(self, x: _Xfer, exc: KvxferError) -> None:
        self._release(x)
        x.handle.set_failed(exc)

    def _on_handle_done(self, x: _Xfer, h: TransferHandle) -> None:
        if isinstance(h.exception(), TransferTimeoutError) and not x.finished:
            # RMA or the peer's copy may still land: the link is no longer safe to use
            self.backend.defer(self.close, PeerLostError(f"link to {self.peer.name!r} closed after a transfer timed out"))

    # -- responder --------------------------------------------------------------------------
    def on_request(self, h: dict) -> None:
        """Work thread: serve a packed transfer the peer asked for (validated first)."""
        xid, op, notify, addr, key, nbytes = h.get("x"), h.get("op"), h.get("n"), h.get("a"), h.get("k"), h.get("b")
        if (type(xid) is not int or op not in ("r", "w") or not (notify is None or isinstance(notify, bytes))
                or type(addr) is not int or not isinstance(key, bytes) or type(nbytes) is not int):
            raise RemoteProtocolError("malformed REQ")
        layers = h.get("l")
        try:
            reshard = None if h.get("rs") is None else HeadReshard.from_wire(h["rs"])
        except LayoutError as exc:
            raise RemoteProtocolError(str(exc)) from None
        req = TransferRequest(xid, Op.READ if op == "r" else Op.WRITE, _ids(h.get("sb"), "sb"), _ids(h.get("db"), "db"),
                              None if layers is None else _ids(layers, "l"), notify, reshard)
        try:
            plan = plan_for_responder(self.backend.layout, self.peer, req)
            if plan.nbytes != nbytes:
                raise BlockIdError(f"request says {nbytes} B but its blocks hold {plan.nbytes} B")
        except (BlockIdError, LayoutError) as exc:
            log.info("refusing transfer %d from %r: %s", xid, self.peer.name, exc)
            self.send(Msg.ERR, {"x": xid, "k": type(exc).__name__, "m": str(exc)})
            return
        if plan.nbytes == 0:
            self._served(_Serving(xid, req.op, plan, notify, None, 0), 0)  # type: ignore[arg-type]
            return
        staging = self.backend.staging().get(plan.nbytes)
        try:
            rkey = self.backend.ucp.rkey_unpack(self.ep_handle, key)
        except _ucp.UcxCallError as exc:
            self.backend.staging().put(staging)
            self.send(Msg.ERR, {"x": xid, "k": "RemoteProtocolError", "m": f"bad staging rkey: {exc}"})
            return
        s = _Serving(xid, req.op, plan, notify, staging, rkey)
        with self._lock:
            self._serving[xid] = s
        if req.op is Op.READ:
            self.backend.packer().gather(plan, staging)
        put = req.op is Op.READ
        try:
            self.backend.ucp.post_rma(put, self.ep_handle, [staging.address], [addr], [plan.nbytes], [rkey],
                                      [self.backend.ucp.request_param(staging.memh)])
        except _ucp.UcxCallError as exc:
            self.close(PeerLostError(f"RMA with {self.peer.name!r} failed: {exc}"))
            return
        self.backend.ucp.flush(self.ep_handle, lambda st: self.backend.defer(self._served, s, st))
        self.backend.wake()

    def _served(self, s: _Serving, status: int) -> None:
        with self._lock:
            self._serving.pop(s.xid, None)
        try:
            if status != 0:
                self.ep_failed = True
                self.close(_lost(status, self.peer.name))
                return
            if s.op is Op.WRITE:
                if s.staging is not None:
                    self.backend.packer().scatter(s.plan, s.staging)
                if s.notify is not None:
                    self.backend.local.deliver_notification(self.peer.name, s.notify)
            self.send(Msg.DONE, {"x": s.xid})
        finally:
            if s.staging is not None:
                self.backend.ucp.rkey_destroy(s.rkey)
                self.backend.staging().put(s.staging)

    # -- incoming dispatch -------------------------------------------------------------------
    def on_message(self, kind: Msg, h: dict) -> None:
        """Work thread: one validated-envelope control message from this link's peer."""
        if kind is Msg.HELLO_ACK:
            ok, m = h.get("ok"), h.get("m")
            self.refusal = None if ok is True else str(m)
            self.ready.set()
        elif kind is Msg.REQ:
            self.on_request(h)
        elif kind is Msg.DONE:
            if type(h.get("x")) is not int:
                raise RemoteProtocolError("malformed DONE")
            self._on_done(h["x"])
        elif kind is Msg.ERR:
            xid, k, m = h.get("x"), h.get("k"), h.get("m")
            if type(xid) is not int or not isinstance(k, str) or not isinstance(m, str):
                raise RemoteProtocolError("malformed ERR")
            self._on_err(xid, k, m)
        elif kind is Msg.NOTE:
            n = h.get("n")
            if not isinstance(n, bytes):
                raise RemoteProtocolError("NOTE without a bytes payload")
            self.backend.local.deliver_notification(self.peer.name, n)
        elif kind is Msg.BYE:
            self.close(PeerLostError(f"peer {self.peer.name!r} closed the connection"))
        else:
            raise RemoteProtocolError(f"unexpected {kind.name} on an established link")

    # -- closing -----------------------------------------------------------------------------
    def close(self, exc: KvxferError | None = None) -> None:
        """Close the link; pending transfers fail with ``exc`` (PeerLostError by default).

        Runs on the backend's work thread (the only thread that touches the endpoint); from
        any other thread it hands over and waits up to ``close_timeout``. Idempotent.
        """
        if self._closed:
            return
        if self.backend.on_work_thread():
            self._close_now(exc)
            return
        done = threading.Event()
        self.backend.defer(lambda: (self._close_now(exc), done.set()))
        done.wait(self.backend.config.close_timeout)

    def _close_now(self, exc: KvxferError | None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            mine, self._mine = list(self._mine.values()), {}
            serving, self._serving = list(self._serving.values()), {}
        err = exc or PeerLostError(f"link to {self.peer.name!r} closed")
        self.ready.set()
        for x in mine:
            x.finished = True
            x.handle.set_failed(err)
        self.backend.forget(self)
        self.backend.local.link_lost(self, err)
        # staging of interrupted transfers is not reused: UCX may still touch it
        for s in serving:
            if s.staging is not None:
                self.backend.ucp.rkey_destroy(s.rkey)
        if self._rkeys is not None:
            for k in self._rkeys:
                self.backend.ucp.rkey_destroy(k.rkey)
            self._rkeys = None
        self.backend.close_endpoint(self.ep, failed=self.ep_failed)

    def hello(self, meta: bytes, addr: bytes) -> None:
        """Work thread: unpack the peer's rkeys and send HELLO."""
        try:
            self.remote_keys()
        except KvxferError as exc:
            self.refusal = str(exc)
            self.ready.set()
            return
        self.send(Msg.HELLO, {"meta": meta, "addr": addr})


# --------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------
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
        self._pool: _StagingPool | None = None
        self._packer: _Packer | None = None
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._am_cb = self.ucp.set_am_handler(self._worker_h, _AM_ID, self._on_am)
        self._worker.start_progress_thread(polling_mode=False, epoll_timeout=self.config.wakeup_ms)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work_loop, name="kvxfer-ucx-work", daemon=True)
        self._thread.start()
        self._watch = threading.Thread(target=self._watch_loop, name="kvxfer-ucx-watch", daemon=True)
        self._watch.start()
        self._finalizer = weakref.finalize(self, UcxBackend._shutdown, self._worker, self._stop, self._work)

    # -- plumbing ----------------------------------------------------------------------------
    def wake(self) -> None:
        """Wake the progress thread after posting from another thread."""
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
        # same-host peers on links without UCX error handling: is their process still there?
        while not self._stop.wait(self.config.liveness_interval):
            with self._lock:
                links = [lk for lk in self._links.values() if not lk.error_handling]
            for lk in links:
                if lk.peer.boot_id == self.local.local_metadata().boot_id and not _pid_alive(lk.peer.pid):
                    lk.ep_failed = True  # closing an endpoint to a dead peer without error handling may abort
                    self.defer(lk.close, PeerLostError(f"peer {lk.peer.name!r} (pid {lk.peer.pid}) is gone"))

    # -- active messages (progress thread) ---------------------------------------------------
    def _on_am(self, data: bytes, reply_ep: int) -> None:
        try:
            h = msgpack.unpackb(data, raw=False, strict_map_key=True)
            if not isinstance(h, dict) or h.get("v") != _WIRE_VERSION:
                raise RemoteProtocolError(f"message version {h.get('v') if isinstance(h, dict) else None!r}")
            kind, session = Msg(h.get("t")), h.get("s")
            if not isinstance(session, str):
                raise RemoteProtocolError("message without a sender session")
        except Exception as exc:
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
        self.defer(link.on_message, kind, h)

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

    def on_layout_registered(self, layout: KVLayout) -> None:
        mt = _ucp.MemoryType.HOST if layout.memory is MemoryKind.HOST else _ucp.MemoryType.CUDA
        for addr, t in zip(layout.addrs.tolist(), layout.geometry.tensors):
            memh = self.ucp.mem_map(self._ctx_h, int(addr), t.span, mt)
            self._regions.append(_ucp.MemRegion(int(addr), t.span, memh, self.ucp.rkey_pack(self._ctx_h, memh)))
            self.tensor_params.append(self.ucp.request_param(memh))
        self.layout = layout

    def staging(self) -> _StagingPool:
        if self._pool is None:
            assert self.layout is not None
            self._pool = _StagingPool(self.ucp, self._ctx_h, self.layout.memory, self.layout.device, self.config.staging_cache)
        return self._pool

    def packer(self) -> _Packer:
        if self._packer is None:
            assert self.layout is not None
            self._packer = _Packer(self.layout)
        return self._packer

    def choose_packed(self, plan: TransferPlan) -> bool:
        """Whether ``plan`` moves packed (see :class:`~kvxfer.backends.ucx_config.TransferMode`)."""
        mode = self.config.mode
        if mode is not TransferMode.AUTO:
            return mode is TransferMode.PACKED
        nruns = int(plan.jobs["src_count"].sum()) if plan.jobs.size else 0
        return (nruns >= self.config.pack_min_ranges and plan.nbytes < self.config.pack_below * nruns
                and plan.nbytes <= self.config.staging_max)

    def _make_ep(self, addr: bytes, peer: PeerMetadata) -> tuple[Any, bool]:
        mode = self.config.error_handling
        ua = _ucxx.UCXAddress.create_from_buffer(addr)
        if mode is not ErrorHandling.NONE:
            try:
                return _ucxx.UCXEndpoint.create_from_worker_address(self._worker, ua, True), True
            except Exception as exc:
                same_host = peer.boot_id == self.local.local_metadata().boot_id
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
        meta, addr, session = h.get("meta"), h.get("addr"), h.get("s")
        if not isinstance(meta, bytes) or not isinstance(addr, bytes):
            log.warning("dropping a malformed UCX HELLO")
            return
        try:
            peer = PeerMetadata.from_bytes(meta)
            ep, eh = self._make_ep(addr, peer)
        except KvxferError as exc:
            log.warning("dropping a UCX HELLO: %s", exc)
            return
        link = UcxLink(self, peer, ep, eh)
        self._register(link, session)
        ok = self.layout is not None
        link.send(Msg.HELLO_ACK, {"ok": ok, "m": None if ok else "no KV layout registered"})

    def submit(self, link: BackendLink, req: TransferRequest, plan: TransferPlan, handle: TransferHandle) -> None:
        assert isinstance(link, UcxLink)
        if link.closed:
            raise PeerLostError(f"link to {link.peer.name!r} is closed")
        self.defer(link.start, req, plan, handle)

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
