"""The UCX backend's control messages: the envelope around the shared transfer messages.

Layer: backends/ucx, sans-I/O (no ucxx, no libucp, no endpoints). Control messages are msgpack
maps carried in eager active messages (:data:`AM_ID`): the envelope names the protocol version
(``v``), the message's kind (``t``, a :class:`Msg`), the sender's session (``s``) and holds the
body (``m``). Every body but HELLO's is a message of :mod:`kvxfer.protocol.messages`, encoded
by its one codec (:func:`~kvxfer.protocol.messages.encode` / ``decode``), as each kind of
:class:`Msg` says. Malformed input raises :class:`~kvxfer.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from ...errors import RemoteProtocolError
from ...metadata import PeerMetadata

__all__ = [
    "AM_ID",
    "WIRE_VERSION",
    "Hello",
    "Msg",
    "decode_envelope",
    "decode_hello",
    "encode_message",
    "hello_body",
    "peer_regions",
]

AM_ID = 17
WIRE_VERSION = 2


class Msg(IntEnum):
    """The kind of a control message, and the class of its body."""

    HELLO = 1  # Hello (below): our metadata and worker address
    HELLO_ACK = 2  # HelloAck
    REQ = 3  # Request with the initiator's StagingRef: a packed transfer
    DONE = 4  # Done (yours): a packed write's responder has every byte in place
    ERR = 5  # Refusal: the responder will not serve the transfer
    NOTE = 6  # Notify
    BYE = 7  # Goodbye
    LANDED = 8  # Progress, responder -> initiator (packed read): staged bytes [0, b) are in its buffer
    READY = 9  # Progress, initiator -> responder (packed write): staged bytes [0, b) may be fetched
    CANCEL = 10  # Cancel, initiator -> responder (packed): stop; ERR answers once no RMA of it is in flight


# --------------------------------------------------------------------------------------------
# envelope
# --------------------------------------------------------------------------------------------
def encode_message(kind: Msg, session: str, body: dict[str, Any]) -> bytes:
    """One control message: the envelope (version, kind, sender session) around ``body``."""
    return msgpack.packb({"v": WIRE_VERSION, "t": int(kind), "s": session, "m": body}, use_bin_type=True)


def decode_envelope(data: bytes) -> tuple[Msg, str, dict]:
    """(kind, sender session, body map) of one control message.

    Raises:
        RemoteProtocolError: not msgpack, not a map, another version, an unknown kind, no
            sender session or no body map.
    """
    try:
        h = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(h, dict) or h.get("v") != WIRE_VERSION:
            raise RemoteProtocolError(f"message version {h.get('v') if isinstance(h, dict) else None!r}; "
                                      f"expected {WIRE_VERSION}")
        kind, session, body = Msg(h.get("t")), h.get("s"), h.get("m")
        if not isinstance(session, str):
            raise RemoteProtocolError("message without a sender session")
        if not isinstance(body, dict):
            raise RemoteProtocolError(f"{kind.name} without a body map")
    except RemoteProtocolError:
        raise
    except Exception as exc:  # msgpack's own errors, an unknown Msg value
        raise RemoteProtocolError(str(exc)) from exc
    return kind, session, body


# --------------------------------------------------------------------------------------------
# handshake
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """A peer's HELLO: its connector metadata, worker address and session."""

    meta: bytes
    addr: bytes
    session: str


def hello_body(meta: bytes, addr: bytes) -> dict[str, Any]:
    return {"meta": meta, "addr": addr}


def decode_hello(body: dict, session: str) -> Hello:
    """The HELLO of the peer whose session is ``session``.

    Raises:
        RemoteProtocolError: metadata or worker address is not bytes.
    """
    meta, addr = body.get("meta"), body.get("addr")
    if not isinstance(meta, bytes) or not isinstance(addr, bytes):
        raise RemoteProtocolError("malformed UCX HELLO: 'meta' and 'addr' must be bytes")
    return Hello(meta, addr, session)


def peer_regions(peer: PeerMetadata) -> list[tuple[int, int, bytes]]:
    """(address, length, packed rkey) of each tensor region ``peer`` advertises, each checked
    to cover that tensor of its geometry.

    Raises:
        RemoteProtocolError: no region list, one region per tensor missing, or a malformed one.
    """
    regions = peer.backends["ucx"].get("regions")
    geom = peer.geometry
    if not isinstance(regions, list) or geom is None or len(regions) != len(geom.tensors):
        raise RemoteProtocolError(f"peer {peer.name!r} advertises no valid UCX regions")
    out = []
    for region, t in zip(regions, geom.tensors):
        if not isinstance(region, list) or len(region) != 3:
            raise RemoteProtocolError(f"peer {peer.name!r} advertises a malformed UCX region")
        addr, length, packed = region
        if type(addr) is not int or type(length) is not int or not isinstance(packed, bytes) or length < t.span:
            raise RemoteProtocolError(f"peer {peer.name!r} advertises a malformed UCX region")
        out.append((addr, length, packed))
    return out
