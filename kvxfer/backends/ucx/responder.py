"""The responder half of a UCX link: the packed transfers the peer asks this side to serve.

Layer: backends/ucx (part of :mod:`~kvxfer.backends.ucx.link`, whose :class:`~.link.UcxLink`
inherits :class:`PackedResponder`). Every method runs on the work thread unless it says
otherwise. A REQ is planned against our own layout first (every one of our block ids checked);
a read is then gathered piece by piece and each piece put into the initiator's staging buffer
(LANDED after each piece's flush), a write fetched piece by piece as the initiator says READY
and scattered as it arrives (DONE at the end). A refusal is ERR. A CANCEL from the initiator
stops a transfer: no more gets or scatters, and ERR (``TransferCancelledError``) once a flush
of the endpoint says none of its RMA is in flight (the initiator may then reuse its buffer).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ...errors import BlockIdError, LayoutError, PeerLostError, RemoteProtocolError
from ...handle import Op
from ...metadata import PeerMetadata
from ...errors import TransferCancelledError
from ...protocol.messages import Cancel, Done, Progress, Refusal, Request, decode, encode
from ...protocol.transfer import TransferSession
from ..base import plan_for_responder
from . import messages as proto
from .context import LinkContext
from .messages import Msg
from .transfers import Marks, Serving, pieces_of, scatter_landed
from .ucp import UcxCallError

__all__ = ["PackedResponder"]

log = logging.getLogger(__name__)

_STAGING_RKEYS = 8  # unpacked staging keys kept per link


class PackedResponder:
    """Serving the peer's packed transfers over a link's endpoint (a base of
    :class:`~.link.UcxLink`, which provides the attributes and the sending below)."""

    ctx: LinkContext
    peer: PeerMetadata
    ep_handle: int
    _session: TransferSession[Any]
    _staging_rkeys: dict[bytes, int]

    # provided by UcxLink
    def send(self, kind: Msg, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def post_message(self, kind: Msg, data: bytes) -> None:
        raise NotImplementedError

    def endpoint_failed(self, status: int) -> bool:
        raise NotImplementedError

    def close(self, exc: Any = None) -> None:
        raise NotImplementedError

    def on_request(self, h: dict, arrived: float = 0.0) -> None:
        """Work thread: serve a packed transfer the peer asked for (validated first). A read is
        gathered piece by piece and each piece put into the initiator's buffer as soon as it is
        staged (LANDED after each piece's flush); a write is fetched piece by piece as the
        initiator says READY, and each piece scattered as it arrives (DONE at the end).
        ``arrived``: when the progress thread received the request (tracing)."""
        marks = Marks.start(arrived or time.perf_counter(), log)
        if marks:
            marks("work thread")
        p = decode(Request, h)
        if p.staging is None:
            raise RemoteProtocolError(f"packed request {p.xfer_id} names no staging buffer")
        req, xid, notify = p.transfer, p.xfer_id, p.transfer.notify
        addr, key, nbytes = p.staging.address, p.staging.rkey, p.staging.nbytes
        try:
            plan = plan_for_responder(self.ctx.memory.layout, self.peer, req)
            if marks:
                marks("planned")
            if plan.nbytes != nbytes:
                raise BlockIdError(f"request says {nbytes} B but its blocks hold {plan.nbytes} B")
        except (BlockIdError, LayoutError) as exc:
            log.info("refusing transfer %d from %r: %s", xid, self.peer.name, exc)
            self.send(Msg.ERR, encode(self._session.refuse(xid, exc)))
            return
        if plan.nbytes == 0:  # an initiator moves empty plans without a request
            self.send(Msg.ERR, encode(self._session.refuse(xid, RemoteProtocolError("a packed request must move bytes"))))
            return
        staging = self.ctx.memory.staging().get(plan.nbytes)
        try:
            rkey = self._staging_rkey(key)
        except UcxCallError as exc:
            self.ctx.memory.staging().put(staging)
            self.send(Msg.ERR, encode(self._session.refuse(xid, RemoteProtocolError(f"bad staging rkey: {exc}"))))
            return
        if marks:
            marks("checked")
        s = Serving(xid, req.op, plan, notify, staging, rkey, addr, pieces_of(self.ctx.config, plan),
                     marks=marks)
        try:
            self._session.serve(xid, s)
        except RemoteProtocolError:  # an id still in flight: the link is dropped
            self.ctx.memory.staging().put(staging)
            raise
        packer = self.ctx.memory.packer()
        s.pieces = packer.pieces(plan, staging, s.chunks, gather=req.op is Op.READ)
        if marks:
            marks("pieces prepared")
        if req.op is Op.WRITE:
            return  # READY messages drive it
        for lo, hi in s.pieces.gather_staged():
            if self._session.closed:
                return
            if not self._post(True, s, lo, hi, self._put_flushed):
                return
            if marks:
                marks("put")

    def _post(self, put: bool, s: Serving, lo: int, hi: int, then: Any) -> bool:
        """Move staged bytes [lo, hi) between the two buffers (put: ours to the initiator's),
        then ``then(s, hi, status)`` on the progress thread once they are remotely complete."""
        ucp = self.ctx.worker.ucp
        if s.staging is None:  # the link closed (its buffer is held)
            return False
        try:
            ucp.post_rma(put, self.ep_handle, [s.staging.address + lo], [s.address + lo], [hi - lo], [s.rkey],
                         [ucp.request_param(s.staging.memh)])
        except UcxCallError as exc:
            self.close(PeerLostError(f"RMA with {self.peer.name!r} failed: {exc}"))
            return False
        ucp.flush(self.ep_handle, lambda st: then(s, hi, st))
        self.ctx.worker.wake()
        return True

    def _put_flushed(self, s: Serving, upto: int, status: int) -> None:
        """Progress thread, packed read: bytes [0, upto) are in the initiator's buffer. LANDED
        goes out from here, a thread hand-off sooner than from the work thread (the last
        piece's is on the transfer's critical path). No link lock: the endpoint cannot be
        closed meanwhile, as closing it waits for the worker this callback runs in."""
        if status == 0 and not self._session.closed:
            self.post_message(Msg.LANDED, proto.encode_message(Msg.LANDED, self.ctx.session,
                                                                encode(Progress(s.xid, upto))))
        self.ctx.worker.defer(self._landed, s, upto, status)

    def on_cancel(self, h: dict) -> None:
        """Work thread: the initiator cancelled a packed transfer we serve. Nothing more of it is
        fetched or scattered (a scatter already queued is waited for); once a flush of the
        endpoint completes, none of its puts or gets is in flight: its staging buffer goes back
        and ERR (``TransferCancelledError``) tells the initiator it may reuse its own."""
        s = self._session.on_cancel(decode(Cancel, h))
        if s is None:
            return  # finished (its DONE or last LANDED is on its way), refused, or unknown
        s.cancelled = True
        if s.token is not None:
            self.ctx.memory.packer().wait(s.token)
        self.ctx.worker.ucp.flush(self.ep_handle, lambda st: self.ctx.worker.defer(self._cancel_flushed, s, st))
        self.ctx.worker.wake()

    def _cancel_flushed(self, s: Serving, status: int) -> None:
        if self.endpoint_failed(status):
            return
        if s.staging is not None:
            self.ctx.memory.staging().put(s.staging)
            s.staging = None
        exc = TransferCancelledError(f"transfer {s.xid} cancelled by its initiator")
        self.send(Msg.ERR, encode(Refusal.of(s.xid, exc)))

    def _landed(self, s: Serving, upto: int, status: int) -> None:
        """Packed read, responder: bytes [0, upto) are in the initiator's buffer (LANDED sent)."""
        if self.endpoint_failed(status) or s.cancelled:
            return
        if s.marks:
            s.marks("landed")
        if upto == s.plan.nbytes:
            self._finish_serving(s)

    def _got_flushed(self, s: Serving, upto: int, status: int) -> None:
        """Progress thread, packed write: the get of bytes [0, upto) is complete."""
        self.ctx.worker.defer(self._fetched, s, upto, status)

    def _on_ready(self, xid: int, upto: int) -> None:
        """Packed write, responder: the initiator has staged bytes [0, upto); fetch the new ones."""
        s = self._session.served(xid)
        if s is None:
            return  # refused or closed meanwhile
        if s.op is not Op.WRITE or not s.ready < upto <= s.plan.nbytes:
            raise RemoteProtocolError(f"READY {upto} B for transfer {xid} (had {s.ready} of {s.plan.nbytes} B)")
        lo, s.ready = s.ready, upto
        self._post(False, s, lo, upto, self._got_flushed)
        if s.marks:
            s.marks("get")

    def _fetched(self, s: Serving, upto: int, status: int) -> None:
        """Packed write, responder: bytes [0, upto) are in our buffer; scatter the whole pieces."""
        if self.endpoint_failed(status) or s.cancelled:
            return
        if s.marks:
            s.marks("fetched")
        packer = self.ctx.memory.packer()
        scatter_landed(s, upto)
        if upto == s.plan.nbytes:
            packer.wait(s.token)
            if s.notify is not None:
                self.ctx.local.deliver_notification(self.peer.name, s.notify)
            self.send(Msg.DONE, encode(Done(s.xid)))
            self._finish_serving(s)

    def _finish_serving(self, s: Serving) -> None:
        self._session.finish_served(s.xid)
        if s.marks:
            s.marks("served")
            log.debug("served packed %s %d of %d B in %d pieces, ms after the request arrived: %s", s.op.value,
                      s.xid, s.plan.nbytes, len(s.chunks), s.marks)
        if s.staging is not None:
            self.ctx.memory.staging().put(s.staging)

    def _staging_rkey(self, packed: bytes) -> int:
        """The initiator's staging buffer key, unpacked once: its buffers are pooled, so the
        same few keys come back (unpacking a GPU key maps the peer's memory)."""
        rkey = self._staging_rkeys.pop(packed, None)
        if rkey is None:
            rkey = self.ctx.worker.ucp.rkey_unpack(self.ep_handle, packed)
            if len(self._staging_rkeys) >= _STAGING_RKEYS:
                self.ctx.worker.ucp.rkey_destroy(self._staging_rkeys.pop(next(iter(self._staging_rkeys))))
        self._staging_rkeys[packed] = rkey  # most recently used last
        return rkey
