"""The TCP backend: a listener, the handshake, links to peers (and control channels).

Layer: backends, tcp package. Each peer link has one control connection and ``streams`` data
connections (:mod:`.link`); every connection opens with HELLO (link id, channel, our metadata)
and HELLO_ACK. Every id a peer names is validated against our own layout before a byte is
touched; malformed frames drop that link with a logged reason while the listener keeps
serving other peers.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from ...config import TcpConfig
from ...errors import KvxferError, PeerLostError, RemoteProtocolError, TransferTimeoutError, TransportError
from ...handle import TransferHandle
from ...metadata import PeerMetadata
from ...plan import TransferPlan
from ...protocol.frames import FRAME_PREFIX_SIZE, FrameType, encode_frame
from ...protocol.messages import HelloAck, decode, encode
from ..base import Backend, BackendLink, LocalSide, TransferRequest
from .link import TcpLink
from .sockets import parse_host_port, read_frame_header

__all__ = ["TcpBackend"]

log = logging.getLogger(__name__)


class TcpBackend(Backend):
    """Moves plans over TCP sockets; serves peers that connect to its listening port."""

    name = "tcp"

    def __init__(self, local: LocalSide, listen: str, config: TcpConfig):
        self.local = local
        self.config = config
        host, port = parse_host_port(listen)
        self._lsock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128)
        self.host, self.port = self._lsock.getsockname()[:2]
        self._links: set[TcpLink] = set()
        self._pending_links: dict[str, TcpLink] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._link_ids = itertools.count()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kvxfer-tcp-accept", daemon=True)
        self._accept_thread.start()

    def endpoint(self) -> dict[str, Any]:
        host = self.config.advertise or self.host
        if host in ("0.0.0.0", "::"):
            host = socket.gethostbyname(socket.gethostname())
        return {"host": host, "port": self.port, "streams": self.config.streams}

    def can_reach(self, peer: PeerMetadata) -> bool:
        return "tcp" in peer.backends

    # -- outgoing ----------------------------------------------------------------------------
    def _open(self, peer: PeerMetadata, channel: int, timeout: float, link_id: str,
              meta: bytes | None = None) -> socket.socket:
        ep = peer.backends["tcp"]
        host, port = ep.get("host"), ep.get("port")
        if not isinstance(host, str) or type(port) is not int:
            raise TransportError(f"peer {peer.name!r} advertises a malformed tcp endpoint")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise TransferTimeoutError(f"connecting to {peer.name!r} at {host}:{port} timed out after {timeout} s") from None
        except OSError as exc:
            raise PeerLostError(f"cannot connect to {peer.name!r} at {host}:{port}: {exc}") from None
        # the handshake's socket errors are the peer's loss too; the socket never leaks
        try:
            self._tune(sock)
            if meta is None:
                meta = self.local.local_metadata().to_bytes()
            sock.sendall(encode_frame(FrameType.HELLO, {"session": link_id, "ch": channel, "meta": meta}))
            prefix, h = read_frame_header(sock, memoryview(bytearray(FRAME_PREFIX_SIZE)), 0)
            if prefix.type is not FrameType.HELLO_ACK:
                raise RemoteProtocolError(f"expected HELLO_ACK from {peer.name!r}, got {prefix.type.name}")
            ack = decode(HelloAck, h)
            if ack.refusal is not None:
                raise TransportError(f"peer {peer.name!r} refused the connection: {ack.refusal}")
            sock.settimeout(None)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise TransferTimeoutError(f"handshake with {peer.name!r} at {host}:{port} timed out after {timeout} s") from None
            if isinstance(exc, OSError):
                raise PeerLostError(f"handshake with {peer.name!r} at {host}:{port} failed: {exc}") from None
            raise
        return sock

    def new_link_id(self) -> str:
        """A session id for one link: the peer groups that link's connections by it."""
        return f"{self.local.session}/{next(self._link_ids)}"

    def connect(self, peer: PeerMetadata, timeout: float) -> TcpLink:
        """A link to ``peer``: its control connection and ``config.streams`` data connections.

        Raises:
            PeerLostError: a connection cannot be opened or its handshake failed.
            TransferTimeoutError: connecting or the handshake took longer than ``timeout`` s.
            TransportError: the peer refused, or advertises a malformed endpoint.
        """
        return self._connect(peer, timeout, self.config.streams, None)

    def connect_control(self, peer: PeerMetadata, timeout: float,
                        on_close: Callable[[KvxferError], None] | None = None) -> TcpLink:
        """A *control channel* to ``peer``: a link with its control connection only, for a
        backend that moves its bytes another way (cuda_ipc) but sends notifications
        (:meth:`TcpLink.send_notification`) and learns of the peer's loss over TCP.
        ``on_close(error)`` is called once when the link closes, for whatever reason; close
        it with ``link.close(exc, goodbye=True)``. The peer serves it as any TCP link, and
        this backend's :meth:`close` closes it.

        Raises:
            the same as :meth:`connect`.
        """
        return self._connect(peer, timeout, 0, on_close)

    def _connect(self, peer: PeerMetadata, timeout: float, streams: int,
                 on_close: Callable[[KvxferError], None] | None) -> TcpLink:
        # each link has its own id, so that concurrent connects to one peer never mix connections
        link_id = self.new_link_id()
        meta = self.local.local_metadata().to_bytes()  # once for all of this link's connections
        ctrl = self._open(peer, 0, timeout, link_id, meta)
        link = TcpLink(self, peer, ctrl, initiator=True, on_close=on_close)
        try:
            for ch in range(1, streams + 1):
                link.add_data_socket(self._open(peer, ch, timeout, link_id, meta))
        except BaseException:
            link.close()
            raise
        with self._lock:
            self._links.add(link)
        link.start()
        return link

    def submit(self, link: BackendLink, req: TransferRequest, plan: TransferPlan, handle: TransferHandle) -> None:
        assert isinstance(link, TcpLink)
        link.submit(req, plan, handle)

    # -- incoming ----------------------------------------------------------------------------
    def _tune(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.config.socket_buffer:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, self.config.socket_buffer)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, addr = self._lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(sock, addr), name="kvxfer-tcp-hello", daemon=True).start()

    def _handshake(self, sock: socket.socket, addr: Any) -> None:
        try:
            sock.settimeout(self.config.handshake_timeout)
            self._tune(sock)
            prefix, h = read_frame_header(sock, memoryview(bytearray(FRAME_PREFIX_SIZE)), 0)
            if prefix.type is not FrameType.HELLO:
                raise RemoteProtocolError(f"expected HELLO, got {prefix.type.name}")
            session, ch, meta = h.get("session"), h.get("ch"), h.get("meta")
            if not isinstance(session, str) or type(ch) is not int or not isinstance(meta, bytes):
                raise RemoteProtocolError("malformed HELLO")
            if not 0 <= ch <= 64:
                raise RemoteProtocolError(f"HELLO names data channel {ch}; at most 64 are allowed")
            peer = PeerMetadata.from_bytes(meta)
            sock.settimeout(None)
            with self._lock:
                if ch == 0:
                    link = TcpLink(self, peer, sock, initiator=False)
                    self._pending_links[session] = link
                    self._links.add(link)
                else:
                    link = self._pending_links.get(session)
            if link is None:
                raise RemoteProtocolError(f"data connection for unknown session {session!r}")
            sock.sendall(encode_frame(FrameType.HELLO_ACK, encode(HelloAck())))
            if ch == 0:
                link.start()
            else:
                link.add_data_socket(sock)
        except (KvxferError, OSError, TimeoutError) as exc:
            log.warning("dropping connection from %s: %s", addr, exc)
            try:
                sock.close()
            except OSError:
                pass

    def forget(self, link: TcpLink) -> None:
        """Stop listing ``link`` (it closed)."""
        with self._lock:
            self._links.discard(link)
            for k, v in list(self._pending_links.items()):
                if v is link:
                    del self._pending_links[k]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close(PeerLostError("connector closed"), goodbye=True)
