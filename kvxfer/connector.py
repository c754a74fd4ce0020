"""Connector: the object an engine worker holds to move its paged KV blocks.

Layer: top of the library. Registers the layout, describes itself as metadata, connects to
peers, turns ``read``/``write`` calls into validated plans for the chosen backend, keeps the
notification queue and enforces every transfer's deadline.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._tensors import MemoryKind
from ._watchdog import Watchdog
from .backends.base import Backend, BackendLink, TransferRequest, plan_for_initiator
from .config import ConnectorConfig, TcpConfig, from_env
from .errors import (
    BackendUnavailableError,
    ConfigError,
    KvxferError,
    LayoutError,
    LayoutMismatchError,
    PeerLostError,
    TransferTimeoutError,
)
from .handle import Op, TransferHandle
from .layout import KVLayout
from .metadata import PeerMetadata, boot_id
from .metrics import CountedHandle, Metrics, MetricsSnapshot
from .plan import as_block_ids
from .reshard import HeadReshard

if TYPE_CHECKING:
    from .registry.agent import ReshardSpec

__all__ = ["Connector", "Peer", "Notification", "BACKEND_NAMES"]

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "tcp", "cuda_ipc", "ucx")


@dataclass(frozen=True, slots=True)
class Notification:
    """A payload a peer attached to a transfer (or sent alone), delivered after the data."""

    peer: str
    payload: bytes


class Peer:
    """A connected peer: its metadata and the backend link that reaches it."""

    __slots__ = ("name", "metadata", "link", "_connector", "_counters", "__weakref__")

    def __init__(self, connector: Connector, metadata: PeerMetadata, link: BackendLink):
        self._connector = connector
        self.name = metadata.name
        self.metadata = metadata
        self.link = link
        self._counters = connector._metrics.counters(link.backend_name, metadata.name)

    @property
    def backend(self) -> str:
        return self.link.backend_name

    @property
    def closed(self) -> bool:
        return self.link.closed

    def close(self) -> None:
        """Disconnect; transfers pending on this peer fail. Idempotent."""
        self.link.close(PeerLostError(f"peer {self.name!r} disconnected by the caller"))

    def __repr__(self) -> str:
        return f"<Peer {self.name!r} via {self.backend}{' closed' if self.closed else ''}>"


class Connector:
    """Moves paged KV blocks between this process and its peers.

    Args:
        name: this connector's name, as peers and the registry see it.
        backend: "auto" (CUDA IPC between GPUs of one host, else UCX if installed, else TCP),
            or one of "tcp", "cuda_ipc", "ucx" to force it.
        listen: "host:port" the TCP endpoint listens on (port 0 picks a free one).
        registry: "kvxfer://host:port" or "redis://host:port/db" for publish/pull/expect/push.
        timeout: default deadline of each transfer in seconds (``KVXFER_TIMEOUT``).
        registry_lease: seconds the registry keeps our entries without a heartbeat
            (``KVXFER_REGISTRY_LEASE``, default 5); a lost party fails its requests after it.
        tcp: TCP backend settings (defaults from ``KVXFER_TCP_*``).

    Raises:
        ConfigError: unknown backend or bad settings.
        BackendUnavailableError: a forced backend cannot run here.
    """

    def __init__(
        self,
        name: str,
        *,
        backend: str = "auto",
        listen: str = "127.0.0.1:0",
        registry: str | None = None,
        registry_token: str | None = None,
        timeout: float | None = None,
        registry_lease: float | None = None,
        tcp: TcpConfig | None = None,
    ):
        if backend not in BACKEND_NAMES:
            raise ConfigError(f"backend {backend!r} is unknown; expected one of {BACKEND_NAMES}")
        self.name = name
        self.backend_choice = backend
        self.config = from_env(ConnectorConfig, "KVXFER_", timeout=timeout, registry_lease=registry_lease)
        self._tcp_config = tcp or from_env(TcpConfig, "KVXFER_TCP_")
        self.session = PeerMetadata.new_session()
        self._layout: KVLayout | None = None
        self._notes: queue.SimpleQueue[Notification] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._peers: dict[int, Peer] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._watchdog = Watchdog(name)
        self._metrics = Metrics()
        self._backends: dict[str, Backend] = {}
        self._registry_url = registry
        self._registry_token = registry_token
        self._agent: Any = None
        self._agent_lock = threading.Lock()
        self._link_lost_listeners: list[Callable[[PeerMetadata, KvxferError], None]] = []
        from .backends.tcp import TcpBackend

        # TCP is always present: it is the fallback and carries control for the others
        self._backends["tcp"] = TcpBackend(self, listen, self._tcp_config)
        if backend in ("ucx", "auto"):
            self._try_start("ucx", required=backend == "ucx")
        self._finalizer = weakref.finalize(self, Connector._finalize, self._backends, self._watchdog)

    def _try_start(self, kind: str, *, required: bool) -> None:
        try:
            if kind == "ucx":
                from .backends.ucx import UcxBackend

                self._backends["ucx"] = UcxBackend(self)
            elif kind == "cuda_ipc":
                from .backends.cuda_ipc import CudaIpcBackend

                self._backends["cuda_ipc"] = CudaIpcBackend(self, self._backends["tcp"])
        except (ImportError, BackendUnavailableError) as exc:
            if required:
                if isinstance(exc, BackendUnavailableError):
                    raise
                raise BackendUnavailableError(f"backend {kind!r} is not available here: {exc}") from None
            log.debug("backend %s not started: %s", kind, exc)

    # -- LocalSide (for backends) --------------------------------------------------------------
    @property
    def layout(self) -> KVLayout | None:
        """The registered layout, or None before :meth:`register`."""
        return self._layout

    def local_metadata(self) -> PeerMetadata:
        return PeerMetadata(
            name=self.name,
            session=self.session,
            boot_id=boot_id(),
            pid=os.getpid(),
            geometry=None if self._layout is None else self._layout.geometry,
            device=-1 if self._layout is None else self._layout.device,
            backends={k: b.endpoint() for k, b in self._backends.items()},
        )

    def deliver_notification(self, peer_name: str, payload: bytes) -> None:
        self._notes.put(Notification(peer_name, payload))

    def link_lost(self, link: BackendLink, exc: KvxferError) -> None:
        with self._lock:
            self._peers.pop(id(link), None)
            listeners = list(self._link_lost_listeners)
        for fn in listeners:
            try:
                fn(link.peer, exc)
            except Exception:  # a listener's bug must not break the backend closing the link
                log.exception("link-lost listener %r", fn)

    def add_link_lost_listener(self, fn: Callable[[PeerMetadata, KvxferError], None]) -> None:
        """Call ``fn(peer, exc)`` whenever a link to a peer drops, inbound or outbound.

        Runs on the backend's thread: keep it short and thread-safe. The registry agent uses it
        to fail a push-mode request promptly when its producer's link is lost.
        """
        with self._lock:
            self._link_lost_listeners.append(fn)

    # -- public API ----------------------------------------------------------------------------
    def register(self, layout: KVLayout | Sequence[Any] | Mapping[str, Any], *, block_dim: int | Sequence[int] = 0) -> KVLayout:
        """Register the paged KV cache (a KVLayout, or tensors to build one from).

        Raises:
            LayoutError: the tensors are not a valid layout, or a layout is already registered.
        """
        if self._layout is not None:
            raise LayoutError("a KV layout is already registered on this connector; create a new connector to change it")
        if not isinstance(layout, KVLayout):
            layout = KVLayout.from_tensors(layout, block_dim=block_dim)
        self._layout = layout
        if layout.memory is MemoryKind.CUDA and self.backend_choice in ("auto", "cuda_ipc"):
            self._try_start("cuda_ipc", required=self.backend_choice == "cuda_ipc")
        for b in self._backends.values():
            b.on_layout_registered(layout)
        return layout

    def metadata(self) -> bytes:
        """What a peer passes to :meth:`connect` to reach this connector (msgpack bytes)."""
        self._check_open()
        return self.local_metadata().to_bytes()

    def _choose_backend(self, peer: PeerMetadata) -> Backend:
        if self.backend_choice != "auto":
            order = [self.backend_choice]
        elif self._layout is not None and (self._layout.memory is MemoryKind.CUDA
                                           or (peer.geometry is not None and peer.geometry.memory is MemoryKind.CUDA)):
            order = ["cuda_ipc", "ucx", "tcp"]
        else:
            # host memory on both sides: our TCP path beats UCX's tcp transport (bench/bench_ucx.py);
            # KVXFER_PREFER_UCX=1 picks UCX first, e.g. where a system UCX brings RDMA verbs
            order = ["ucx", "tcp"] if self.config.prefer_ucx else ["tcp", "ucx"]
        for kind in order:
            b = self._backends.get(kind)
            if b is not None and b.can_reach(peer):
                return b
        raise BackendUnavailableError(
            f"no backend of {order} can reach peer {peer.name!r} (it offers {sorted(peer.backends)}, "
            f"this side runs {sorted(self._backends)})"
        )

    def connect(self, metadata: bytes, *, timeout: float | None = None, allow_layout_change: bool = False) -> Peer:
        """Connect to the peer described by ``metadata`` (its :meth:`metadata` bytes).

        ``allow_layout_change`` connects to a peer whose blocks differ from ours in heads or
        head order (heterogeneous tensor parallelism); its transfers then pass ``reshard=``.

        Raises:
            RemoteProtocolError: malformed metadata.
            LayoutMismatchError: the peer's KV blocks are not interchangeable with ours (and
                ``allow_layout_change`` is off), or it registered a different number of tensors.
            BackendUnavailableError: no common backend.
            PeerLostError, TransferTimeoutError: the peer cannot be reached.
        """
        self._check_open()
        if self._layout is None:
            raise LayoutError("register a KV layout before connecting to peers")
        peer = PeerMetadata.from_bytes(metadata)
        if peer.geometry is None:
            raise LayoutError(f"peer {peer.name!r} has not registered a KV layout")
        if allow_layout_change:
            if len(peer.geometry.tensors) != self._layout.num_tensors:
                raise LayoutMismatchError(
                    f"peer {peer.name!r} registered {len(peer.geometry.tensors)} tensors, we have {self._layout.num_tensors}"
                )
        elif peer.fingerprint != self._layout.fingerprint:
            try:
                self._layout.geometry.check_compatible(peer.geometry)
            except LayoutMismatchError as exc:
                raise LayoutMismatchError(
                    f"peer {peer.name!r} layout fingerprint {peer.fingerprint} differs from ours "
                    f"{self._layout.fingerprint}: {exc}"
                ) from None
        backend = self._choose_backend(peer)
        link = backend.connect(peer, timeout or self.config.connect_timeout)
        p = Peer(self, peer, link)
        with self._lock:
            self._peers[id(link)] = p
        return p

    def _transfer(self, op: Op, peer: Peer, src_blocks: Any, dst_blocks: Any, layers: Sequence[int | str] | None,
                  notify: bytes | None, timeout: float | None, reshard: HeadReshard | None) -> TransferHandle:
        self._check_open()
        if self._layout is None:
            raise LayoutError("register a KV layout before transferring")
        if not isinstance(peer, Peer) or peer._connector is not self:
            raise ConfigError("peer must be a Peer returned by this connector's connect()")
        if peer.closed:
            raise PeerLostError(f"peer {peer.name!r} is disconnected")
        if notify is not None and not isinstance(notify, (bytes, bytearray)):
            raise ConfigError(f"notify must be bytes; got {type(notify).__name__}")
        req = TransferRequest(
            xfer_id=next(self._ids),
            op=op,
            src_blocks=as_block_ids(src_blocks, "source block ids"),
            dst_blocks=as_block_ids(dst_blocks, "destination block ids"),
            layers=self._layout.resolve_layers(layers),
            notify=None if notify is None else bytes(notify),
            reshard=reshard,
        )
        backend = self._backends[peer.backend]
        timeout = timeout if timeout is not None else self.config.timeout
        early = backend.start_early(peer.link, req, timeout)  # the peer may start while we plan
        try:
            plan = plan_for_initiator(self._layout, peer.metadata, req)
        except BaseException:
            if early is not None:
                backend.abandon_early(early)
            raise
        handle = CountedHandle(op, peer.name, plan.nbytes, peer.backend, req.dst_blocks, peer._counters)
        self._watchdog.add(handle, timeout)
        if early is not None:
            backend.submit_early(early, plan, handle)
        else:
            backend.submit(peer.link, req, plan, handle)
        return handle

    def write(self, peer: Peer, src_blocks: Sequence[int] | np.ndarray, dst_blocks: Sequence[int] | np.ndarray, *,
              layers: Sequence[int | str] | None = None, notify: bytes | None = None,
              timeout: float | None = None, reshard: HeadReshard | None = None) -> TransferHandle:
        """Copy our ``src_blocks`` into the peer's ``dst_blocks``; returns at once.

        ``layers`` selects registered tensors (positions or names); ``notify`` is delivered to
        the peer once every byte is in place there. The handle fails after ``timeout`` seconds
        (default: the connector's). ``reshard`` (a :class:`~kvxfer.reshard.HeadReshard`) moves a
        slice of heads and/or converts NHD <-> HND between unlike layouts (heterogeneous TP).

        GPU memory: the transfer touches our blocks only after the work queued so far on the
        calling thread's current CUDA stream (torch's when the layout holds torch tensors, else
        CuPy's), so KV still being computed there is sent whole; every backend keeps this order.

        Raises:
            BlockIdError: ids out of range on either side, unequal lengths, duplicate destinations.
            LayoutMismatchError, LayoutError: incompatible or missing layouts, unknown layers.
            PeerLostError: the peer is disconnected.
        """
        return self._transfer(Op.WRITE, peer, src_blocks, dst_blocks, layers, notify, timeout, reshard)

    def read(self, peer: Peer, src_blocks: Sequence[int] | np.ndarray, dst_blocks: Sequence[int] | np.ndarray, *,
             layers: Sequence[int | str] | None = None, notify: bytes | None = None,
             timeout: float | None = None, reshard: HeadReshard | None = None) -> TransferHandle:
        """Copy the peer's ``src_blocks`` into our ``dst_blocks``; returns at once.

        ``notify`` is delivered to the peer once the bytes are in place here. Raises as
        :meth:`write`.
        """
        return self._transfer(Op.READ, peer, src_blocks, dst_blocks, layers, notify, timeout, reshard)

    def notify(self, peer: Peer, payload: bytes) -> None:
        """Send ``payload`` to the peer's notification queue (after transfers sent before it)."""
        self._check_open()
        link = peer.link
        send = getattr(link, "send_notification", None)
        if send is None:
            raise BackendUnavailableError(f"backend {peer.backend} cannot send notifications")
        send(bytes(payload))

    def notifications(self) -> list[Notification]:
        """Every notification received since the last call (possibly none); never blocks."""
        out = []
        while True:
            try:
                out.append(self._notes.get_nowait())
            except queue.Empty:
                return out

    def wait_notification(self, timeout: float) -> Notification:
        """The next notification, waiting up to ``timeout`` seconds.

        Raises:
            TransferTimeoutError: none arrived in time.
        """
        try:
            return self._notes.get(timeout=timeout)
        except queue.Empty:
            raise TransferTimeoutError(f"no notification within {timeout} s") from None

    def metrics(self) -> MetricsSnapshot:
        """A consistent copy of this connector's transfer metrics, per backend, peer and op.

        Counts every handle returned by :meth:`read`/:meth:`write` once, when it finishes:
        completed transfers with their bytes and a duration histogram, failures by error class,
        cancels (see :mod:`kvxfer.metrics`). Cumulative since construction, never reset;
        subtract two snapshots for an interval. Cheap: one lock held while copying; raises nothing.
        """
        return self._metrics.snapshot()

    @property
    def peers(self) -> list[Peer]:
        with self._lock:
            return list(self._peers.values())

    @property
    def backends(self) -> list[str]:
        """Names of the backends running on this connector."""
        return list(self._backends)

    def backend(self, name: str) -> Backend:
        """The running backend called ``name`` (one of :attr:`backends`), for diagnostics such
        as cuda_ipc's kernel times; transfers go through :meth:`read` and :meth:`write`.

        Raises:
            BackendUnavailableError: no backend of that name runs on this connector.
        """
        b = self._backends.get(name)
        if b is None:
            raise BackendUnavailableError(f"connector {self.name!r} runs no {name} backend (it runs {sorted(self._backends)})")
        return b

    # -- registry (request matching) -------------------------------------------------------
    @property
    def requests(self) -> Any:
        """The registry agent (publish/pull/expect/push); needs ``registry=`` at construction."""
        if self._agent is None:
            if self._registry_url is None:
                raise ConfigError("this connector has no registry; pass registry='kvxfer://host:port' or 'redis://...'")
            from .registry.agent import RequestAgent

            # two threads asking at once must not build two agents: the second would find the
            # connector's name taken in the registry (NameTakenError) and leak a client
            with self._agent_lock:
                if self._agent is None:
                    self._check_open()
                    self._agent = RequestAgent(self, self._registry_url, token=self._registry_token,
                                       lease_s=self.config.registry_lease)
        return self._agent

    def publish(self, request_id: str, blocks: Sequence[int], *, ttl: float = 60.0, consumers: int = 1) -> None:
        """Producer: announce that ``request_id``'s KV sits in ``blocks``, for ``consumers``
        consumers to pull (see registry agent)."""
        self.requests.publish(request_id, blocks, ttl=ttl, consumers=consumers)

    def pull(self, request_id: str, dst_blocks: Sequence[int], *, timeout: float = 60.0, skip: int = 0,
             reshard: ReshardSpec = None, layers: Sequence[int | str] | None = None) -> TransferHandle:
        """Consumer: wait for ``request_id``'s publication and read its blocks into ``dst_blocks``
        (all but the first ``skip``, which this side already holds: a local prefix-cache hit),
        with an optional ``reshard`` and ``layers`` subset (see registry agent)."""
        return self.requests.pull(request_id, dst_blocks, timeout=timeout, skip=skip, reshard=reshard, layers=layers)

    def expect(self, request_id: str, dst_blocks: Sequence[int], *, timeout: float = 60.0) -> TransferHandle:
        """Consumer, push mode: ask the producer to write ``request_id`` into ``dst_blocks``."""
        return self.requests.expect(request_id, dst_blocks, timeout=timeout)

    def push(self, request_id: str, src_blocks: Sequence[int], *, layers: Sequence[int | str] | None = None,
             last: bool = True, timeout: float = 60.0, reshard: ReshardSpec = None) -> TransferHandle:
        """Producer, push mode: write ``layers`` of ``src_blocks`` to the expecting consumer
        (with an optional ``reshard``, see registry agent)."""
        return self.requests.push(request_id, src_blocks, layers=layers, last=last, timeout=timeout, reshard=reshard)

    # -- life cycle --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise KvxferError(f"connector {self.name!r} is closed")

    @staticmethod
    def _finalize(backends: dict[str, Backend], watchdog: Watchdog) -> None:
        for b in list(backends.values())[::-1]:
            try:
                b.close()
            except Exception:  # closing must not raise from a finalizer
                log.exception("closing backend %s", b.name)
        watchdog.close()

    def close(self) -> None:
        """Close every peer link and backend; pending transfers fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._agent is not None:
            try:
                self._agent.close()
            except Exception:
                log.exception("closing the registry agent")
        self._finalizer()

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Connector {self.name!r} backends={self.backends} layout={self._layout!r}>"
