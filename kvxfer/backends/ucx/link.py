"""The UCX backend's link: one peer over one endpoint, and the transfers on it.

Layer: backends/ucx, above the worker, memory and responder modules; the backend makes links
and hands each a :class:`~.context.LinkContext`, the only thing of the backend a link uses.
This module is the initiator's half, the dispatch of the peer's messages and closing; the
responder's half is :mod:`~kvxfer.backends.ucx.responder`. A link's transfers both ways follow
the shared rules of :class:`~kvxfer.protocol.transfer.TransferSession` (refusals, deadlines of
abandoned reads, who closes on a timeout). Every method runs on the work thread unless it says
otherwise; the endpoint's completions arrive on the progress thread and are handed back with
:meth:`~kvxfer.backends.ucx.worker.Worker.defer`. Two messages leave from other threads, to
save a thread hand-off on a transfer's critical path: REQ from the caller's thread (under the
session's lock, which closing the link takes to mark it closed) and a read's LANDED from the
progress thread (inside a UCX callback, which closing the endpoint waits for). Message bodies
are :mod:`kvxfer.protocol.messages`, in the envelope of :mod:`kvxfer.backends.ucx.messages`;
how a transfer moves is told in :mod:`kvxfer.backends.ucx`.

Cancel (:meth:`UcxLink.cancel`, ``TransferHandle.cancel``) runs on the work thread, where
every scatter into our blocks is queued: a packed transfer scatters nothing more (the queued
scatter is waited for), tells the peer (CANCEL) and keeps its staging buffer, as an abandoned
read does, until the peer's ERR says none of its RMA is in flight (or its last LANDED, or the
link closes; past the deadline the link is closed). A DIRECT transfer's RMA reaches our
blocks: the fence is its flush. Closing the endpoint is no fence (tested: a get from a stalled
peer over UCX's tcp transport still lands after ``ep.close()`` once the peer resumes), so a
flush that does not complete within the cancel's timeout makes it raise
``TransferTimeoutError``; the handle then ends CANCELLED when the flush completes. A DIRECT
write's puts only read our blocks: its cancel returns at once (its flush sends no NOTE).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import (
    KvxferError,
    PeerLostError,
    RemoteProtocolError,
    TransferTimeoutError,
    TransportError,
)
from ...handle import Op, TransferHandle
from ...metadata import PeerMetadata
from ...plan import TransferPlan
from ...protocol.messages import (
    Cancel,
    Done,
    Goodbye,
    HelloAck,
    Notify,
    Progress,
    Refusal,
    Request,
    StagingRef,
    TransferRequest,
    decode,
    encode,
)
from ...protocol.transfer import TransferSession
from ..base import BackendLink
from . import messages as proto
from .context import LinkContext
from .messages import Msg
from .responder import PackedResponder
from .transfers import Marks, Serving, Xfer, lost_error, pieces_of, scatter_landed
from .ucp import RemoteKey, UcxCallError

__all__ = ["UcxLink"]

log = logging.getLogger(__name__)

_CANCEL_HOLD_S = 60.0  # how long a cancelled packed transfer's staging waits for the peer's answer


class UcxLink(PackedResponder, BackendLink):
    """One peer over one UCX endpoint (ours, reused for every transfer to that peer): the
    transfers this side initiates, here; those it serves, in :class:`~.responder.PackedResponder`."""

    backend_name = "ucx"

    def __init__(self, ctx: LinkContext, peer: PeerMetadata, ep: Any, error_handling: bool):
        self.ctx = ctx
        self.peer = peer
        self.ep = ep
        self.ep_handle = int(ep.handle)
        self.error_handling = error_handling
        self.ep_failed = False  # UCX reported an error on the endpoint
        self.ready = threading.Event()
        self.incoming = False  # created by the peer's HELLO (True) or by our connect()
        self.refusal: str | None = None
        # the transfers in flight (an Xfer for each we initiated, a Serving for each we serve) and
        # the rules they follow; its lock is the link's
        self._session: TransferSession[Any] = TransferSession(peer.name)
        self._rkeys: list[RemoteKey] | None = None
        self._staging_rkeys: dict[bytes, int] = {}

    @property
    def closed(self) -> bool:
        return self._session.closed

    # -- peer regions -----------------------------------------------------------------------
    def remote_keys(self) -> list[RemoteKey]:
        """The peer's tensor regions, rkeys unpacked once on this link's endpoint."""
        if self._rkeys is None:
            regions = proto.peer_regions(self.peer)
            self._rkeys = [RemoteKey(addr, length, self.ctx.worker.ucp.rkey_unpack(self.ep_handle, packed))
                           for addr, length, packed in regions]
        return self._rkeys

    # -- sending ----------------------------------------------------------------------------
    def send(self, kind: Msg, body: dict[str, Any]) -> None:
        """Send one control message (eager AM). A failed send closes the link."""
        if self._session.closed and kind is not Msg.BYE:
            return
        self.post_message(kind, proto.encode_message(kind, self.ctx.session, body))

    def post_message(self, kind: Msg, data: bytes) -> None:
        """Post one encoded control message (any thread). A failed send closes the link."""

        def sent(status: int, _keep: bytes = data) -> None:
            if status != 0 and kind is not Msg.BYE:
                self.ep_failed = True
                self.ctx.worker.defer(self.close, lost_error(status, self.peer.name))

        self.ctx.worker.ucp.am_send(self.ep_handle, proto.AM_ID, data, sent)
        self.ctx.worker.wake()

    def send_notification(self, payload: bytes) -> None:
        """Deliver ``payload`` to the peer's notification queue (after earlier transfers' bytes).

        Raises:
            PeerLostError: the link is closed.
        """
        if self._session.closed:
            raise PeerLostError(f"link to {self.peer.name!r} is closed")
        self.ctx.worker.defer(self.send, Msg.NOTE, encode(Notify(bytes(payload))))

    # -- initiator --------------------------------------------------------------------------
    def _new_xfer(self, req: TransferRequest, plan: TransferPlan, handle: TransferHandle, ready: Any) -> Xfer:
        x = Xfer(req, plan, handle, plan.nbytes, ready=ready, marks=Marks.start(handle.created, log))
        handle.set_canceller(lambda timeout: self.cancel(x, timeout))
        handle.add_done_callback(lambda h: self._on_handle_done(x, h))
        return x

    def prepare_direct(self, req: TransferRequest, plan: TransferPlan, handle: TransferHandle,
                       ready: Any = None) -> Xfer:
        """Caller's thread: the record of a DIRECT (or empty) transfer, with its handle's
        canceller set before the handle is returned; :meth:`start` begins it. ``ready``: an
        event on the caller's stream (GPU memory) that every access to our blocks waits for."""
        return self._new_xfer(req, plan, handle, ready)

    def start(self, x: Xfer) -> None:
        """Work thread: begin a DIRECT (or empty) transfer this side initiated (made by
        :meth:`prepare_direct`); a packed one begins with :meth:`start_packed`."""
        req, plan, handle = x.req, x.plan, x.handle
        assert plan is not None and handle is not None
        if x.cancelled:  # cancelled before it began: nothing was posted
            self._release(x)
            return
        if self._session.closed:
            handle.set_failed(PeerLostError(f"link to {self.peer.name!r} is closed"))
            return
        if x.marks:
            x.marks("work thread")
        try:
            self._session.start(req.xfer_id, x)
            if plan.nbytes == 0:
                self._finish_direct(x, 0)
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
        layout = self.ctx.memory.layout
        laddr = layout.addrs.astype(np.uint64)[lt] + lo.astype(np.uint64)
        rbase = np.array([k.address for k in keys], dtype=np.uint64)
        raddr = rbase[rt] + ro.astype(np.uint64)
        rk = [keys[i].rkey for i in range(len(keys))]
        params = self.ctx.memory.tensor_params
        return (laddr.tolist(), raddr.tolist(), ll.tolist(), [rk[i] for i in rt.tolist()], [params[i] for i in lt.tolist()])

    def _start_direct(self, x: Xfer) -> None:
        if x.ready is not None:  # UCX's copies are not on a stream of ours: wait on the host
            x.ready.synchronize()
        put = x.req.op is Op.WRITE
        la, ra, ln, rk, prm = self._ranges(x.plan, "src" if put else "dst")
        try:
            self.ctx.worker.ucp.post_rma(put, self.ep_handle, la, ra, ln, rk, prm)
        except UcxCallError as exc:
            raise PeerLostError(f"posting RMA to {self.peer.name!r} failed: {exc}") from None
        self.ctx.worker.ucp.flush(self.ep_handle, lambda st: self.ctx.worker.defer(self._finish_direct, x, st))
        self.ctx.worker.wake()

    def endpoint_failed(self, status: int) -> bool:
        """A failed completion ``status`` closes the link (True); 0 is success (False)."""
        if status == 0:
            return False
        self.ep_failed = True
        self.close(lost_error(status, self.peer.name))
        return True

    def _finish_direct(self, x: Xfer, status: int) -> None:
        if x.cancelled:  # its RMA is complete (or failed): nothing more lands
            self._release(x)
            self._fenced(x)
            self.endpoint_failed(status)
            return
        if self.endpoint_failed(status):
            return
        if x.req.notify is not None:
            self.send(Msg.NOTE, encode(Notify(x.req.notify)))
        self._complete(x)

    def start_packed(self, req: TransferRequest, plan: TransferPlan, handle: TransferHandle, ready: Any = None) -> None:
        """Caller's thread: begin a packed transfer by sending its request at once, so that the
        peer checks and stages while the work thread prepares our side (:meth:`_prepare_packed`).
        Sending from here saves the hand-off to the work thread (0.1-0.3 ms on the device
        machine) on the critical path (:meth:`_send_request`)."""
        x = self._new_xfer(req, plan, handle, ready)
        err = self._send_request(x, self._advance if req.op is Op.READ else self._prepare_packed)
        if err is not None:  # this is the caller's thread: the handle reports it, as from the work thread
            self._fail(x, err)

    def start_packed_early(self, req: TransferRequest, nbytes: int, timeout: float) -> Xfer | None:
        """Caller's thread: send a packed read's request before the caller's plan exists (see
        :meth:`UcxBackend.start_early`); the plan and handle follow with :meth:`attach`, or
        :meth:`abandon` when the plan fails. Nothing of ours is touched before :meth:`attach`:
        the peer only writes our staging buffer. None when the request could not go out (the
        transfer then takes the usual path, which reports any real error). ``timeout``: the
        read's, which bounds an abandoned one (:meth:`abandon`)."""
        x = Xfer(req, None, None, nbytes, marks=Marks.start(time.perf_counter(), log), deadline=time.monotonic() + timeout)
        err = self._send_request(x)
        if err is not None:
            log.debug("not starting transfer %d early: %s", req.xfer_id, err)
            self._release(x)
            return None
        return x

    def _send_request(self, x: Xfer, then: Callable[[Xfer], None] | None = None) -> KvxferError | None:
        """Caller's thread: take ``x``'s staging buffer, register ``x`` and post its REQ, then
        queue ``then(x)`` on the work thread (after the post: no wake-up to race it). The
        link's lock spans the closed check, the registration and the post, so a link being
        closed on the work thread never has its endpoint used after it is released. Returns
        why the request could not go out (``x`` is then not registered), or None."""
        try:
            x.staging = self.ctx.memory.staging().get(x.nbytes)
            ref = StagingRef(x.staging.address, x.staging.rkey, x.nbytes)
            data = proto.encode_message(Msg.REQ, self.ctx.session, encode(Request(x.req, ref)))
        except Exception as exc:
            return exc if isinstance(exc, KvxferError) else TransportError(f"packed transfer setup failed: {exc!r}")
        if x.marks:
            x.marks("REQ encoded")
        with self._session.lock:
            try:
                self._session.start(x.req.xfer_id, x)
            except PeerLostError as exc:
                return exc
            self.post_message(Msg.REQ, data)
            if then is not None:
                self.ctx.worker.defer(then, x)
        if x.marks:
            x.marks("REQ sent")
        return None

    def attach(self, x: Xfer, plan: TransferPlan, handle: TransferHandle) -> None:
        """Caller's thread: the plan and handle of a read started early; the rest happens on
        the work thread (:meth:`_attached`), where every answer of the peer is handled."""
        handle.set_canceller(lambda timeout: self.cancel(x, timeout))
        handle.add_done_callback(lambda h: self._on_handle_done(x, h))
        self.ctx.worker.defer(self._attached, x, plan, handle)

    def _attached(self, x: Xfer, plan: TransferPlan, handle: TransferHandle) -> None:
        if x.finished:  # refused, or the link closed, before the plan was ready
            handle.set_failed(x.error or PeerLostError(f"link to {self.peer.name!r} is closed"))
            return
        if plan.nbytes != x.nbytes:  # the same formula on both paths: a bug, never the peer's doing
            self._abandoned(x)
            handle.set_failed(TransportError(f"transfer {x.req.xfer_id}: planned {plan.nbytes} B, requested {x.nbytes} B"))
            return
        x.plan, x.handle = plan, handle
        self._advance(x)

    def abandon(self, x: Xfer) -> None:
        """The caller's plan of a read started early failed: scatter nothing; give the staging
        buffer back once the peer has put every byte in it (or refused, or the link closed).
        A peer not done by the read's deadline gets the link closed (the backend's watch
        thread looks for :meth:`overdue` reads): its puts could still land in our buffer,
        which is therefore held, never reused."""
        self.ctx.worker.defer(self._abandoned, x)

    def _abandoned(self, x: Xfer) -> None:
        x.abandoned = True
        self._session.abandon(x.req.xfer_id, x.deadline)
        if not x.finished and x.landed == x.nbytes:
            self._release(x)

    def overdue(self, now: float) -> Xfer | None:
        """Any thread: an abandoned read of ours that the peer has not finished by its deadline."""
        return self._session.overdue(now)

    def close_overdue(self, x: Xfer) -> None:
        """Work thread: close the link for :meth:`overdue` read ``x`` (unless it finished meanwhile)."""
        if not x.finished:
            self.close(self._session.overdue_error(x.req.xfer_id))

    def _prepare_packed(self, x: Xfer) -> None:
        """Work thread: our side of a packed transfer whose request is out (see start_packed),
        once: cut ``x`` into the pieces both sides agree on; a read prepares their scatter, a
        write gathers them and says READY as each is staged. A failure fails ``x``."""
        if x.finished or x.cancelled or x.pieces is not None:  # failed, cancelled, or an answer raced ahead
            return
        assert x.staging is not None
        try:
            packer = self.ctx.memory.packer()
            packer.wait_for(x.ready)  # the gather / scatter below are queued after the caller's work
            x.chunks = pieces_of(self.ctx.config, x.plan)
            if x.req.op is Op.READ:
                x.pieces = packer.pieces(x.plan, x.staging, x.chunks, gather=False)
                if x.marks:
                    x.marks("scatter prepared")
                return
            # each READY goes out as its piece is staged
            for _, hi in packer.pieces(x.plan, x.staging, x.chunks, gather=True).gather_staged():
                if x.finished or self._session.closed:
                    return
                self.send(Msg.READY, encode(Progress(x.req.xfer_id, hi)))
                if x.marks:
                    x.marks("READY sent")
        except KvxferError as exc:
            self._fail(x, exc)

    def _on_landed(self, xid: int, upto: int) -> None:
        """Packed read: the responder's bytes [0, upto) are in our staging buffer."""
        x = self._session.initiated(xid)
        if x is None or x.finished:
            return
        if x.req.op is not Op.READ or not x.landed < upto <= x.nbytes:
            raise RemoteProtocolError(f"LANDED {upto} B for transfer {xid} (had {x.landed} of {x.nbytes} B)")
        x.landed = upto
        if x.marks:
            x.marks("LANDED")
        if x.abandoned or x.cancelled:
            if upto == x.nbytes:  # the peer is done with our buffer
                self._release(x)
            return
        self._advance(x)

    def _advance(self, x: Xfer) -> None:
        """Work thread, packed read: prepare our scatter (once), queue the scatter of every
        piece wholly landed, and finish once all has. Idempotent; waits for the plan of a read
        started early (landings may overtake it: :meth:`_attached` calls this again)."""
        if x.finished or x.cancelled or x.plan is None:
            return
        if x.pieces is None:
            self._prepare_packed(x)
            if x.finished:
                return
        scatter_landed(x, x.landed)
        if x.landed < x.nbytes:
            return
        self.ctx.memory.packer().wait(x.token)
        if x.marks:
            x.marks("scattered")
        if x.req.notify is not None:
            self.send(Msg.NOTE, encode(Notify(x.req.notify)))
        self._complete(x)

    def _on_done(self, xid: int) -> None:
        """Packed write: the responder has every byte in place."""
        x = self._session.initiated(xid)
        if x is None or x.finished:
            return
        if x.req.op is not Op.WRITE:
            raise RemoteProtocolError(f"DONE for packed read {xid}")
        if x.cancelled:  # it finished before our CANCEL arrived: the buffer is free
            self._release(x)
            return
        if x.marks:
            x.marks("DONE")
        self._complete(x)

    def _on_err(self, xid: int, kind: str, msg: str) -> None:
        """The peer refused transfer ``xid`` of ours (a refusal of anything else is ignored)."""
        refused = self._session.on_refusal(Refusal(xid, kind, msg))
        if refused is not None:
            self._fail(*refused)

    def _release(self, x: Xfer) -> None:
        self._session.finish_initiated(x.req.xfer_id)
        x.finished = True
        if x.staging is not None:
            s, x.staging = x.staging, None
            self.ctx.memory.staging().put(s)

    def _complete(self, x: Xfer) -> None:
        self._release(x)
        assert x.handle is not None
        x.handle.set_done()
        if x.marks:
            x.marks("handle done")
            log.debug("%s %s %d of %d B in %d pieces, ms after it began: %s",
                      "packed" if x.chunks else "direct", x.req.op.value, x.req.xfer_id, x.nbytes,
                      len(x.chunks), x.marks)

    def _fail(self, x: Xfer, exc: KvxferError) -> None:
        self._release(x)
        x.report(exc)

    # -- cancel ------------------------------------------------------------------------------
    def cancel(self, x: Xfer, timeout: float | None) -> bool:
        """Any thread but the work thread (``TransferHandle.cancel``): fence our transfer ``x``
        (see the module's docstring). True once nothing of it can land in our blocks; False
        when it finished meanwhile.

        Raises:
            TransferTimeoutError: the fence was not made within ``timeout`` s (default
                ``close_timeout``): a DIRECT read's flush did not complete (a stalled peer);
                the handle ends CANCELLED once it does.
        """
        fenced = threading.Event()
        lock = threading.Lock()
        result: list[bool] = []
        gave_up = [False]

        def done(ok: bool) -> None:
            with lock:
                late = gave_up[0]
                result.append(ok)
                fenced.set()
            if late and ok and x.handle is not None:  # the cancel timed out; its fence is made now
                x.handle.set_cancelled()
        self.ctx.worker.defer(self._cancel, x, done)
        limit = self.ctx.config.close_timeout if timeout is None else timeout
        if not fenced.wait(limit):
            with lock:
                gave_up[0] = not fenced.is_set()
            if gave_up[0]:
                raise TransferTimeoutError(f"cancel of transfer {x.req.xfer_id} with {self.peer.name!r} not "
                                           f"fenced within {limit} s (its RMA is still in flight)")
        return result[0]

    def _cancel(self, x: Xfer, done: Callable[[bool], None]) -> None:
        """Work thread: the fence of :meth:`cancel`."""
        if x.finished or x.cancelled:
            done(not x.finished and x.cancelled)
            return
        x.cancelled = True
        if x.plan is not None and x.staging is None:  # DIRECT: RMA in flight until its flush
            if x.req.op is Op.WRITE:  # puts only read our blocks; the flush still sends no NOTE
                done(True)
                return
            x.fence = done
            if self._session.closed:
                self._fenced(x)
            return
        # packed: no scatter after this one; the peer may still use our buffer: keep it
        if x.token is not None:
            self.ctx.memory.packer().wait(x.token)
        self._session.abandon(x.req.xfer_id, x.deadline or time.monotonic() + _CANCEL_HOLD_S)
        self.send(Msg.CANCEL, encode(Cancel(x.req.xfer_id)))
        done(True)

    @staticmethod
    def _fenced(x: Xfer) -> None:
        fence, x.fence = x.fence, None
        if fence is not None:
            fence(True)

    def _on_handle_done(self, x: Xfer, h: TransferHandle) -> None:
        err = self._session.on_handle_failed(h.exception(), x.finished)
        if err is not None:  # RMA or the peer's copy may still land: the link is no longer safe to use
            self.ctx.worker.defer(self.close, err)

    # -- incoming dispatch -------------------------------------------------------------------
    def on_message(self, kind: Msg, h: dict, arrived: float = 0.0) -> None:
        """Work thread: one validated-envelope control message from this link's peer, which
        the progress thread received at ``arrived`` (``perf_counter``; tracing)."""
        if kind is Msg.HELLO_ACK:
            self.refusal = decode(HelloAck, h).refusal
            self.ready.set()
        elif kind is Msg.REQ:
            self.on_request(h, arrived)
        elif kind is Msg.DONE:
            done = decode(Done, h)
            if not done.yours:
                raise RemoteProtocolError(f"DONE for transfer {done.xfer_id}, not ours")
            self._on_done(done.xfer_id)
        elif kind is Msg.LANDED:
            p = decode(Progress, h)
            self._on_landed(p.xfer_id, p.upto)
        elif kind is Msg.READY:
            p = decode(Progress, h)
            self._on_ready(p.xfer_id, p.upto)
        elif kind is Msg.CANCEL:
            self.on_cancel(h)
        elif kind is Msg.ERR:
            r = decode(Refusal, h)
            self._on_err(r.xfer_id, r.kind, r.message)
        elif kind is Msg.NOTE:
            self.ctx.local.deliver_notification(self.peer.name, decode(Notify, h).payload)
        elif kind is Msg.BYE:
            decode(Goodbye, h)
            self.close(PeerLostError(f"peer {self.peer.name!r} closed the connection"))
        else:
            raise RemoteProtocolError(f"unexpected {kind.name} on an established link")

    # -- closing -----------------------------------------------------------------------------
    def close(self, exc: KvxferError | None = None) -> None:
        """Close the link; pending transfers fail with ``exc`` (PeerLostError by default).

        Runs on the backend's work thread (which closes the endpoint); from any other thread
        it hands over and waits up to ``close_timeout``. Idempotent.
        """
        if self._session.closed:
            return
        if self.ctx.worker.on_work_thread():
            self._close_now(exc)
            return
        done = threading.Event()
        self.ctx.worker.defer(lambda: (self._close_now(exc), done.set()))
        done.wait(self.ctx.config.close_timeout)

    def _close_now(self, exc: KvxferError | None) -> None:
        outstanding = self._session.close()
        if outstanding is None:
            return
        mine, serving = outstanding
        err = exc or PeerLostError(f"link to {self.peer.name!r} closed")
        self.ready.set()
        for x in mine:
            x.finished = True
            x.report(err)
        self._hold_staging([*mine, *serving])
        self.ctx.forget(self)
        self.ctx.local.link_lost(self, err)
        for rkey in self._staging_rkeys.values():
            self.ctx.worker.ucp.rkey_destroy(rkey)
        self._staging_rkeys.clear()
        if self._rkeys is not None:
            for k in self._rkeys:
                self.ctx.worker.ucp.rkey_destroy(k.rkey)
            self._rkeys = None
        self.ctx.worker.close_endpoint(self.ep, failed=self.ep_failed)

    def _hold_staging(self, cut: list[Xfer | Serving]) -> None:
        """The staging buffers of transfers cut off by the close: the peer, or an RMA of ours
        still in flight, may yet write them, so they are held until the connector closes
        (:meth:`~kvxfer.backends.staging.SizePool.hold`), not reused or freed."""
        held = [t.staging for t in cut if t.staging is not None]
        if not held:
            return
        pool = self.ctx.memory.staging()
        for t in cut:
            t.staging = None  # a late completion must not hand it back to the pool
        for s in held:
            pool.hold(s)
        log.info("link to %r closed with %d transfers unfinished: holding their %d B of staging until the "
                 "connector closes", self.peer.name, len(held), sum(s.nbytes for s in held))

    def hello(self, meta: bytes, addr: bytes) -> None:
        """Work thread: unpack the peer's rkeys and send HELLO."""
        try:
            self.remote_keys()
        except KvxferError as exc:
            self.refusal = str(exc)
            self.ready.set()
            return
        self.send(Msg.HELLO, proto.hello_body(meta, addr))
