"""CUDA IPC backend: GPU to GPU on one host, one kernel launch per transfer.

Layer: backends. Each side exports ``cudaIpcGetMemHandle`` handles for the allocations holding
its registered tensors (allocation + offset, since caching allocators hand out pieces of larger
allocations) and puts them in its endpoint. The side that starts a transfer (the *initiator*)
maps the peer's allocations once, on its own device, when it connects, and then moves all
blocks of a transfer with ONE launch of the block-to-block kernel (:func:`kvxfer.ops.cuda.copy_jobs`)
that reads the peer's memory (``read``, pull) or writes it (``write``, push) over NVLink/PCIe.

Ordering and completion: the launch goes to a private non-blocking stream that first waits
for an event recorded on the caller's current stream (torch's or CuPy's), so the copy starts
after the work already queued there but does not hold that stream up. A completion thread
synchronises each transfer's end event (the GIL is released while it waits), then sends the
notification over the control link and completes the handle: the peer hears about a transfer
only once every byte is in place. A small transfer is finished by its caller instead, once
``wait()`` sees its event complete; the completion thread is not woken for it and only sweeps
such transfers, so that one nobody waits for still finishes (see :mod:`._completion_thread`).

Control: a TCP control connection (no data streams) to the peer's TCP endpoint carries
notifications and tells us when the peer goes away; a lost peer fails every pending transfer
as soon as its kernel is done (a queued kernel cannot be recalled; failing later would
let it write blocks the caller already reused), or at their deadline; the peer's mappings are
closed as soon as no launched kernel can still touch them.

Validation: every remote block id is checked against the peer's geometry by the planner, and
every job's byte range against the peer's registered tensor spans, which were checked against
the sizes of the mapped allocations when connecting. A peer can never name an address.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._tensors import MemoryKind
from ..errors import (
    BackendUnavailableError,
    BlockIdError,
    KvxferError,
    LayoutError,
    PeerLostError,
    TransferTimeoutError,
    TransportError,
)
from ..handle import Op, TransferHandle
from ..layout import KVLayout
from ..metadata import PeerMetadata, boot_id
from ..plan import BlockPairs, TransferPlan, block_id_range
from .._memo import IdentityMemo
from ..ops import cuda as _ops_cuda  # imports neither cupy nor torch
from ..ops import pairs as _ops_pairs
from . import _cuda_ipc_handles as ipc
from ._completion_thread import CompletionThread
from ._ordered_completion import OrderedCompletion
from .base import Backend, BackendLink, LocalSide, TransferRequest
from .tcp import TcpBackend, TcpLink

__all__ = ["CudaIpcBackend", "CudaIpcLink", "ENDPOINT_VERSION", "backend_of"]

log = logging.getLogger(__name__)

ENDPOINT_VERSION = 1
_EVENT_DISABLE_TIMING = 0x02
_STREAM_NON_BLOCKING = 0x01
_MAX_ALLOCATIONS = 1 << 16


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"the cuda_ipc backend needs CuPy (pip install cupy-cuda13x): {exc}") from None
    return cupy


# --------------------------------------------------------------------------------------------
# endpoint (what a peer learns about our memory)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _PeerEndpoint:
    """A peer's cuda_ipc endpoint, validated."""

    bus: str
    device: int
    handles: tuple[bytes, ...]
    sizes: tuple[int, ...]
    tensors: tuple[tuple[int, int], ...]


def _parse_endpoint(peer: PeerMetadata) -> _PeerEndpoint:
    """Validate ``peer``'s cuda_ipc endpoint against its geometry.

    Raises:
        BackendUnavailableError: no endpoint, or the peer could not export its memory.
        TransportError: the endpoint is malformed.
    """
    ep = peer.backends.get("cuda_ipc")
    if not isinstance(ep, dict):
        raise BackendUnavailableError(f"peer {peer.name!r} does not run the cuda_ipc backend")
    if ep.get("v") != ENDPOINT_VERSION:
        raise TransportError(f"peer {peer.name!r} speaks cuda_ipc endpoint version {ep.get('v')!r}; expected {ENDPOINT_VERSION}")
    err = ep.get("err")
    if err is not None:
        raise BackendUnavailableError(f"peer {peer.name!r} cannot share its KV memory through CUDA IPC: {err}")
    bus, dev, handles, sizes, tensors = ep.get("bus"), ep.get("dev"), ep.get("h"), ep.get("z"), ep.get("t")
    ntensors = 0 if peer.geometry is None else len(peer.geometry.tensors)
    ok = (
        isinstance(bus, str) and len(bus) < 64 and type(dev) is int
        and isinstance(handles, list) and isinstance(sizes, list) and isinstance(tensors, list)
        and 0 < len(handles) == len(sizes) <= _MAX_ALLOCATIONS and len(tensors) == ntensors
        and all(isinstance(h, bytes) and len(h) == ipc.IPC_HANDLE_BYTES for h in handles)
        and all(type(z) is int and 0 < z < 1 << 62 for z in sizes)
        and all(isinstance(t, list) and len(t) == 2 and all(type(v) is int for v in t) for t in tensors)
    )
    if not ok:
        raise TransportError(f"peer {peer.name!r} advertises a malformed cuda_ipc endpoint")
    assert peer.geometry is not None
    for i, ((ai, off), geom) in enumerate(zip(tensors, peer.geometry.tensors)):
        if not 0 <= ai < len(handles) or off < 0 or off + geom.span > sizes[ai]:
            raise TransportError(
                f"peer {peer.name!r} places tensor {i} ({geom.span} B) at offset {off} of allocation {ai}, "
                "outside that allocation"
            )
    return _PeerEndpoint(bus, dev, tuple(handles), tuple(sizes), tuple((int(a), int(o)) for a, o in tensors))


def _check_within(jobs: np.ndarray, side: str, spans: np.ndarray, whose: str) -> None:
    """Every byte that ``jobs`` touch on ``side`` must lie inside the registered tensor spans.

    Raises:
        BlockIdError: a job names an unknown tensor or bytes outside its span.
    """
    if jobs.size == 0:
        return
    t = jobs[f"{side}_t"]
    if int(t.min()) < 0 or int(t.max()) >= spans.size:
        raise BlockIdError(f"the transfer names {whose} tensor {int(t.max())}; {whose} side has {spans.size}")
    off = jobs[f"{side}_off"]
    end = off + (jobs[f"{side}_count"] - 1) * jobs[f"{side}_stride"] + jobs[f"{side}_run"]
    bad = (off < 0) | (end > spans[t]) | (jobs[f"{side}_run"] < 1) | (jobs[f"{side}_count"] < 1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise BlockIdError(
            f"the transfer would touch bytes [{int(off[j])}, {int(end[j])}) of {whose} tensor {int(t[j])}, "
            f"outside its registered {int(spans[t[j]])} B"
        )


_LIMITS: IdentityMemo[int] = IdentityMemo(1024)  # (pairs, side, spans) -> largest safe block id


def _largest_safe_block(pairs: np.ndarray, side: str, spans: np.ndarray) -> int:
    """The largest block id whose every (tensor, segment) pair stays inside the registered spans
    on ``side`` (-1 if none does, or a pair names an unknown tensor). Cached per pairs array
    (the planner caches those per layout pair), so a transfer pays one comparison. Read-only
    span arrays (a link's, the backend's) are keyed by identity, others by value."""
    if spans.flags.writeable:
        return _LIMITS.get((pairs,), (side, spans.tobytes()), lambda: _safe_block_limit(pairs, side, spans))
    return _LIMITS.get((pairs, spans), side, lambda: _safe_block_limit(pairs, side, spans))


def _safe_block_limit(pairs: np.ndarray, side: str, spans: np.ndarray) -> int:
    t = pairs["t"]
    if pairs.size == 0:
        return int(np.iinfo(np.int64).max)
    if int(t.min()) < 0 or int(t.max()) >= spans.size:
        return -1
    room = spans[t] - pairs[f"{side}_off"] - (pairs[f"{side}_count"] - 1) * pairs[f"{side}_stride"] - pairs[f"{side}_run"]
    bstride = pairs[f"{side}_bstride"]
    per = np.where(room < 0, -1, np.where(bstride > 0, room // np.maximum(bstride, 1), np.iinfo(np.int64).max))
    return int(per.min())


def _check_pairs_within(bp: BlockPairs, side: str, spans: np.ndarray, whose: str) -> None:
    """The compact form of :func:`_check_within`: the furthest byte any block of ``bp`` reaches
    on ``side``, per (tensor, segment) pair, must lie inside that tensor's registered span.

    Raises:
        BlockIdError: a pair names an unknown tensor or reaches outside its span.
    """
    ids = bp.src_blocks if side == "src" else bp.dst_blocks
    if ids.size == 0 or bp.pairs.size == 0:
        return
    lo, hi = block_id_range(ids)
    if lo >= 0 and hi <= _largest_safe_block(bp.pairs, side, spans):
        return
    p = bp.pairs
    t = p["t"]
    if int(t.min()) < 0 or int(t.max()) >= spans.size:
        raise BlockIdError(f"the transfer names {whose} tensor {int(t.max())}; {whose} side has {spans.size}")
    if int(ids.min()) < 0:
        raise BlockIdError(f"the transfer names {whose} block {int(ids.min())}")
    end = p[f"{side}_off"] + int(ids.max()) * p[f"{side}_bstride"] + (p[f"{side}_count"] - 1) * p[f"{side}_stride"] + p[f"{side}_run"]
    j = int(np.flatnonzero(end > spans[t])[0])
    raise BlockIdError(
        f"the transfer would reach byte {int(end[j])} of {whose} tensor {int(t[j])}, outside its registered {int(spans[t[j]])} B"
    )


# --------------------------------------------------------------------------------------------
# links
# --------------------------------------------------------------------------------------------
class _ControlLink(TcpLink):
    """A TCP link with no data connections that reports its own closing to the IPC link."""

    def __init__(self, backend: TcpBackend, peer: PeerMetadata, ctrl: Any, on_close: Any):
        super().__init__(backend, peer, ctrl, initiator=True)
        self._on_close = on_close

    def close(self, exc: KvxferError | None = None, *, goodbye: bool = False) -> None:
        first = not self.closed
        super().close(exc, goodbye=goodbye)
        if first:
            self._on_close(exc or PeerLostError(f"control connection to {self.peer.name!r} closed"))


class CudaIpcLink(BackendLink):
    """One peer reached through CUDA IPC: its mapped tensors and a TCP control connection."""

    backend_name = "cuda_ipc"

    def __init__(self, backend: CudaIpcBackend, peer: PeerMetadata, handles: list[bytes],
                 addrs: np.ndarray, spans: np.ndarray, peer_device: int):
        self.backend = backend
        self.peer = peer
        self.peer_device = peer_device
        self.remote_addrs = addrs  # uint64, first byte of each peer tensor in our address space
        self.remote_spans = spans  # int64, registered bytes of each peer tensor
        addrs.flags.writeable = False  # fixed for the link's life: caches key on their identity
        spans.flags.writeable = False
        self._handles = handles
        self._lock = threading.Lock()
        self._closed = False
        self._released = False
        self._inflight = 0  # launched kernels not yet seen complete
        self._pending: set[TransferHandle] = set()
        self.ctrl: _ControlLink | None = None
        self.lost_error: PeerLostError | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mapped(self) -> bool:
        """Whether the peer's allocations are still mapped in this process."""
        return not self._released

    def close(self, exc: KvxferError | None = None) -> None:
        """Disconnect: pending transfers fail with ``exc`` once their kernels are done (or at their
        deadline); mappings close once no kernel uses them. Idempotent."""
        err = exc or PeerLostError(f"link to {self.peer.name!r} closed")
        ctrl = self.ctrl
        if ctrl is not None and not ctrl.closed:
            ctrl.close(err, goodbye=True)  # calls _lost through the control link's hook
        self._lost(err)

    def _lost(self, exc: KvxferError) -> None:
        if not isinstance(exc, PeerLostError):
            exc = PeerLostError(f"link to {self.peer.name!r} lost: {exc}")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.lost_error = exc
            release = self._inflight == 0
        # Pending transfers already have kernels in the queue, which cannot be recalled: each one
        # fails when its kernel is done (or at its deadline), so that once a handle reports the
        # failure, nothing writes its destination blocks any more.
        if release:
            self._release()
        self.backend._forget(self)
        self.backend.local.link_lost(self, exc)

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            handles, self._handles = self._handles, []
        for h in handles:
            ipc.release_handle(h)
        log.debug("released %d mapping(s) of peer %r", len(handles), self.peer.name)

    # -- called by the backend ---------------------------------------------------------------
    def _begin(self, handle: TransferHandle | None) -> None:
        with self._lock:
            if self._closed:
                raise PeerLostError(f"link to {self.peer.name!r} is closed")
            self._inflight += 1
            if handle is not None:
                self._pending.add(handle)

    def _end(self, handle: TransferHandle | None) -> None:
        with self._lock:
            self._inflight -= 1
            if handle is not None:
                self._pending.discard(handle)
            release = self._closed and self._inflight == 0
        if release:
            self._release()

    def send_notification(self, payload: bytes) -> None:
        """Send ``payload`` to the peer once every transfer submitted before it is complete.

        Raises:
            PeerLostError: the link is closed.
        """
        self.backend._enqueue_notification(self, bytes(payload))

    def _send_now(self, payload: bytes) -> None:
        if self.ctrl is None or self.ctrl.closed:
            raise PeerLostError(f"control connection to {self.peer.name!r} is closed")
        self.ctrl.send_notification(payload)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<CudaIpcLink {self.peer.name!r} cuda:{self.backend.device}->peer bus {self.peer_device} {state}>"


# A caller waiting on a transfer of at most this many bytes polls its completion event for up
# to _DRIVE_SPIN_S and finishes it itself (two thread hand-offs fewer for a small transfer).
_DRIVE_MAX_BYTES = 64 << 20
_DRIVE_SPIN_S = 500e-6
_CUDA_NOT_READY = 600  # cudaErrorNotReady


class _Driver:
    """A small transfer's :class:`~kvxfer.handle.HandleDriver`: its caller finishes it."""

    __slots__ = ("_backend", "_work")

    def __init__(self, backend: CudaIpcBackend, work: _Work):
        self._backend, self._work = backend, work

    def drive(self, timeout: float | None) -> None:
        self._backend._drive(self._work, timeout)

    def watch(self) -> None:
        assert self._backend._done is not None
        self._backend._done.kick(self._work)


@dataclass(slots=True)
class _Work:
    """One entry of the completion queue: a transfer, or a notification to send in order."""

    link: CudaIpcLink
    done_event: int
    events: list[int]  # plain events to recycle (the done event among them unless timed)
    timed: list[int]  # timing events to recycle
    handle: TransferHandle | None = None
    notify: bytes | None = None
    timing_start: int = 0


# --------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------
class CudaIpcBackend(Backend):
    """Moves plans between GPUs of one host with one kernel launch over CUDA IPC mappings.

    Args:
        local: the owning Connector.
        tcp: the connector's TCP backend (control connections and notifications).

    Raises:
        BackendUnavailableError: CuPy or the driver is missing, the layout is not GPU memory,
            or (when the connector forces ``backend="cuda_ipc"``) the memory cannot be exported;
            the message names the cause and the fix.
    """

    name = "cuda_ipc"

    def __init__(self, local: LocalSide, tcp: TcpBackend):
        self.local = local
        self.tcp = tcp
        self._cp = _cupy()
        self._links: set[CudaIpcLink] = set()
        self._lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._closed = False
        self._exported: ipc.ExportedMemory | None = None
        self._export_error: str | None = None
        self._bus = ""
        self.device = -1
        self._stream = 0
        self._free_events: list[int] = []
        self._free_timing: list[int] = []
        # every queued work item, finished in order by the completion thread or, for a small
        # transfer, by a caller already waiting on its handle (see _drive)
        self._order: OrderedCompletion[_Work] = OrderedCompletion(self._finish_logged)
        self._done: CompletionThread[_Work] | None = None
        self._local_addrs = np.zeros(0, dtype=np.uint64)
        self._local_spans = np.zeros(0, dtype=np.int64)
        self._torch_owner = False
        #: when True, each transfer's kernel time (seconds, CUDA events) is appended to device_times
        self.record_device_time = False
        self.device_times: collections.deque[float] = collections.deque(maxlen=4096)
        layout = local.layout
        if layout is not None:
            self._setup(layout)

    # -- setup -------------------------------------------------------------------------------
    def _setup(self, layout: KVLayout) -> None:
        if layout.memory is not MemoryKind.CUDA:
            raise BackendUnavailableError("the cuda_ipc backend needs a KV layout in GPU memory; this one is host memory")
        self.device = int(layout.device)
        self._bus = ipc.bus_id(self.device)
        self._local_addrs = np.asarray(layout.addrs, dtype=np.uint64)
        self._local_spans = np.asarray([t.span for t in layout.geometry.tensors], dtype=np.int64)
        self._local_spans.flags.writeable = False
        torch = sys.modules.get("torch")
        self._torch_owner = torch is not None and any(isinstance(o, torch.Tensor) for o in layout.owners)
        try:
            self._exported = ipc.export_tensors([int(a) for a in self._local_addrs], self._local_spans.tolist(), self.device)
        except BackendUnavailableError as exc:
            if getattr(self.local, "backend_choice", "auto") == "cuda_ipc":
                raise
            # keep running: we can still map peers that can export; peers cannot map us
            self._export_error = str(exc)
            log.warning("cuda_ipc: this connector's KV memory cannot be shared (peers fall back to another "
                        "backend to reach it): %s", exc)
        rt = self._cp.cuda.runtime
        with self._cp.cuda.Device(self.device):
            self._stream = int(rt.streamCreateWithFlags(_STREAM_NON_BLOCKING))
        self._done = CompletionThread(self._order, sync=self._sync_work, query=self._work_complete,
                                      release=self._release_work, name=f"kvxfer-ipc-done-{self.local.name}",
                                      setup=self._select_device)

    def on_layout_registered(self, layout: KVLayout) -> None:
        if self.device < 0:
            self._setup(layout)

    # -- Backend -----------------------------------------------------------------------------
    def endpoint(self) -> dict[str, Any]:
        ep: dict[str, Any] = {"v": ENDPOINT_VERSION, "bus": self._bus, "dev": self.device, "boot": boot_id(), "pid": os.getpid()}
        if self._exported is None:
            ep["err"] = self._export_error or "no KV layout registered"
        else:
            ep.update(self._exported.to_wire())
            ep["err"] = None
        return ep

    def unreachable_reason(self, peer: PeerMetadata) -> str | None:
        """Why this backend cannot reach ``peer`` (None when it can)."""
        if self.device < 0:
            return "no GPU KV layout is registered on this side"
        if "cuda_ipc" not in peer.backends:
            return f"peer {peer.name!r} does not run the cuda_ipc backend"
        if peer.boot_id != boot_id():
            return f"peer {peer.name!r} runs on another host (boot id {peer.boot_id[:8]}...)"
        if peer.geometry is None or peer.geometry.memory is not MemoryKind.CUDA:
            return f"peer {peer.name!r} KV cache is not GPU memory"
        try:
            ep = _parse_endpoint(peer)
        except KvxferError as exc:
            return str(exc)
        peer_dev = ipc.device_of_bus_id(ep.bus)
        if peer_dev is None:
            return (f"peer {peer.name!r} GPU (PCI {ep.bus}) is not visible in this process; "
                    "make both GPUs visible (CUDA_VISIBLE_DEVICES) to use CUDA IPC")
        if not ipc.peer_access_possible(self.device, peer_dev):
            return f"cuda:{self.device} cannot access peer {peer.name!r} GPU cuda:{peer_dev} (PCI {ep.bus}): no P2P path"
        return None

    def can_reach(self, peer: PeerMetadata) -> bool:
        reason = self.unreachable_reason(peer)
        if reason is None:
            return True
        if "cuda_ipc" in peer.backends and peer.boot_id == boot_id():
            log.warning("cuda_ipc cannot reach %r, another backend will: %s", peer.name, reason)
        return False

    def connect(self, peer: PeerMetadata, timeout: float) -> CudaIpcLink:
        """Map the peer's allocations on our device and open the control connection.

        Raises:
            BackendUnavailableError: the peer cannot be reached through CUDA IPC (reason given).
            TransportError: a handle cannot be opened, or the peer's tensors exceed the mappings.
            PeerLostError, TransferTimeoutError: the control connection cannot be opened.
        """
        self._check_open()
        reason = self.unreachable_reason(peer)
        if reason is not None:
            raise BackendUnavailableError(f"cuda_ipc cannot reach peer {peer.name!r}: {reason}")
        ep = _parse_endpoint(peer)
        peer_dev = ipc.device_of_bus_id(ep.bus)
        assert peer_dev is not None and peer.geometry is not None
        if peer.pid == os.getpid():  # same address space: plain peer access, no IPC mapping
            ipc.ensure_peer_access(self.device, peer_dev)
        opened: list[bytes] = []
        try:
            bases: list[tuple[int, int]] = []
            for h, claimed in zip(ep.handles, ep.sizes):
                ptr, size = ipc.open_handle(h, self.device)
                opened.append(h)
                if size < claimed:
                    raise TransportError(f"peer {peer.name!r} allocation maps {size} B here but it claims {claimed} B")
                bases.append((ptr, size))
            addrs = np.empty(len(ep.tensors), dtype=np.uint64)
            spans = np.empty(len(ep.tensors), dtype=np.int64)
            for i, ((ai, off), geom) in enumerate(zip(ep.tensors, peer.geometry.tensors)):
                ptr, size = bases[ai]
                if off + geom.span > size:
                    raise TransportError(f"peer {peer.name!r} tensor {i} exceeds its mapped allocation ({off} + {geom.span} > {size} B)")
                addrs[i] = ptr + off
                spans[i] = geom.span
            link = CudaIpcLink(self, peer, opened, addrs, spans, peer_dev)
            sock = self.tcp._open(peer, 0, timeout, self.tcp.new_link_id())
        except BaseException:
            for h in opened:
                ipc.release_handle(h)
            raise
        ctrl = _ControlLink(self.tcp, peer, sock, link._lost)
        link.ctrl = ctrl
        with self.tcp._lock:
            self.tcp._links.add(ctrl)
        with self._lock:
            self._links.add(link)
        ctrl.start()
        log.debug("cuda_ipc: mapped %d allocation(s) of %r on cuda:%d", len(opened), peer.name, self.device)
        return link

    def submit(self, link: BackendLink, req: TransferRequest, plan: TransferPlan, handle: TransferHandle) -> None:
        """Launch the whole transfer as one kernel; completes ``handle`` from the completion thread.

        Raises:
            BlockIdError: a job would touch bytes outside a registered tensor on either side.
            PeerLostError: the link is closed.
            TransportError, KernelCompileError: the launch failed.
        """
        assert isinstance(link, CudaIpcLink)
        self._check_open()
        remote, local = ("src", "dst") if req.op is Op.READ else ("dst", "src")
        if req.op is Op.READ:
            src, dst = link.remote_addrs, self._local_addrs
        else:
            src, dst = self._local_addrs, link.remote_addrs
        bp = plan.block_pairs
        if bp is not None:  # same block structure: addresses computed on the GPU from block ids
            _check_pairs_within(bp, remote, link.remote_spans, f"peer {link.peer.name!r}")
            _check_pairs_within(bp, local, self._local_spans, "local")
            self._launch(link, handle, req.notify, None, src, dst, pairs=bp)
            return
        jobs = plan.jobs
        _check_within(jobs, remote, link.remote_spans, f"peer {link.peer.name!r}")
        _check_within(jobs, local, self._local_spans, "local")
        self._launch(link, handle, req.notify, jobs, src, dst)

    # -- heterogeneous TP (head slices), outside the Connector's same-fingerprint path ----------
    def connect_metadata(self, metadata: bytes, *, timeout: float = 10.0) -> CudaIpcLink:
        """Connect to a peer from its metadata bytes without the Connector's fingerprint check,
        for transfers between layouts that differ in heads or order (see :meth:`transfer_resharded`).
        The link is not listed in ``Connector.peers``; close it with ``link.close()``.

        Raises:
            RemoteProtocolError: malformed metadata.
            BackendUnavailableError, TransportError, PeerLostError: as :meth:`connect`.
        """
        return self.connect(PeerMetadata.from_bytes(metadata), timeout)

    def transfer_resharded(self, link: CudaIpcLink, op: Op, src_format: Any, dst_format: Any,
                           src_blocks: Any, dst_blocks: Any, *, src_heads: tuple[int, int] | None = None,
                           dst_head_start: int = 0, layers: Any = None, notify: bytes | None = None,
                           timeout: float = 60.0) -> TransferHandle:
        """Copy heads ``src_heads`` of source blocks into destination blocks (from head
        ``dst_head_start``), converting NHD <-> HND when the formats differ, in one launch.

        ``op`` READ pulls from the peer (source = peer), WRITE pushes to it. ``src_format`` and
        ``dst_format`` are :class:`kvxfer.reshard.BlockFormat` of each side. Heterogeneous TP:
        a consumer holding half of the producer's H heads pulls ``src_heads=(0, H//2)`` or
        ``(H//2, H)``. The handle fails after ``timeout`` seconds.

        Raises:
            BlockIdError, LayoutError: as :func:`kvxfer.reshard.plan_reshard`.
            PeerLostError, TransportError, KernelCompileError: as :meth:`submit`.
        """
        from ..reshard import plan_reshard

        layout = self.local.layout
        if layout is None or link.peer.geometry is None:
            raise LayoutError("both sides must have registered a KV layout")
        if op is Op.READ:
            src_geom, dst_geom = link.peer.geometry, layout.geometry
        else:
            src_geom, dst_geom = layout.geometry, link.peer.geometry
        lay = None if layers is None else np.asarray(layers, dtype=np.int64)
        plan = plan_reshard(src_geom, src_format, dst_geom, dst_format, src_blocks, dst_blocks,
                            src_heads=src_heads, dst_head_start=dst_head_start, layers=lay)
        handle = TransferHandle(op, link.peer.name, plan.nbytes, self.name, plan.dst_blocks)
        timer = threading.Timer(timeout, lambda: handle.set_failed(TransferTimeoutError(
            f"{op.value} of {plan.nbytes} B with {link.peer.name!r} via cuda_ipc timed out after {timeout} s")))
        timer.daemon = True
        timer.start()
        handle.add_done_callback(lambda h: timer.cancel())
        empty = np.zeros(0, dtype=np.int64)
        try:
            self.submit(link, TransferRequest(0, op, empty, empty, None, notify), plan, handle)
        except BaseException:
            timer.cancel()
            raise
        return handle

    def _wait_for_caller(self, events: list[int]) -> None:
        """Make our stream wait for the work queued so far on the caller's current stream
        (torch's when the layout holds torch tensors, else CuPy's): a pooled event recorded
        there, waited on by our stream (what torch's ``wait_stream`` does, minus its objects)."""
        gate = self._event()
        events.append(gate)
        rt = self._cp.cuda.runtime
        rt.eventRecord(gate, _ops_cuda.caller_stream_ptr(self.device, self._torch_owner))
        rt.streamWaitEvent(self._stream, gate, 0)

    def _event(self, timing: bool = False) -> int:
        pool = self._free_timing if timing else self._free_events
        with self._lock:
            if pool:
                return pool.pop()
        return int(self._cp.cuda.runtime.eventCreateWithFlags(0 if timing else _EVENT_DISABLE_TIMING))

    def _recycle(self, events: list[int], timing: list[int]) -> None:
        with self._lock:
            self._free_events.extend(events)
            self._free_timing.extend(timing)

    def _launch(self, link: CudaIpcLink, handle: TransferHandle | None, notify: bytes | None,
                jobs: np.ndarray | None, src: np.ndarray | None, dst: np.ndarray | None,
                pairs: BlockPairs | None = None) -> None:
        cp = self._cp
        rt = cp.cuda.runtime
        copies = jobs is not None or pairs is not None
        timing = self.record_device_time and copies
        # the host half of a block-pair copy runs before the lock and before the timing event
        # (device time is the GPU's share: upload and kernel, not Python building records)
        launch = None if pairs is None else _ops_pairs.resolve_block_pairs(pairs, src, dst, stream=self._stream,
                                                                           device=self.device)
        with self._submit_lock:
            link._begin(handle)
            events: list[int] = []
            timed: list[int] = []
            try:
                with cp.cuda.Device(self.device):
                    if copies:
                        self._wait_for_caller(events)
                    t0 = 0
                    if timing:
                        t0 = self._event(True)
                        timed.append(t0)
                    started = (lambda: rt.eventRecord(t0, self._stream)) if timing else None
                    if launch is not None:
                        launch.enqueue(started)  # the timing starts once the records are staged
                    else:
                        if started is not None:
                            started()
                        if jobs is not None and jobs.size:
                            _ops_cuda.copy_jobs(jobs, src, dst, stream=self._stream, device=self.device)
                    done = self._event(timing)
                    (timed if timing else events).append(done)
                    rt.eventRecord(done, self._stream)
            except BaseException as exc:
                link._end(handle)
                self._recycle(events, timed)
                if isinstance(exc, KvxferError):
                    raise
                if isinstance(exc, rt.CUDARuntimeError):
                    raise TransportError(f"cuda_ipc launch on cuda:{self.device} failed: {ipc.cuda_error_text(exc)}") from None
                raise
            w = _Work(link, done, events, timed, handle, notify, t0)
            self._order.add(w)
            driven = handle is not None and handle.nbytes <= _DRIVE_MAX_BYTES and not timing
            if driven:
                handle._driver = _Driver(self, w)
            assert self._done is not None
            self._done.submit(w, driven=driven)

    def _enqueue_notification(self, link: CudaIpcLink, payload: bytes) -> None:
        self._check_open()
        self._launch(link, None, payload, None, None, None)

    # -- completion ----------------------------------------------------------------------------
    def _select_device(self) -> None:
        try:
            self._cp.cuda.runtime.setDevice(self.device)
        except Exception:
            log.exception("cuda_ipc completion thread cannot select cuda:%d", self.device)

    def _sync_work(self, w: _Work) -> KvxferError | None:
        """Completion thread: block until ``w``'s copy is done; the error to fail it with."""
        rt = self._cp.cuda.runtime
        try:
            rt.eventSynchronize(w.done_event)
            if w.timing_start:
                self.device_times.append(rt.eventElapsedTime(w.timing_start, w.done_event) / 1e3)
        except Exception as exc:  # a CUDA error here is sticky; report it on the transfer
            return TransportError(f"cuda_ipc copy on cuda:{self.device} failed: {ipc.cuda_error_text(exc)}")
        return None

    def _work_complete(self, w: _Work) -> bool:
        """Completion thread: whether ``w``'s copy is done (or failed), without blocking."""
        return self._cp.cuda.runtime.eventQuery(w.done_event) != _CUDA_NOT_READY

    def _release_work(self, w: _Work) -> None:
        self._recycle(w.events, w.timed)  # only the completion thread recycles, once per item

    def _drive(self, w: _Work, timeout: float | None) -> None:
        """Called by ``handle.wait()`` on the caller's thread: poll the transfer's event for a
        short while and, once the copy is done, finish it (and every earlier item) right here,
        instead of waking the completion thread and then the caller. Hands the transfer to the
        completion thread when the copy takes longer or the query fails."""
        rt = self._cp.cuda.runtime
        end = time.perf_counter() + (_DRIVE_SPIN_S if timeout is None else min(_DRIVE_SPIN_S, timeout))
        while True:
            st = rt.eventQuery(w.done_event)
            if st == 0:  # cudaSuccess: this copy, and every one before it on our stream, is done
                self._order.settle(w, None)
                return
            if st != _CUDA_NOT_READY or time.perf_counter() >= end:
                break  # an error is the completion thread's to report
        assert self._done is not None
        self._done.kick(w)

    def _finish_logged(self, w: _Work, err: KvxferError | None) -> None:
        try:
            self._finish(w, err)
        except Exception:  # never let a completion (on whichever thread) raise
            log.exception("cuda_ipc completion of a transfer with %r", w.link.peer.name)

    def _finish(self, w: _Work, err: KvxferError | None) -> None:
        link, handle = w.link, w.handle
        link._end(handle)
        if handle is None:  # an ordered notification
            if err is None and w.notify is not None and not link.closed:
                try:
                    link._send_now(w.notify)
                except (OSError, KvxferError) as exc:
                    log.info("notification to %r not delivered: %s", link.peer.name, exc)
            return
        if err is None and link.lost_error is not None:
            err = link.lost_error
        if err is not None:
            handle.set_failed(err)
            return
        if handle.done():  # failed meanwhile (deadline, peer lost): the user was told already
            return
        if w.notify is not None:
            try:
                link._send_now(w.notify)
            except (OSError, KvxferError) as exc:
                handle.set_failed(PeerLostError(
                    f"the bytes were copied but the notification to {link.peer.name!r} could not be sent: {exc}"
                ))
                return
        handle.set_done()

    # -- life cycle ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the cuda_ipc backend is closed")

    def _forget(self, link: CudaIpcLink) -> None:
        with self._lock:
            self._links.discard(link)

    @property
    def links(self) -> list[CudaIpcLink]:
        with self._lock:
            return list(self._links)

    def close(self) -> None:
        """Close every link (pending transfers fail), wait briefly for launched kernels, free
        the stream and events. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for link in self.links:
            link.close(PeerLostError("connector closed"))
        if self._done is not None and not self._done.close(10.0):
            log.warning("cuda_ipc completion thread still waiting on the GPU; leaving the stream in place")
            return
        rt = self._cp.cuda.runtime
        try:
            with self._cp.cuda.Device(self.device):
                for e in self._free_events + self._free_timing:
                    rt.eventDestroy(e)
                if self._stream:
                    rt.streamDestroy(self._stream)
        except Exception:  # the context may be going away at interpreter exit
            pass
        self._free_events.clear()
        self._free_timing.clear()
        self._stream = 0



def backend_of(connector: Any) -> CudaIpcBackend:
    """The cuda_ipc backend a Connector runs (for head-slice transfers and diagnostics).

    Raises:
        BackendUnavailableError: the connector runs no cuda_ipc backend (no GPU layout registered,
            or another backend was forced).
    """
    b = getattr(connector, "_backends", {}).get("cuda_ipc")
    if not isinstance(b, CudaIpcBackend):
        raise BackendUnavailableError(f"connector {getattr(connector, 'name', connector)!r} runs no cuda_ipc backend")
    return b
