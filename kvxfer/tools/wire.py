"""The bootstrap exchange between the two sides of ``kvxfer-bench`` (msgpack, never pickle).

Layer: tools. The measuring side (the *initiator*) sends requests; the serving side (``--listen``
or the child process of a one-host run) answers each one. Messages are frozen dataclasses;
on the wire each is a 4-byte big-endian length, then msgpack ``[version, kind, fields]``.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

import msgpack

from .._tensors import MemoryKind
from ..backends.base import BackendKind
from ..errors import PeerLostError, RemoteProtocolError
from .workloads import Workload

__all__ = [
    "WIRE_VERSION",
    "MsgKind",
    "Hello",
    "PeerInfo",
    "Setup",
    "Ready",
    "Poison",
    "Digest",
    "DigestReply",
    "Release",
    "NixlSetup",
    "NixlReady",
    "Ok",
    "Failure",
    "Bye",
    "Message",
    "send_msg",
    "recv_msg",
]

WIRE_VERSION = 1
_MAX_MSG = 64 << 20
_LEN = struct.Struct("!I")


class MsgKind(IntEnum):
    HELLO = 1
    PEER_INFO = 2
    SETUP = 3
    READY = 4
    POISON = 5
    DIGEST = 6
    DIGEST_REPLY = 7
    RELEASE = 8
    NIXL_SETUP = 9
    NIXL_READY = 10
    OK = 11
    FAILURE = 12
    BYE = 13


class _Msg:
    __slots__ = ()
    KIND: ClassVar[MsgKind]

    def to_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_fields(cls, obj: dict[str, Any]) -> Any:
        return cls(**obj)


@dataclass(frozen=True, slots=True)
class Hello(_Msg):
    """Initiator -> server: first message of a session."""

    KIND: ClassVar[MsgKind] = MsgKind.HELLO
    kvxfer_version: str


@dataclass(frozen=True, slots=True)
class PeerInfo(_Msg):
    """Server -> initiator: who serves, and where its raw-socket baseline listens."""

    KIND: ClassVar[MsgKind] = MsgKind.PEER_INFO
    hostname: str
    kvxfer_version: str
    gpus: list[str]
    raw_port: int
    environment: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Setup(_Msg):
    """Initiator -> server: build this pool and a connector with this backend."""

    KIND: ClassVar[MsgKind] = MsgKind.SETUP
    workload: Workload
    backend: BackendKind
    memory: MemoryKind
    device: int
    tcp_streams: int

    def to_fields(self) -> dict[str, Any]:
        return {"workload": self.workload.to_wire(), "backend": self.backend.value, "memory": self.memory.value,
                "device": self.device, "tcp_streams": self.tcp_streams}

    @classmethod
    def from_fields(cls, obj: dict[str, Any]) -> Setup:
        return cls(Workload.from_wire(obj["workload"]), BackendKind(obj["backend"]), MemoryKind(obj["memory"]),
                   int(obj["device"]), int(obj["tcp_streams"]))


@dataclass(frozen=True, slots=True)
class Ready(_Msg):
    """Server -> initiator: the server's connector metadata (what ``Connector.connect`` takes)."""

    KIND: ClassVar[MsgKind] = MsgKind.READY
    metadata: bytes


@dataclass(frozen=True, slots=True)
class Poison(_Msg):
    """Initiator -> server: overwrite these blocks of the server's pool (before a check)."""

    KIND: ClassVar[MsgKind] = MsgKind.POISON
    blocks: list[int]


@dataclass(frozen=True, slots=True)
class Digest(_Msg):
    """Initiator -> server: hash these blocks of the server's pool."""

    KIND: ClassVar[MsgKind] = MsgKind.DIGEST
    blocks: list[int]


@dataclass(frozen=True, slots=True)
class DigestReply(_Msg):
    KIND: ClassVar[MsgKind] = MsgKind.DIGEST_REPLY
    digest: str


@dataclass(frozen=True, slots=True)
class Release(_Msg):
    """Initiator -> server: close the connector of the current point (the pool is kept)."""

    KIND: ClassVar[MsgKind] = MsgKind.RELEASE


@dataclass(frozen=True, slots=True)
class NixlSetup(_Msg):
    """Initiator -> server: register the current pool with a NIXL agent."""

    KIND: ClassVar[MsgKind] = MsgKind.NIXL_SETUP


@dataclass(frozen=True, slots=True)
class NixlReady(_Msg):
    """Server -> initiator: the NIXL agent's metadata and each layer tensor's address."""

    KIND: ClassVar[MsgKind] = MsgKind.NIXL_READY
    agent_metadata: bytes
    addrs: list[int]


@dataclass(frozen=True, slots=True)
class Ok(_Msg):
    KIND: ClassVar[MsgKind] = MsgKind.OK


@dataclass(frozen=True, slots=True)
class Failure(_Msg):
    """Server -> initiator: a request failed; ``usage`` marks an impossible request (exit 2)."""

    KIND: ClassVar[MsgKind] = MsgKind.FAILURE
    error: str
    message: str
    usage: bool


@dataclass(frozen=True, slots=True)
class Bye(_Msg):
    KIND: ClassVar[MsgKind] = MsgKind.BYE


Message = Hello | PeerInfo | Setup | Ready | Poison | Digest | DigestReply | Release | NixlSetup | NixlReady | Ok | Failure | Bye
_BY_KIND: dict[int, type[_Msg]] = {
    c.KIND: c for c in (Hello, PeerInfo, Setup, Ready, Poison, Digest, DigestReply, Release, NixlSetup, NixlReady, Ok, Failure, Bye)
}


def encode(msg: Message) -> bytes:
    """The framed bytes of ``msg``."""
    body = msgpack.packb([WIRE_VERSION, int(msg.KIND), msg.to_fields()], use_bin_type=True)
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> Message:
    """Parse one message body (without its length prefix).

    Raises:
        RemoteProtocolError: not msgpack, another version, an unknown kind or bad fields.
    """
    try:
        version, kind, obj = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise RemoteProtocolError(f"bench bootstrap message is not valid msgpack: {exc}") from None
    if version != WIRE_VERSION:
        raise RemoteProtocolError(f"bench bootstrap version {version!r}; this side speaks {WIRE_VERSION} (same kvxfer on both hosts?)")
    cls = _BY_KIND.get(kind)
    if cls is None or not isinstance(obj, dict):
        raise RemoteProtocolError(f"unknown bench bootstrap message kind {kind!r}")
    try:
        return cls.from_fields(obj)  # type: ignore[no-any-return]
    except (TypeError, ValueError, KeyError) as exc:
        raise RemoteProtocolError(f"malformed {cls.__name__} message: {exc}") from None


def send_msg(sock: socket.socket, msg: Message) -> None:
    """Send one message; PeerLostError when the other side is gone."""
    try:
        sock.sendall(encode(msg))
    except OSError as exc:
        raise PeerLostError(f"bench peer connection failed while sending: {exc}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view.nbytes:
        try:
            got = sock.recv_into(view)
        except OSError as exc:
            raise PeerLostError(f"bench peer connection failed: {exc}") from None
        if got == 0:
            raise PeerLostError("the bench peer closed the connection")
        view = view[got:]
    return bytes(buf)


def recv_msg(sock: socket.socket) -> Message:
    """Receive one message.

    Raises:
        PeerLostError: the connection closed or failed.
        RemoteProtocolError: the bytes are not a valid message or it is too large.
    """
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_MSG:
        raise RemoteProtocolError(f"bench bootstrap message of {n} B exceeds {_MAX_MSG} B")
    return decode(_recv_exact(sock, n))
