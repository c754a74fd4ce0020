"""The backend interface and what every backend shares.

Layer: backends. A backend moves the bytes of validated plans between this process and a peer
and completes :class:`~kvxfer.handle.TransferHandle` objects. It knows nothing about requests
or the registry. The Connector owns backends and is their :class:`LocalSide`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Protocol


from ..errors import BlockIdError, KvxferError, LayoutError
from ..handle import Op, TransferHandle
from ..layout import KVLayout
from ..metadata import PeerMetadata
from ..plan import TransferPlan, plan_transfer
from ..protocol.messages import TransferRequest, remote_error

__all__ = [
    "Backend",
    "BackendKind",
    "BackendLink",
    "LinkOwner",
    "LocalSide",
    "TransferRequest",
    "plan_for_initiator",
    "plan_for_responder",
    "remote_error",
]

log = logging.getLogger(__name__)


class BackendKind(Enum):
    """The transports kvxfer knows."""

    TCP = "tcp"
    CUDA_IPC = "cuda_ipc"
    UCX = "ucx"


class LocalSide(Protocol):
    """What a backend may ask of the Connector that owns it."""

    name: str
    session: str  # this connector's identity for its whole life (links add their own suffix)

    @property
    def layout(self) -> KVLayout | None: ...

    def local_metadata(self) -> PeerMetadata: ...

    def deliver_notification(self, peer_name: str, payload: bytes) -> None: ...

    def link_lost(self, link: BackendLink, exc: KvxferError) -> None: ...


def plan_for_initiator(layout: KVLayout, peer: PeerMetadata, req: TransferRequest) -> TransferPlan:
    """Plan a transfer this side starts; the peer's ids are checked against its geometry too."""
    if peer.geometry is None:
        raise LayoutError(f"peer {peer.name!r} registered no KV layout")
    return _plan(layout, peer, req, initiator=True)


def _plan(layout: KVLayout, peer: PeerMetadata, req: TransferRequest, *, initiator: bool) -> TransferPlan:
    local_is_src = (req.op is Op.WRITE) == initiator
    src, dst = (layout.geometry, peer.geometry) if local_is_src else (peer.geometry, layout.geometry)
    assert dst is not None and src is not None
    if req.reshard is not None:
        return req.reshard.plan(src, dst, req.src_blocks, req.dst_blocks, req.layers)
    return plan_transfer(src, dst, req.src_blocks, req.dst_blocks, req.layers,
                         check_src=initiator or local_is_src, check_dst=initiator or not local_is_src)


def plan_for_responder(layout: KVLayout | None, peer: PeerMetadata, req: TransferRequest) -> TransferPlan:
    """Plan a transfer a peer started, validating every one of our ids against our own layout.

    The peer's own ids are not range-checked here: it checked them before asking, and our side
    never addresses its memory by them (they only shape the stream's runs, which the peer
    computes alike). A peer lying about them can only garble its own copy."""
    if layout is None:
        raise LayoutError("no KV layout is registered on this connector")
    if peer.geometry is None:
        raise LayoutError(f"peer {peer.name!r} registered no KV layout")
    if req.layers is not None and req.layers.size and (req.layers.min() < 0 or req.layers.max() >= layout.num_tensors):
        raise BlockIdError(f"layers {req.layers.tolist()} out of range; valid are 0..{layout.num_tensors - 1}")
    return _plan(layout, peer, req, initiator=False)


class BackendLink(ABC):
    """One backend's connection to one peer."""

    peer: PeerMetadata
    backend_name: str

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @abstractmethod
    def close(self, exc: KvxferError | None = None) -> None:
        """Close the link; pending transfers fail with ``exc`` (PeerLostError by default)."""


class LinkOwner(Protocol):
    """What a link asks of the backend that made it (each backend's links may ask more)."""

    local: LocalSide

    def forget(self, link: Any) -> None:
        """The link closed: stop listing it."""


class Backend(ABC):
    """A transport: describes its endpoint, connects to peers, executes transfers."""

    name: str

    @abstractmethod
    def endpoint(self) -> dict[str, Any]:
        """msgpack-able description of this backend's endpoint, put in the connector metadata."""

    @abstractmethod
    def can_reach(self, peer: PeerMetadata) -> bool:
        """Whether this backend can move this layout's bytes to and from ``peer``."""

    @abstractmethod
    def connect(self, peer: PeerMetadata, timeout: float) -> BackendLink:
        """Open a link to ``peer``. Raises TransportError or TransferTimeoutError."""

    @abstractmethod
    def submit(self, link: BackendLink, req: TransferRequest, plan: TransferPlan, handle: TransferHandle) -> None:
        """Start moving ``plan``'s bytes; complete or fail ``handle`` later, from any thread."""

    def start_early(self, link: BackendLink, req: TransferRequest, timeout: float) -> Any:
        """Optionally start ``req`` before the caller has planned (validated) it, where the
        peer can begin meanwhile. Returns a token for :meth:`submit_early` (plan made) or
        :meth:`abandon_early` (planning failed), or None: not started, use :meth:`submit`.
        A backend that starts early must touch none of the caller's memory before
        :meth:`submit_early`. ``timeout``: the transfer's deadline in seconds, which bounds
        how long an abandoned one may keep anything of ours."""
        return None

    def submit_early(self, early: Any, plan: TransferPlan, handle: TransferHandle) -> None:
        """Go on with a transfer :meth:`start_early` started, now planned."""
        raise NotImplementedError

    def abandon_early(self, early: Any) -> None:
        """Drop a transfer :meth:`start_early` started whose planning failed."""
        raise NotImplementedError

    def on_layout_registered(self, layout: KVLayout) -> None:
        """Called once the connector's layout is known (register memory, export handles)."""

    @abstractmethod
    def close(self) -> None:
        """Close every link and release resources; idempotent."""
