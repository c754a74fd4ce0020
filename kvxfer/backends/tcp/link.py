"""One TCP peer link: a control connection, ``streams`` data connections, the transfers on them.

Layer: backends, tcp package. The control connection carries requests, completions, refusals
and notifications (:mod:`kvxfer.protocol.messages`, one frame each); the data connections
carry DATA frames: a chunk of a plan's stream, sent with ``writev`` from the source views and
received with ``readv`` into the destination views (no intermediate copy for host memory; GPU
memory is staged, :mod:`kvxfer.backends.staging`). Which transfers are outstanding and what
each answer or timeout does to them is the :class:`~kvxfer.protocol.transfer.TransferSession`'s.
A link with no data connections is a *control channel* (see
:meth:`~kvxfer.backends.tcp.TcpBackend.connect_control`).

Cancel (:meth:`TcpLink.cancel`) drains rather than drops: every chunk is received or sent
by one thread at a time, counted in ``_Xfer.active``; a cancelled transfer takes no new chunk,
and the DATA frames still on their way for it are read into a discard buffer (the stream's
framing stays intact and the link keeps serving other transfers). Only a peer that stalls in
the middle of a chunk being received into our blocks gets the link dropped (the receive then
ends at once): waiting for it would leave the cancel hanging, and its bytes would land later.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ...config import MAX_DATA_FRAME, TcpConfig
from ...errors import (
    BlockIdError,
    KvxferError,
    LayoutError,
    PeerLostError,
    ProtocolError,
    RemoteProtocolError,
    TransferTimeoutError,
    TransportError,
)
from ...handle import Op, TransferHandle
from ...metadata import PeerMetadata
from ...plan import TransferPlan
from ...protocol.frames import FRAME_PREFIX_SIZE, FrameType, encode_frame
from ...protocol.messages import Cancel, Done, Goodbye, Notify, Refusal, Request, decode, encode
from ...protocol.transfer import TransferSession
from ..base import BackendLink, LinkOwner, TransferRequest, plan_for_responder
from ..staging import StreamSide, chunk_bounds, stream_side
from .iov import readv_full, writev_full
from .sockets import FLAG_FROM_INITIATOR, discard, read_frame_header

__all__ = ["TcpLink", "TcpLinkOwner"]

log = logging.getLogger(__name__)

_CANCEL_DRAIN_S = 0.25  # how long a cancel waits for a chunk being received, before dropping the link
_CANCEL_CLOSE_S = 5.0  # how long it then waits for that receive to end (the sockets are shut)


class TcpLinkOwner(LinkOwner, Protocol):
    """What a TCP link asks of its backend: its configuration, besides what every link asks."""

    config: TcpConfig


@dataclass(slots=True)
class _Xfer:
    """A transfer on a link, from either side's view."""

    xfer_id: int
    initiated_here: bool
    op: Op
    plan: TransferPlan
    side: StreamSide  # what this side reads (sending) or writes (receiving)
    sending: bool
    handle: TransferHandle | None = None
    notify: bytes | None = None
    received: int = 0
    finished: bool = False
    cancelled: bool = False  # no chunk of it is started any more (TcpLink.cancel, or the peer's Cancel)
    active: int = 0  # chunks being received into, or sent from, its side right now


class TcpLink(BackendLink):
    """One peer, seen over TCP: a control connection plus data connections."""

    backend_name = "tcp"

    def __init__(self, backend: TcpLinkOwner, peer: PeerMetadata, ctrl: socket.socket, initiator: bool,
                 on_close: Callable[[KvxferError], None] | None = None):
        self.backend = backend
        self.peer = peer
        self.initiator = initiator
        self._ctrl = ctrl
        self._ctrl_lock = threading.Lock()
        self._data: list[socket.socket] = []
        self._queues: list[queue.SimpleQueue] = []
        self._session: TransferSession[_Xfer] = TransferSession(peer.name)
        self._lock = self._session.lock
        self._idle = threading.Condition(self._lock)  # an _Xfer's ``active`` fell to 0
        self._threads: list[threading.Thread] = []
        self._rr = itertools.count()
        self._on_close = on_close

    # -- setup ------------------------------------------------------------------------------
    def add_data_socket(self, sock: socket.socket) -> None:
        """Carry DATA frames over ``sock`` too (handshaken: HELLO with a data channel)."""
        with self._lock:
            idx = len(self._data)
            self._data.append(sock)
            q: queue.SimpleQueue = queue.SimpleQueue()
            self._queues.append(q)
        self._spawn(self._data_reader, sock, name=f"kvxfer-tcp-rx{idx}-{self.peer.name}")
        self._spawn(self._data_sender, sock, q, name=f"kvxfer-tcp-tx{idx}-{self.peer.name}")

    def start(self) -> None:
        """Start reading the control connection."""
        self._spawn(self._ctrl_reader, name=f"kvxfer-tcp-ctrl-{self.peer.name}")

    def _spawn(self, fn, *args, name: str) -> None:
        t = threading.Thread(target=self._guard, args=(fn, *args), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except ProtocolError as exc:
            log.warning("dropping link to %r: %s", self.peer.name, exc)
            self.close(PeerLostError(f"link to {self.peer.name!r} dropped: {exc}"))
        except (OSError, KvxferError) as exc:
            if not self.closed:
                log.info("link to %r lost: %s", self.peer.name, exc)
            self.close(exc if isinstance(exc, PeerLostError) else PeerLostError(f"link to {self.peer.name!r} lost: {exc}"))
        except Exception as exc:  # a bug must not leave handles pending forever
            log.exception("unexpected error on link to %r", self.peer.name)
            self.close(TransportError(f"internal error on link to {self.peer.name!r}: {exc!r}"))

    # -- BackendLink -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._session.closed

    def close(self, exc: KvxferError | None = None, *, goodbye: bool = False) -> None:
        """Close the link: pending transfers of ours fail with ``exc`` (PeerLostError by
        default); ``goodbye`` tells the peer first. Calls the ``on_close`` hook once. Idempotent."""
        outstanding = self._session.close()
        if outstanding is None:
            return
        mine, theirs = outstanding
        pending = [x for x in mine if not x.finished]
        sides = [x.side for x in itertools.chain(mine, theirs)]
        if goodbye:
            try:
                self._send_ctrl(FrameType.GOODBYE, encode(Goodbye()))
            except OSError:
                pass
        err = exc or PeerLostError(f"link to {self.peer.name!r} closed")
        for x in pending:
            if x.handle is not None:
                x.handle.set_failed(err)
        for q in self._queues:
            q.put(None)
        for s in [self._ctrl, *self._data]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for side in sides:
            side.close()
        self.backend.forget(self)
        self.backend.local.link_lost(self, err)
        if self._on_close is not None:
            self._on_close(err)

    # -- sending ----------------------------------------------------------------------------
    def _send_ctrl(self, ftype: FrameType, header: dict) -> None:
        frame = encode_frame(ftype, header)
        try:
            with self._ctrl_lock:
                self._ctrl.sendall(frame)
        except OSError as exc:
            # a broken control connection is a lost peer: callers (write, read, notify) get a
            # KvxferError, never a bare OSError, and what was pending on the link fails
            err = PeerLostError(f"link to {self.peer.name!r} lost: {exc}")
            self.close(err)
            raise err from None

    def _enqueue_stream(self, x: _Xfer) -> None:
        cfg = self.backend.config
        bounds = chunk_bounds(x.side, cfg.chunk_bytes, cfg.max_iov)
        nq = len(self._queues)
        start = next(self._rr)
        for k, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
            self._queues[(start + k) % nq].put((x, a, b))

    def _data_sender(self, sock: socket.socket, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None or self.closed:
                return
            x, a, b = item
            if not self._begin_chunk(x):
                continue
            try:
                x.side.before_send(a, b)
            except KvxferError as exc:
                self._end_chunk(x)
                self._fail_local(x, exc)
                continue
            try:
                flags = FLAG_FROM_INITIATOR if x.initiated_here else 0
                hdr = encode_frame(FrameType.DATA, {"x": x.xfer_id, "o": a}, payload_len=b - a, flags=flags)
                hbuf = ctypes.create_string_buffer(hdr, len(hdr))
                iov = x.side.iov(a, b)
                full = np.empty((iov.shape[0] + 1, 2), dtype=np.uint64)
                full[0] = (ctypes.addressof(hbuf), len(hdr))
                full[1:] = iov
                writev_full(sock.fileno(), full)
            finally:
                x.side.after_send(a, b)
                self._end_chunk(x)

    def _begin_chunk(self, x: _Xfer) -> bool:
        """A data thread starts a chunk of ``x``: False (take none) once finished or cancelled."""
        with self._lock:
            if x.finished or x.cancelled:
                return False
            x.active += 1
            return True

    def _end_chunk(self, x: _Xfer) -> None:
        with self._lock:
            x.active -= 1
            idle = x.active == 0
            if idle:
                self._idle.notify_all()
        if idle and x.cancelled:
            x.side.close()  # idempotent; nothing uses it any more

    def _wait_idle(self, x: _Xfer, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: x.active == 0, timeout=timeout)

    def submit(self, req: TransferRequest, plan: TransferPlan, handle: TransferHandle) -> None:
        """Start ``req`` (planned as ``plan``); ``handle`` completes when its bytes are in place.

        Raises:
            PeerLostError: the link is closed, or its control connection broke.
        """
        side_name = "src" if req.op is Op.WRITE else "dst"
        side = stream_side(plan, side_name, self.backend.local.layout, self.backend.config)
        x = _Xfer(req.xfer_id, True, req.op, plan, side, sending=req.op is Op.WRITE, handle=handle, notify=req.notify)
        try:
            self._session.start(req.xfer_id, x)
        except PeerLostError:
            side.close()
            raise
        handle.set_canceller(lambda timeout: self.cancel(x, timeout))
        handle.add_done_callback(lambda h: self._on_handle_done(x, h))
        self._send_ctrl(FrameType.XFER_REQUEST, encode(Request(req)))
        if x.sending:
            self._enqueue_stream(x)
        elif plan.nbytes == 0:
            self._complete_receive(x)

    def cancel(self, x: _Xfer, timeout: float | None) -> bool:
        """Fence our transfer ``x`` (any thread; ``TransferHandle.cancel``): no chunk of it is
        started any more, the peer is told (``XFER_CANCEL``) and stops, and what it still sends
        for ``x`` is discarded. A read waits for the chunk being received into our blocks, if
        any (at most 0.25 s, or ``timeout``); a peer stalled in the middle of one gets the link
        dropped, which ends that receive at once. A write returns at once: our blocks are only
        read (the peer may already hold every byte, and have delivered the notification, when
        the cancel reaches it). False when ``x`` finished meanwhile.

        Raises:
            TransferTimeoutError: a receive into our blocks did not end even after the link
                was dropped (not seen on Linux, where shutting a socket ends its recvmsg).
        """
        with self._lock:
            if x.finished:
                return False
            x.cancelled = True
            self._session.finish_initiated(x.xfer_id)
            idle = x.active == 0
        if not self.closed:
            try:
                self._send_ctrl(FrameType.XFER_CANCEL, encode(Cancel(x.xfer_id)))
            except PeerLostError:
                pass  # the link is gone: nothing more of it arrives
        if not x.sending and not idle:
            drain = _CANCEL_DRAIN_S if timeout is None else min(_CANCEL_DRAIN_S, timeout)
            if not self._wait_idle(x, drain):
                log.info("peer %r stalled in a chunk of cancelled transfer %d: dropping the link",
                         self.peer.name, x.xfer_id)
                self.close(PeerLostError(f"link to {self.peer.name!r} dropped to cancel transfer {x.xfer_id}: "
                                         "the peer stalled in the middle of a chunk"))
                if not self._wait_idle(x, _CANCEL_CLOSE_S):
                    raise TransferTimeoutError(f"transfer {x.xfer_id}: a receive into our blocks did not end "
                                               f"within {_CANCEL_CLOSE_S} s of dropping the link")
        with self._lock:
            idle = x.active == 0
        if idle:
            x.side.close()
        return True

    def _on_cancel(self, h: dict) -> None:
        """The peer cancelled a transfer we serve: start no more chunks of it, deliver no
        notification; DATA still on its way for it is discarded."""
        x = self._session.on_cancel(decode(Cancel, h))
        if x is None:
            return
        with self._lock:
            x.cancelled = True
            idle = x.active == 0
        if idle:
            x.side.close()

    def _on_handle_done(self, x: _Xfer, h: TransferHandle) -> None:
        # failed from outside (deadline): bytes may still be in flight; the link is unsafe
        err = self._session.on_handle_failed(h.exception(), x.finished)
        if err is not None:
            self.close(err)

    # -- receiving --------------------------------------------------------------------------
    def _ctrl_reader(self) -> None:
        prefix_buf = memoryview(bytearray(FRAME_PREFIX_SIZE))
        while not self.closed:
            prefix, h = read_frame_header(self._ctrl, prefix_buf, max_payload=0)
            t = prefix.type
            if t is FrameType.XFER_REQUEST:
                self._on_request(h)
            elif t is FrameType.XFER_DONE:
                self._on_done(h)
            elif t is FrameType.XFER_ERROR:
                self._on_error(h)
            elif t is FrameType.XFER_CANCEL:
                self._on_cancel(h)
            elif t is FrameType.NOTIFY:
                self.backend.local.deliver_notification(self.peer.name, decode(Notify, h).payload)
            elif t is FrameType.GOODBYE:
                self.close(PeerLostError(f"peer {self.peer.name!r} closed the connection"))
                return
            else:
                raise RemoteProtocolError(f"unexpected {t.name} frame on the control connection")

    def _on_request(self, h: dict) -> None:
        req = decode(Request, h).transfer
        try:
            plan = plan_for_responder(self.backend.local.layout, self.peer, req)
            side_name = "dst" if req.op is Op.WRITE else "src"
            side = stream_side(plan, side_name, self.backend.local.layout, self.backend.config)
        except (BlockIdError, LayoutError, TransportError) as exc:
            log.info("refusing transfer %d from %r: %s", req.xfer_id, self.peer.name, exc)
            self._send_ctrl(FrameType.XFER_ERROR, encode(self._session.refuse(req.xfer_id, exc)))
            return
        x = _Xfer(req.xfer_id, False, req.op, plan, side, sending=req.op is Op.READ, notify=req.notify)
        try:
            self._session.serve(req.xfer_id, x)
        except RemoteProtocolError:
            side.close()
            raise
        if x.sending:
            self._enqueue_stream(x)
        elif plan.nbytes == 0:
            self._complete_receive(x)

    def _on_done(self, h: dict) -> None:
        x = self._session.on_done(decode(Done, h))
        if x is None:
            return
        x.finished = True
        x.side.close()
        if x.handle is not None:
            x.handle.set_done()
        elif x.notify is not None:
            # the peer read our blocks and confirms: tell our user
            self.backend.local.deliver_notification(self.peer.name, x.notify)

    def _on_error(self, h: dict) -> None:
        refused = self._session.on_refusal(decode(Refusal, h))
        if refused is not None:
            x, err = refused
            x.finished = True
            x.side.close()
            if x.handle is not None:
                x.handle.set_failed(err)

    def _find_incoming(self, xid: int, from_initiator: bool) -> _Xfer | None:
        if not from_initiator:
            return self._session.initiated(xid)
        # DATA may overtake its request (different connections): wait for the request
        return self._session.await_served(xid, self.backend.config.request_wait)

    def _data_reader(self, sock: socket.socket) -> None:
        prefix_buf = memoryview(bytearray(FRAME_PREFIX_SIZE))
        max_payload = MAX_DATA_FRAME  # a protocol limit, not our own chunk size: peers may differ
        while not self.closed:
            prefix, h = read_frame_header(sock, prefix_buf, max_payload)
            if prefix.type is not FrameType.DATA:
                raise RemoteProtocolError(f"unexpected {prefix.type.name} frame on a data connection")
            xid, off = h.get("x"), h.get("o")
            if type(xid) is not int or type(off) is not int:
                raise RemoteProtocolError("malformed DATA header")
            n = prefix.payload_len
            x = self._find_incoming(xid, bool(prefix.flags & FLAG_FROM_INITIATOR))
            if x is None or x.sending or not self._begin_chunk(x):  # finished, cancelled: drain
                discard(sock, n)
                continue
            try:
                if off < 0 or off + n > x.plan.nbytes:
                    raise RemoteProtocolError(f"DATA [{off}, {off + n}) outside transfer {xid} of {x.plan.nbytes} B")
                if n:
                    readv_full(sock.fileno(), x.side.iov(off, off + n))
                x.side.after_receive(off, off + n)
                with self._lock:
                    x.received += n
                    complete = x.received >= x.plan.nbytes and not x.finished and not x.cancelled
                    if complete:
                        x.finished = True
            finally:
                self._end_chunk(x)
            if complete:
                self._complete_receive(x)

    def _fail_local(self, x: _Xfer, exc: KvxferError) -> None:
        """This side cannot go on with ``x`` (staging failed): fail it and close the link, since
        the peer would wait for bytes that never come."""
        log.warning("transfer %d with %r failed locally: %s", x.xfer_id, self.peer.name, exc)
        if x.handle is not None:
            x.handle.set_failed(exc)
        self.close(PeerLostError(f"link to {self.peer.name!r} closed after a local failure: {exc}"))

    def _complete_receive(self, x: _Xfer) -> None:
        with self._lock:
            if x.cancelled:  # an empty transfer cancelled before it completed
                return
            x.finished = True
        try:
            x.side.finish()
        except KvxferError as exc:
            x.side.close()
            self._fail_local(x, exc)
            return
        x.side.close()
        if x.initiated_here:  # our read finished: done, and confirm to the peer
            self._session.finish_initiated(x.xfer_id)
            self._send_ctrl(FrameType.XFER_DONE, encode(Done(x.xfer_id, yours=False)))
            if x.handle is not None:
                x.handle.set_done()
        else:  # the peer's write landed: notify our user, then confirm
            self._session.finish_served(x.xfer_id)
            if x.notify is not None:
                self.backend.local.deliver_notification(self.peer.name, x.notify)
            self._send_ctrl(FrameType.XFER_DONE, encode(Done(x.xfer_id, yours=True)))

    def send_notification(self, payload: bytes) -> None:
        """Deliver ``payload`` to the peer's notification queue (after what was sent before).

        Raises:
            PeerLostError: the control connection is broken (the link is then closed).
        """
        self._send_ctrl(FrameType.NOTIFY, encode(Notify(payload)))
