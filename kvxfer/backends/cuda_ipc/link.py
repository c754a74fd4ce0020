"""One cuda_ipc peer: its tensors mapped into our address space, and a TCP control channel.

Layer: backends, cuda_ipc package. The control channel (:meth:`TcpBackend.connect_control`)
carries notifications and tells us when the peer goes away; the link then fails no transfer by
itself (their kernels are queued and cannot be recalled: the backend fails each once its kernel
is done) and releases the mappings once no launched kernel can still touch them.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import numpy as np

from ...errors import KvxferError, PeerLostError
from ...handle import TransferHandle
from ...metadata import PeerMetadata
from ..base import BackendLink, LinkOwner
from ..tcp import TcpLink
from . import handles as ipc

__all__ = ["CudaIpcLink", "IpcLinkOwner"]

log = logging.getLogger(__name__)


class IpcLinkOwner(LinkOwner, Protocol):
    """What a cuda_ipc link asks of its backend, besides what every link asks."""

    device: int

    def enqueue_notification(self, link: CudaIpcLink, payload: bytes) -> None:
        """Send ``payload`` once every transfer submitted before it is complete."""


class CudaIpcLink(BackendLink):
    """One peer reached through CUDA IPC: its mapped tensors and a TCP control connection."""

    backend_name = "cuda_ipc"

    def __init__(self, backend: IpcLinkOwner, peer: PeerMetadata, handles: list[bytes],
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
        self.ctrl: TcpLink | None = None  # the control channel (TcpBackend.connect_control)
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
            ctrl.close(err, goodbye=True)  # calls control_closed through the channel's hook
        self.control_closed(err)

    def control_closed(self, exc: KvxferError) -> None:
        """The link is lost (its control channel closed, or :meth:`close`): no new transfers;
        mappings are released once no launched kernel can touch them."""
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
        self.backend.forget(self)
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
    def begin(self, handle: TransferHandle | None) -> None:
        """A kernel (of ``handle``'s transfer, or an ordered notification) is about to be
        launched on the peer's mappings. Raises PeerLostError: the link is closed."""
        with self._lock:
            if self._closed:
                raise PeerLostError(f"link to {self.peer.name!r} is closed")
            self._inflight += 1
            if handle is not None:
                self._pending.add(handle)

    def end(self, handle: TransferHandle | None) -> None:
        """A kernel :meth:`begin` announced is complete (or was never launched)."""
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
        self.backend.enqueue_notification(self, bytes(payload))

    def send_now(self, payload: bytes) -> None:
        """Send ``payload`` over the control channel now. Raises PeerLostError: it is closed."""
        if self.ctrl is None or self.ctrl.closed:
            raise PeerLostError(f"control connection to {self.peer.name!r} is closed")
        self.ctrl.send_notification(payload)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<CudaIpcLink {self.peer.name!r} cuda:{self.backend.device}->peer bus {self.peer_device} {state}>"
