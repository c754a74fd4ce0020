"""CUDA IPC backend: GPU to GPU on one host, one kernel launch per transfer.

Layer: backends, cuda_ipc package (over :mod:`.link`, :mod:`.endpoint`, :mod:`.handles`,
:mod:`.completion`). Each side exports ``cudaIpcGetMemHandle`` handles for the allocations holding
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
such transfers, so that one nobody waits for still finishes (see :mod:`.completion`).

Control: a TCP control channel (:meth:`kvxfer.backends.tcp.TcpBackend.connect_control`) carries
notifications and tells us when the peer goes away; a lost peer fails every pending transfer
as soon as its kernel is done (a queued kernel cannot be recalled; failing later would
let it write blocks the caller already reused), or at their deadline; the peer's mappings are
closed as soon as no launched kernel can still touch them.

Validation: every remote block id is checked against the peer's geometry by the planner, and
every job's byte range against the peer's registered tensor spans, which were checked against
the sizes of the mapped allocations when connecting. A peer can never name an address.

Cancel (``TransferHandle.cancel``): a launched kernel cannot be recalled, so the fence is its
done event: the cancel waits for it (polling, up to its timeout, 30 s by default) and then
ends the handle CANCELLED, with no notification. A kernel still running at the timeout makes
the cancel raise ``TransferTimeoutError``; the handle then ends CANCELLED when the kernel is
done. This holds for reads (the kernel writes our blocks) and writes (it reads them). The
peer's process runs no code for a transfer, so there is nothing to tell it: a transfer the
peer initiated into our memory is its handle's to cancel, on its side.
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

from ..._tensors import MemoryKind
from ...errors import BackendUnavailableError, KvxferError, PeerLostError, TransferTimeoutError, TransportError
from ...handle import Op, TransferHandle
from ...layout import KVLayout
from ...metadata import PeerMetadata, boot_id
from ...ops import cuda as _ops_cuda  # imports neither cupy nor torch
from ...ops import pairs as _ops_pairs
from ...plan import BlockPairs, TransferPlan
from ..base import Backend, BackendLink, LocalSide, TransferRequest
from ..tcp import TcpBackend
from . import handles as ipc
from .completion import CompletionThread
from .endpoint import ENDPOINT_VERSION, check_jobs_within, check_pairs_within, parse_endpoint
from .link import CudaIpcLink
from .ordered import OrderedCompletion

__all__ = ["CudaIpcBackend"]

log = logging.getLogger(__name__)

_EVENT_DISABLE_TIMING = 0x02
_STREAM_NON_BLOCKING = 0x01


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"the cuda_ipc backend needs CuPy (pip install kvxfer[cuda13] or kvxfer[cuda12]): {exc}") from None
    return cupy


# A caller waiting on a transfer of at most this many bytes polls its completion event for up
# to _DRIVE_SPIN_S and finishes it itself (two thread hand-offs fewer for a small transfer).
_DRIVE_MAX_BYTES = 64 << 20
_DRIVE_SPIN_S = 500e-6
_CUDA_NOT_READY = 600  # cudaErrorNotReady
_CANCEL_WAIT_S = 30.0  # a cancel without a timeout waits this long for its kernel


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
    cancelled: bool = False  # TransferHandle.cancel: no notification; the handle ends CANCELLED


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
            ep = parse_endpoint(peer)
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
        ep = parse_endpoint(peer)
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
            link.ctrl = self.tcp.connect_control(peer, timeout, on_close=link.control_closed)
        except BaseException:
            for h in opened:
                ipc.release_handle(h)
            raise
        with self._lock:
            self._links.add(link)
        if link.closed:  # the channel closed meanwhile (its hook found the link not yet listed)
            self.forget(link)
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
            check_pairs_within(bp, remote, link.remote_spans, f"peer {link.peer.name!r}")
            check_pairs_within(bp, local, self._local_spans, "local")
            self._launch(link, handle, req.notify, None, src, dst, pairs=bp)
            return
        jobs = plan.jobs
        check_jobs_within(jobs, remote, link.remote_spans, f"peer {link.peer.name!r}")
        check_jobs_within(jobs, local, self._local_spans, "local")
        self._launch(link, handle, req.notify, jobs, src, dst)

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
            link.begin(handle)
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
                link.end(handle)
                self._recycle(events, timed)
                if isinstance(exc, KvxferError):
                    raise
                if isinstance(exc, rt.CUDARuntimeError):
                    raise TransportError(f"cuda_ipc launch on cuda:{self.device} failed: {ipc.cuda_error_text(exc)}") from None
                raise
            w = _Work(link, done, events, timed, handle, notify, t0)
            self._order.add(w)
            driven = handle is not None and handle.nbytes <= _DRIVE_MAX_BYTES and not timing
            if handle is not None:
                handle.set_canceller(lambda timeout: self._cancel(w, timeout))
            if driven:
                handle.set_driver(_Driver(self, w))
            assert self._done is not None
            self._done.submit(w, driven=driven)

    def enqueue_notification(self, link: CudaIpcLink, payload: bytes) -> None:
        """Send ``payload`` to ``link``'s peer once every transfer submitted before it is complete."""
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

    def _cancel(self, w: _Work, timeout: float | None) -> bool:
        """``TransferHandle.cancel`` (any thread): True once ``w``'s kernel is done (it
        touches our blocks no more). Raises TransferTimeoutError when it is still running
        after ``timeout`` s (its late completion then ends the handle CANCELLED)."""
        w.cancelled = True
        rt = self._cp.cuda.runtime
        end = time.monotonic() + (_CANCEL_WAIT_S if timeout is None else timeout)
        pause = 20e-6
        with self._cp.cuda.Device(self.device):
            while True:
                try:
                    st = rt.eventQuery(w.done_event)
                except Exception:  # a CUDA error is sticky: the kernel will not run on
                    return True
                if st != _CUDA_NOT_READY:
                    return True  # done, or failed: either way it writes nothing more
                if time.monotonic() >= end:
                    raise TransferTimeoutError(f"cancel: the cuda_ipc kernel of a transfer with "
                                               f"{w.link.peer.name!r} still runs after {timeout} s")
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

    def _finish_logged(self, w: _Work, err: KvxferError | None) -> None:
        try:
            self._finish(w, err)
        except Exception:  # never let a completion (on whichever thread) raise
            log.exception("cuda_ipc completion of a transfer with %r", w.link.peer.name)

    def _finish(self, w: _Work, err: KvxferError | None) -> None:
        link, handle = w.link, w.handle
        link.end(handle)
        if handle is None:  # an ordered notification
            if err is None and w.notify is not None and not link.closed:
                try:
                    link.send_now(w.notify)
                except (OSError, KvxferError) as exc:
                    log.info("notification to %r not delivered: %s", link.peer.name, exc)
            return
        if w.cancelled:  # no notification; a cancel that timed out is fenced now
            handle.set_cancelled()
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
                link.send_now(w.notify)
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

    def forget(self, link: CudaIpcLink) -> None:
        """Stop listing ``link`` (it closed)."""
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
