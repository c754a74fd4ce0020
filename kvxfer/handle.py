"""TransferHandle: the caller's view of one transfer (status, wait, stats, failure).

Layer: shared by the Connector and the backends; backends complete or fail handles.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from .errors import KvxferError, TransferCancelledError, TransferTimeoutError

__all__ = ["TransferStatus", "TransferStats", "TransferHandle", "Op", "HandleDriver", "Canceller"]


class HandleDriver(Protocol):
    """A backend's way to finish a transfer on the thread that waits for it (cuda_ipc's small
    transfers), given to the handle with :meth:`TransferHandle.set_driver`."""

    def drive(self, timeout: float | None) -> None:
        """Called by :meth:`TransferHandle.wait` before it blocks: finish the transfer here if
        it completes within a short while; otherwise return, and have the backend finish it
        without further driving."""

    def watch(self) -> None:
        """A done callback was added: the backend must finish the transfer by itself, promptly."""


class Canceller(Protocol):
    """A backend's fence for one transfer, given to the handle with
    :meth:`TransferHandle.set_canceller` and called once by :meth:`TransferHandle.cancel`."""

    def __call__(self, timeout: float | None) -> bool:
        """Stop the transfer and tell the peer. Return True once no byte of it can be written
        into our blocks any more; False when it is already finishing by itself (the backend
        then completes or fails the handle as usual).

        Raises:
            TransferTimeoutError: the fence could not be made within ``timeout`` seconds.
        """


class Op(Enum):
    """Direction of a transfer, seen from the side that called it."""

    READ = "read"
    WRITE = "write"


class TransferStatus(Enum):
    """Life cycle of a transfer."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class TransferStats:
    """What a finished transfer moved and how long it took."""

    nbytes: int
    seconds: float
    backend: str

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class TransferHandle:
    """Returned at once by ``Connector.read``/``write``; completes when the bytes are in place.

    ``failed_blocks`` names the destination blocks that may be partly written when the
    transfer failed or was cancelled.
    """

    __slots__ = ("op", "peer_name", "nbytes", "backend", "dst_blocks", "deadline", "_event",
                 "_status", "_exc", "_t0", "_t1", "_lock", "_callbacks", "_driver", "_canceller",
                 "_cancelling", "_deferred", "__weakref__")

    def __init__(self, op: Op, peer_name: str, nbytes: int, backend: str, dst_blocks: np.ndarray,
                 deadline: float | None = None):
        self.op = op
        self.peer_name = peer_name
        self.nbytes = nbytes
        self.backend = backend
        self.dst_blocks = dst_blocks
        self.deadline = deadline
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._status = TransferStatus.PENDING
        self._exc: KvxferError | None = None
        self._t0 = time.perf_counter()
        self._t1: float | None = None
        self._callbacks: list[Callable[[TransferHandle], None]] = []
        self._driver: HandleDriver | None = None  # see set_driver
        self._canceller: Canceller | None = None  # see set_canceller
        self._cancelling = False  # a cancel() is making its fence
        self._deferred: KvxferError | None = None  # a failure reported while it does

    # -- caller API ---------------------------------------------------------------------
    @property
    def status(self) -> TransferStatus:
        return self._status

    def done(self) -> bool:
        """True once the transfer finished, successfully or not."""
        return self._status is not TransferStatus.PENDING

    def wait(self, timeout: float | None = None) -> TransferStats:
        """Block until the transfer finishes; return its stats.

        Raises:
            TransferTimeoutError: not finished within ``timeout`` seconds (the transfer goes on).
            KvxferError: the transfer failed (the same error as :meth:`exception`).
        """
        driver = self._driver
        if driver is not None and not self._event.is_set():
            try:
                driver.drive(timeout)
            except Exception:  # the backend's own completion path still finishes the transfer
                pass
        if not self._event.wait(timeout):
            raise TransferTimeoutError(f"{self.op.value} of {self.nbytes} B with {self.peer_name!r} not done after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self.stats

    @property
    def created(self) -> float:
        """When the handle was made (``time.perf_counter``), just after the transfer was planned."""
        return self._t0

    def exception(self) -> KvxferError | None:
        """The error that failed the transfer, or None."""
        return self._exc

    @property
    def failed_blocks(self) -> np.ndarray:
        """Destination blocks that may hold partial data (empty unless failed)."""
        failed = self._status is TransferStatus.FAILED or self._status is TransferStatus.CANCELLED
        return self.dst_blocks if failed else np.zeros(0, dtype=np.int64)

    @property
    def stats(self) -> TransferStats:
        end = self._t1 if self._t1 is not None else time.perf_counter()
        return TransferStats(self.nbytes, end - self._t0, self.backend)

    def add_done_callback(self, fn: Callable[[TransferHandle], None]) -> None:
        """Call ``fn(handle)`` once the transfer finishes (at once if it already has)."""
        with self._lock:
            pending = self._status is TransferStatus.PENDING
            if pending:
                self._callbacks.append(fn)
        if not pending:
            fn(self)
        elif self._driver is not None:
            self._driver.watch()

    def cancel(self, timeout: float | None = None) -> bool:
        """Cancel the transfer and tell the peer; True when the handle ends CANCELLED.

        When it returns True no byte of this transfer will be written into our blocks later:
        they may be reused at once (they may hold part of the transfer). :meth:`wait` then
        raises :class:`~kvxfer.errors.TransferCancelledError`. Each backend makes the fence
        its own way (see its link's ``cancel``): TCP stops receiving into the blocks (a peer
        that stalls mid-chunk gets the link dropped), UCX waits for its RMA (flush) and for
        every queued scatter, cuda_ipc waits for its kernel. A write's peer may already hold
        its bytes when the cancel reaches it. False, changing nothing, when the
        transfer already finished (done or failed), or finished by itself meanwhile. Idempotent
        and thread-safe: a second call returns True once the first has fenced it; a cancel
        racing completion ends in exactly one final state.

        Raises:
            TransferTimeoutError: the fence could not be made within ``timeout`` seconds (a
                UCX DIRECT flush or a cuda_ipc kernel still running): the handle stays pending
                and ends CANCELLED once the fence is made (or FAILED, if the link fails first).
        """
        with self._lock:
            if self._status is TransferStatus.CANCELLED:
                return True
            if self._status is not TransferStatus.PENDING:
                return False
            first = not self._cancelling
            self._cancelling = True
            canceller = self._canceller
        if not first:  # another thread makes the fence
            if not self._event.wait(60.0 if timeout is None else timeout):
                raise TransferTimeoutError(f"cancel of {self!r} not fenced after {timeout} s")
            return self._status is TransferStatus.CANCELLED
        try:
            fenced = True if canceller is None else bool(canceller(timeout))
        except BaseException:
            self._end_cancelling()
            raise
        if not fenced:  # finishing by itself: its own completion decides
            if self._end_cancelling() is None:
                self._event.wait(60.0 if timeout is None else timeout)
            return self._status is TransferStatus.CANCELLED
        # finished while still marked cancelling: no failure can slip in between
        ok = self._finish(TransferCancelledError(
            f"{self.op.value} of {self.nbytes} B with {self.peer_name!r} cancelled"), cancelled=True)
        self._end_cancelling(apply=False)
        return ok

    def _end_cancelling(self, apply: bool = True) -> KvxferError | None:
        with self._lock:
            self._cancelling = False
            deferred, self._deferred = self._deferred, None
        if deferred is not None and apply:
            self._finish(deferred)
        return deferred

    # -- backend API --------------------------------------------------------------------
    def set_canceller(self, canceller: Canceller) -> None:
        """How :meth:`cancel` fences this transfer (see :class:`Canceller`). Set by the backend
        when it submits, before the handle is returned to the caller."""
        self._canceller = canceller

    def set_driver(self, driver: HandleDriver) -> None:
        """Let ``driver`` finish this transfer on the thread that waits for it: :meth:`wait`
        calls ``driver.drive(timeout)`` before it blocks, and adding a done callback calls
        ``driver.watch()`` (the backend must then finish it by itself). Set by the backend
        right after submitting, before the handle is returned to the caller."""
        self._driver = driver

    def _finish(self, exc: KvxferError | None, cancelled: bool = False) -> bool:
        with self._lock:
            if self._status is not TransferStatus.PENDING:
                return False
            if exc is not None and not cancelled and self._cancelling:
                # a failure while the fence is being made (its link dropped, its deadline):
                # the cancel decides; if its fence fails, this failure is applied then
                if self._deferred is None:
                    self._deferred = exc
                return False
            self._t1 = time.perf_counter()
            self._exc = exc
            self._status = (TransferStatus.DONE if exc is None else
                            TransferStatus.CANCELLED if cancelled else TransferStatus.FAILED)
            callbacks, self._callbacks = self._callbacks, []
        self._finished()
        self._event.set()
        for fn in callbacks:
            fn(self)
        return True

    def set_done(self) -> bool:
        """Mark done; False when the handle had already finished."""
        return self._finish(None)

    def set_cancelled(self) -> bool:
        """Mark cancelled: the fence of a :meth:`cancel` that timed out is made now (its
        backend's late completion). False when finished already or a cancel is fencing it."""
        with self._lock:
            if self._cancelling:
                return False
        return self._finish(TransferCancelledError(
            f"{self.op.value} of {self.nbytes} B with {self.peer_name!r} cancelled (fenced late)"), cancelled=True)

    def set_failed(self, exc: KvxferError) -> bool:
        """Mark failed with ``exc``; False when the handle had already finished (or a
        :meth:`cancel` is fencing it: the cancel then decides)."""
        return self._finish(exc)

    def __repr__(self) -> str:
        return f"<TransferHandle {self.op.value} {self.nbytes} B peer={self.peer_name!r} via {self.backend} {self._status.value}>"

    def _finished(self) -> None:
        """Runs once, on the thread that finished the handle, after its status is final and
        before waiters wake. A hook for subclasses (the Connector's handles count themselves
        in its metrics here); it must not raise."""
