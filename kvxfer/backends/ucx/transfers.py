"""The transfers a UCX link has in flight, as records, and how a packed one is cut into pieces.

Layer: backends/ucx (state of :mod:`~kvxfer.backends.ucx.link`; no I/O). An initiator keeps an
:class:`Xfer` per transfer it started, a responder a :class:`Serving` per packed transfer it
serves; both sides cut a packed transfer into the same pieces (:func:`pieces_of`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ...errors import KvxferError, PeerLostError
from ...handle import Op, TransferHandle
from ...plan import TransferPlan
from ...protocol.messages import TransferRequest
from .config import piece_bytes, piece_edge, piece_first
from .packed import Staging
from .ucp import status_name

__all__ = ["Marks", "Serving", "Xfer", "lost_error", "piece_sizes", "pieces_of", "scatter_landed"]



@functools.lru_cache(maxsize=64)
def piece_sizes(config: Any, nbytes: int) -> tuple[int, int, int]:
    """(target, edge, first) piece sizes of a packed transfer of ``nbytes`` (see :mod:`.config`)."""
    return piece_bytes(config, nbytes), piece_edge(config, nbytes), piece_first(config, nbytes)


def pieces_of(config: Any, plan: TransferPlan) -> list[tuple[int, int, int, int]]:
    """How a packed transfer is pipelined: both sides cut it the same way (ramped pieces of
    about ``piece_bytes``; see :mod:`.config`)."""
    return plan.chunk_bounds(*piece_sizes(config, plan.nbytes))


class Marks:
    """Where one packed transfer's time goes, kept only while ``log`` logs at DEBUG:
    labelled ``perf_counter`` stamps, logged in ms after ``t0`` when the transfer ends."""

    __slots__ = ("t0", "stamps")

    def __init__(self, t0: float):
        self.t0 = t0
        self.stamps: list[tuple[str, float]] = []

    @staticmethod
    def start(t0: float, log: logging.Logger) -> Marks | None:
        return Marks(t0) if log.isEnabledFor(logging.DEBUG) else None

    def __call__(self, label: str) -> None:
        self.stamps.append((label, time.perf_counter()))

    def __str__(self) -> str:
        return ", ".join(f"{label} {(t - self.t0) * 1e3:.3f}" for label, t in self.stamps)


def lost_error(status: int, peer: str) -> PeerLostError:
    """The error for a UCX completion with a failed ``status`` on the link to ``peer``."""
    return PeerLostError(f"UCX operation with {peer!r} failed: {status_name(status)}")


@dataclass(eq=False)
class Xfer:
    """A transfer this side initiated, until its handle finishes. A read started early
    (``UcxLink.start_packed_early``) has no plan and no handle until ``UcxLink.attach``; an
    abandoned one (its plan failed) only waits for the peer to be done with our buffer."""

    req: TransferRequest
    plan: TransferPlan | None
    handle: TransferHandle | None
    nbytes: int = 0
    staging: Staging | None = None
    finished: bool = False
    abandoned: bool = False
    error: KvxferError | None = None  # why it ended before it had a handle
    chunks: list = field(default_factory=list)  # packed: chunk_bounds (first pair, end pair, first byte, end)
    landed: int = 0  # packed read: staged bytes the responder has put into our buffer
    scattered: int = 0  # packed read: pieces whose scatter is queued
    token: Any = None  # the last queued scatter
    pieces: Any = None  # packed read: the prepared scatter
    ready: Any = None  # GPU memory: the caller's stream event our accesses wait for
    marks: Marks | None = None  # ms since the handle was created (DEBUG logging only)
    deadline: float = 0.0  # read started early: its end by the caller's timeout (time.monotonic), see overdue()
    cancelled: bool = False  # TransferHandle.cancel: nothing more of ours is touched
    fence: Any = None  # a cancelled DIRECT transfer: called once its RMA can no longer land

    def report(self, exc: KvxferError) -> None:
        """Fail the handle with ``exc``; a read started early without one yet keeps it for
        ``UcxLink.attach`` to report."""
        if self.handle is None:
            self.error = exc
        else:
            self.handle.set_failed(exc)


@dataclass(eq=False)
class Serving:
    """A packed transfer the peer initiated, while we serve it."""

    xid: int
    op: Op
    plan: TransferPlan
    notify: bytes | None
    staging: Staging | None  # None once held by the link's close (``UcxLink`` holds it)
    rkey: int
    address: int = 0  # the initiator's staging buffer
    chunks: list = field(default_factory=list)
    ready: int = 0  # packed write: staged bytes the initiator said we may fetch (and we asked for)
    scattered: int = 0
    token: Any = None
    pieces: Any = None
    marks: Marks | None = None  # ms since the request arrived (DEBUG logging only)
    cancelled: bool = False  # the initiator cancelled it (CANCEL): no more puts, gets or scatters


def scatter_landed(t: Xfer | Serving, upto: int) -> None:
    """Queue the scatter of every piece of ``t`` now wholly in its staging buffer (bytes [0, upto))."""
    while t.scattered < len(t.chunks) and t.chunks[t.scattered][3] <= upto:
        t.token = t.pieces.launch(t.scattered)
        t.scattered += 1
