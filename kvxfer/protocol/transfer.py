"""The rules of the transfers on one link, as a state machine with no I/O.

Layer: protocol (sans-I/O; used by the TCP and UCX links). A :class:`TransferSession` keeps the
transfers a link has outstanding, in two tables: those this side *initiated* (it holds their
handles) and those it *serves* for the peer. Feeding it the peer's messages (:class:`Done`,
:class:`Refusal`) says which transfer they finish, and with what; the link does the I/O
(sending, completing handles, freeing buffers). The rules it holds:

- A transfer id is registered once per table: a peer reusing one while it is in flight is a
  protocol error; starting a transfer on a closed session is a lost peer.
- A refusal fails only a transfer of ours; a done names its table (``Done.yours``); answers for
  transfers no longer known (finished, failed at their deadline, closed) are ignored.
- A request the peer's data may overtake (TCP: data and control travel on different
  connections) is waited for up to a bound (:meth:`await_served`); an id refused meanwhile
  yields nothing to write into.
- Deadlines: the handle's own deadline is the connector's (``TransferHandle.deadline``). When a
  handle fails with :class:`TransferTimeoutError` before its transfer finished, bytes may still
  land: the **initiator closes the link** (:meth:`on_handle_failed`). The responder never closes
  on a timeout; it learns of the close as a lost link. A transfer abandoned by its initiator
  (its plan failed after the request went out) keeps its buffer until the peer is done with it,
  at most until its deadline (:meth:`abandon`, :meth:`overdue`): then the initiator closes too.
- A cancel (:class:`Cancel`, from the initiator) ends a transfer we serve: it is forgotten
  like a refused one (data still on its way for it is discarded, never waited for) and the
  link stops sending or receiving it (:meth:`on_cancel`). The initiator makes its own fence
  (see ``TransferHandle.cancel``).
- Closing hands back every outstanding transfer of both tables once (:meth:`close`).

Every method is thread-safe (one re-entrant lock, :attr:`lock`, which a link may also hold
around its own steps, such as registering a transfer and posting its request atomically).
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from ..errors import KvxferError, PeerLostError, RemoteProtocolError, TransferTimeoutError
from .messages import Cancel, Done, Refusal

__all__ = ["TransferSession"]

T = TypeVar("T")


class TransferSession(Generic[T]):
    """The outstanding transfers of one link to peer ``peer``; ``T`` is the link's record of
    one transfer (whatever it needs to move the bytes)."""

    def __init__(self, peer: str):
        self.peer = peer
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self._initiated: dict[int, T] = {}
        self._served: dict[int, T] = {}
        self._refused: set[int] = set()
        self._deadlines: dict[int, float] = {}  # abandoned transfers of ours -> their deadline
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    # -- transfers this side starts ---------------------------------------------------------
    def start(self, xfer_id: int, record: T) -> None:
        """Register a transfer this side initiates.

        Raises:
            PeerLostError: the session is closed.
        """
        with self.lock:
            if self._closed:
                raise PeerLostError(f"link to {self.peer!r} is closed")
            self._initiated[xfer_id] = record

    def initiated(self, xfer_id: int) -> T | None:
        """The transfer of ours with this id, or None (unknown, or finished)."""
        with self.lock:
            return self._initiated.get(xfer_id)

    def finish_initiated(self, xfer_id: int) -> T | None:
        """Forget a transfer of ours (done, failed or released); None when it was not known."""
        with self.lock:
            self._deadlines.pop(xfer_id, None)
            return self._initiated.pop(xfer_id, None)

    def abandon(self, xfer_id: int, deadline: float) -> None:
        """Our transfer ``xfer_id`` will not go on (its plan failed), but the peer may still be
        using our buffer: keep it until finished, or :meth:`overdue` after ``deadline``
        (``time.monotonic``)."""
        with self.lock:
            if xfer_id in self._initiated:
                self._deadlines[xfer_id] = deadline

    def overdue(self, now: float) -> T | None:
        """An abandoned transfer of ours that the peer has not finished by its deadline: the
        link must close (its bytes could still land)."""
        with self.lock:
            for xid, deadline in self._deadlines.items():
                if deadline < now and xid in self._initiated:
                    return self._initiated[xid]
            return None

    def overdue_error(self, xfer_id: int) -> PeerLostError:
        """The error an :meth:`overdue` transfer's link closes with."""
        return PeerLostError(f"peer {self.peer!r} did not finish transfer {xfer_id} by its timeout "
                             "(abandoned: our plan failed); link closed")

    def on_handle_failed(self, exc: BaseException | None, finished: bool) -> PeerLostError | None:
        """A transfer of ours failed with ``exc`` from outside (``finished``: the link had
        already finished it). Returns the error to close the link with, or None to keep it:
        a transfer timed out before finishing may still move bytes, so the initiator closes."""
        if isinstance(exc, TransferTimeoutError) and not finished:
            return PeerLostError(f"link to {self.peer!r} closed after a transfer timed out")
        return None

    # -- transfers the peer starts ----------------------------------------------------------
    def serve(self, xfer_id: int, record: T) -> None:
        """Register a transfer the peer asked for (validated by the caller).

        Raises:
            RemoteProtocolError: the peer reused an id still in flight.
        """
        with self._cond:
            if xfer_id in self._served:
                raise RemoteProtocolError(f"transfer id {xfer_id} reused while in flight")
            self._served[xfer_id] = record
            self._cond.notify_all()

    def refuse(self, xfer_id: int, exc: BaseException) -> Refusal:
        """Refuse the peer's transfer ``xfer_id`` because of ``exc``: the message to answer."""
        with self._cond:
            self._refused.add(xfer_id)
            self._cond.notify_all()
        return Refusal.of(xfer_id, exc)

    def served(self, xfer_id: int) -> T | None:
        """The peer's transfer with this id that we serve, or None."""
        with self.lock:
            return self._served.get(xfer_id)

    def finish_served(self, xfer_id: int) -> T | None:
        """Forget a transfer we served; None when it was not known."""
        with self.lock:
            return self._served.pop(xfer_id, None)

    def await_served(self, xfer_id: int, timeout: float) -> T | None:
        """The peer's transfer ``xfer_id``, waiting up to ``timeout`` s for its request (data
        may overtake it); None when it was refused, or the session closed.

        Raises:
            RemoteProtocolError: no request came for it in time.
        """
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._closed or xfer_id in self._served or xfer_id in self._refused, timeout=timeout)
            if not ok:
                raise RemoteProtocolError(f"DATA for unknown transfer {xfer_id}")
            return self._served.get(xfer_id)

    # -- the peer's answers -----------------------------------------------------------------
    def on_done(self, msg: Done) -> T | None:
        """The peer finished transfer ``msg.xfer_id`` (of ours when ``msg.yours``, else one we
        served): the record to complete, or None when it is no longer known."""
        if msg.yours:
            return self.finish_initiated(msg.xfer_id)
        return self.finish_served(msg.xfer_id)

    def on_refusal(self, msg: Refusal) -> tuple[T, KvxferError] | None:
        """The peer refused a transfer of ours: its record and the error to fail it with, or
        None when it is no longer known."""
        record = self.finish_initiated(msg.xfer_id)
        return None if record is None else (record, msg.error())

    def on_cancel(self, msg: Cancel) -> T | None:
        """The initiator cancelled transfer ``msg.xfer_id`` that we serve: its record (forgotten
        here; the link stops moving it), or None when it is no longer known (finished, refused,
        or never seen). Its id is then treated as refused by :meth:`await_served`."""
        with self._cond:
            self._refused.add(msg.xfer_id)
            self._cond.notify_all()
            return self._served.pop(msg.xfer_id, None)

    # -- closing ----------------------------------------------------------------------------
    def close(self) -> tuple[list[T], list[T]] | None:
        """Close the session: (transfers of ours, transfers we served) still outstanding, which
        the link fails and releases; None when it was closed already."""
        with self._cond:
            if self._closed:
                return None
            self._closed = True
            mine, theirs = list(self._initiated.values()), list(self._served.values())
            self._initiated.clear()
            self._served.clear()
            self._deadlines.clear()
            self._cond.notify_all()
        return mine, theirs
