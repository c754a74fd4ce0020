"""The UCX backend's link: one peer over one endpoint, and the transfers on it.

Layer: backends (per-peer state of ucx.py). Every method runs on the backend's work thread
unless it says otherwise; the endpoint's completions arrive on the progress thread and are
handed back with ``backend.defer``. Messages are encoded and checked by
:mod:`kvxfer.backends.ucx_protocol`.

How a transfer moves
--------------------
``connect`` creates ONE endpoint to the peer's worker address (reused for every transfer),
sends HELLO (our metadata) and waits for HELLO_ACK; the peer opens its own endpoint back to us
(with error handling, so it learns when we die). The initiator unpacks the peer's rkeys once
per link.

- DIRECT (few, large ranges): the initiator posts one put (write) or get (read) per coalesced
  range straight between KV tensors, then one ``ucp_ep_flush_nbx``; when the flush completes
  every byte is in place remotely. The responder's Python is not in the data path; a NOTE
  message carrying the notification follows the flush.
- PACKED (many small ranges): the initiator packs into a registered staging buffer (see
  :mod:`kvxfer.backends.ucx_staging`) and sends REQ naming the blocks, its staging address
  and rkey; the responder validates every id against its own layout, then moves one buffer
  with one RMA (get for a write, put for a read) between the two staging buffers,
  scatters/gathers on its side, and answers DONE or ERR.

A lost peer fails every pending handle with PeerLostError; a handle that times out closes its
link, since RMA may still land.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    BlockIdError,
    KvxferError,
    LayoutError,
    PeerLostError,
    RemoteProtocolError,
    TransferTimeoutError,
    TransportError,
)
from ..handle import Op, TransferHandle
from ..metadata import PeerMetadata
from ..plan import TransferPlan
from . import _ucp
from . import ucx_protocol as proto
from .base import BackendLink, TransferRequest, plan_for_responder, remote_error
from .ucx_protocol import Msg
from .ucx_staging import Staging

if TYPE_CHECKING:
    from .ucx import UcxBackend

__all__ = ["UcxLink", "lost_error"]

log = logging.getLogger(__name__)


def lost_error(status: int, peer: str) -> PeerLostError:
    """The error for a UCX completion with a failed ``status`` on the link to ``peer``."""
    return PeerLostError(f"UCX operation with {peer!r} failed: {_ucp.status_name(status)}")


@dataclass(eq=False)
class _Xfer:
    """A transfer this side initiated, until its handle finishes."""

    req: TransferRequest
    plan: TransferPlan
    handle: TransferHandle
    staging: Staging | None = None
    finished: bool = False


@dataclass(eq=False)
class _Serving:
    """A packed transfer the peer initiated, while we serve it."""

    xid: int
    op: Op
    plan: TransferPlan
    notify: bytes | None
    staging: Staging
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
        self.incoming = False  # created by the peer's HELLO (True) or by our connect()
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
            regions = proto.peer_regions(self.peer)
            self._rkeys = [_ucp.RemoteKey(addr, length, self.backend.ucp.rkey_unpack(self.ep_handle, packed))
                           for addr, length, packed in regions]
        return self._rkeys

    # -- sending ----------------------------------------------------------------------------
    def send(self, kind: Msg, body: dict[str, Any]) -> None:
        """Send one control message (eager AM). A failed send closes the link."""
        if self._closed and kind is not Msg.BYE:
            return
        data = proto.encode_message(kind, self.backend.session, body)

        def sent(status: int, _keep: bytes = data) -> None:
            if status != 0 and kind is not Msg.BYE:
                self.ep_failed = True
                self.backend.defer(self.close, lost_error(status, self.peer.name))

        self.backend.ucp.am_send(self.ep_handle, proto.AM_ID, data, sent)
        self.backend.wake()

    def send_notification(self, payload: bytes) -> None:
        """Deliver ``payload`` to the peer's notification queue (after earlier transfers' bytes).

        Raises:
            PeerLostError: the link is closed.
        """
        if self._closed:
            raise PeerLostError(f"link to {self.peer.name!r} is closed")
        self.backend.defer(self.send, Msg.NOTE, proto.note_body(bytes(payload)))

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
            self.close(lost_error(status, self.peer.name))
            return
        if x.req.notify is not None:
            self.send(Msg.NOTE, proto.note_body(x.req.notify))
        self._complete(x)

    def _start_packed(self, x: _Xfer) -> None:
        pool, packer = self.backend.staging(), self.backend.packer()
        x.staging = pool.get(x.plan.nbytes)
        if x.req.op is Op.WRITE:
            packer.gather(x.plan, x.staging)
        self.send(Msg.REQ, proto.request_body(x.req, x.staging.address, x.staging.rkey, x.plan.nbytes))

    def _on_done(self, xid: int) -> None:
        with self._lock:
            x = self._mine.get(xid)
        if x is None or x.finished:
            return
        if x.req.op is Op.READ:
            assert x.staging is not None
            self.backend.packer().scatter(x.plan, x.staging)
            if x.req.notify is not None:
                self.send(Msg.NOTE, proto.note_body(x.req.notify))
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
        p = proto.decode_request(h)
        req, xid, notify, addr, key, nbytes = p.req, p.req.xfer_id, p.req.notify, p.address, p.rkey, p.nbytes
        try:
            plan = plan_for_responder(self.backend.layout, self.peer, req)
            if plan.nbytes != nbytes:
                raise BlockIdError(f"request says {nbytes} B but its blocks hold {plan.nbytes} B")
        except (BlockIdError, LayoutError) as exc:
            log.info("refusing transfer %d from %r: %s", xid, self.peer.name, exc)
            self.send(Msg.ERR, proto.err_body(xid, type(exc).__name__, str(exc)))
            return
        if plan.nbytes == 0:
            self._served(_Serving(xid, req.op, plan, notify, None, 0), 0)  # type: ignore[arg-type]
            return
        staging = self.backend.staging().get(plan.nbytes)
        try:
            rkey = self.backend.ucp.rkey_unpack(self.ep_handle, key)
        except _ucp.UcxCallError as exc:
            self.backend.staging().put(staging)
            self.send(Msg.ERR, proto.err_body(xid, "RemoteProtocolError", f"bad staging rkey: {exc}"))
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
                self.close(lost_error(status, self.peer.name))
                return
            if s.op is Op.WRITE:
                if s.staging is not None:
                    self.backend.packer().scatter(s.plan, s.staging)
                if s.notify is not None:
                    self.backend.local.deliver_notification(self.peer.name, s.notify)
            self.send(Msg.DONE, proto.done_body(s.xid))
        finally:
            if s.staging is not None:
                self.backend.ucp.rkey_destroy(s.rkey)
                self.backend.staging().put(s.staging)

    # -- incoming dispatch -------------------------------------------------------------------
    def on_message(self, kind: Msg, h: dict) -> None:
        """Work thread: one validated-envelope control message from this link's peer."""
        if kind is Msg.HELLO_ACK:
            self.refusal = proto.decode_hello_ack(h)
            self.ready.set()
        elif kind is Msg.REQ:
            self.on_request(h)
        elif kind is Msg.DONE:
            self._on_done(proto.decode_done(h))
        elif kind is Msg.ERR:
            self._on_err(*proto.decode_err(h))
        elif kind is Msg.NOTE:
            self.backend.local.deliver_notification(self.peer.name, proto.decode_note(h))
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
        self.send(Msg.HELLO, proto.hello_body(meta, addr))
