"""The UCX backend's control messages, encoded and decoded without I/O.

Layer: backends/ucx, sans-I/O (no ucxx, no libucp, no endpoints). Control messages are
msgpack maps carried in eager active messages (:data:`AM_ID`); each names the protocol version
(``v``), its kind (``t``, a :class:`Msg`) and the sender's session (``s``). The link and the
backend turn bytes into values here and back, so every check below runs in memory.
Malformed input raises :class:`~kvxfer.errors.RemoteProtocolError`.

Block ids and head resharding are encoded as in every transfer request, by
:mod:`kvxfer.backends.wire`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from ...errors import RemoteProtocolError
from ...handle import Op
from ...metadata import PeerMetadata
from ..base import TransferRequest
from ..wire import _reshard_from_wire, id_width_from_wire, ids_from_wire, request_ids_to_wire

__all__ = [
    "AM_ID",
    "WIRE_VERSION",
    "Hello",
    "Msg",
    "PackedRequest",
    "decode_done",
    "decode_envelope",
    "decode_err",
    "decode_hello",
    "decode_hello_ack",
    "decode_note",
    "decode_progress",
    "decode_request",
    "done_body",
    "encode_message",
    "err_body",
    "hello_ack_body",
    "hello_body",
    "note_body",
    "peer_regions",
    "progress_body",
    "request_body",
]

AM_ID = 17
WIRE_VERSION = 1


class Msg(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    REQ = 3
    DONE = 4
    ERR = 5
    NOTE = 6
    BYE = 7
    LANDED = 8  # responder -> initiator (packed read): staged bytes [0, b) are in the initiator's buffer
    READY = 9  # initiator -> responder (packed write): staged bytes [0, b) may be fetched


# --------------------------------------------------------------------------------------------
# envelope
# --------------------------------------------------------------------------------------------
def encode_message(kind: Msg, session: str, body: dict[str, Any]) -> bytes:
    """One control message: the envelope (version, kind, sender session) and ``body``."""
    return msgpack.packb({"v": WIRE_VERSION, "t": int(kind), "s": session, **body}, use_bin_type=True)


def decode_envelope(data: bytes) -> tuple[Msg, str, dict]:
    """(kind, sender session, the whole map) of one control message.

    Raises:
        RemoteProtocolError: not msgpack, not a map, another version, an unknown kind or no
            sender session.
    """
    try:
        h = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(h, dict) or h.get("v") != WIRE_VERSION:
            raise RemoteProtocolError(f"message version {h.get('v') if isinstance(h, dict) else None!r}")
        kind, session = Msg(h.get("t")), h.get("s")
        if not isinstance(session, str):
            raise RemoteProtocolError("message without a sender session")
    except RemoteProtocolError:
        raise
    except Exception as exc:  # msgpack's own errors, an unknown Msg value
        raise RemoteProtocolError(str(exc)) from exc
    return kind, session, h


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


def decode_hello(h: dict) -> Hello:
    """Raises RemoteProtocolError: metadata or worker address is not bytes."""
    meta, addr, session = h.get("meta"), h.get("addr"), h.get("s")
    if not isinstance(meta, bytes) or not isinstance(addr, bytes):
        raise RemoteProtocolError("malformed UCX HELLO")
    return Hello(meta, addr, session)


def hello_ack_body(ok: bool, message: str | None) -> dict[str, Any]:
    return {"ok": ok, "m": message}


def decode_hello_ack(h: dict) -> str | None:
    """The peer's refusal, or None when it accepted the link (never raises)."""
    ok, m = h.get("ok"), h.get("m")
    return None if ok is True else str(m)


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


# --------------------------------------------------------------------------------------------
# packed transfers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PackedRequest:
    """A REQ: the transfer and where the initiator's staging buffer is (address, packed rkey)."""

    req: TransferRequest
    address: int
    rkey: bytes
    nbytes: int


def request_body(req: TransferRequest, address: int, rkey: bytes, nbytes: int) -> dict[str, Any]:
    width, src, dst, layers = request_ids_to_wire(req)
    return {
        "x": req.xfer_id, "op": "w" if req.op is Op.WRITE else "r", "iw": width, "sb": src, "db": dst, "l": layers,
        "n": req.notify, "a": address, "k": rkey, "b": nbytes,
        "rs": None if req.reshard is None else req.reshard.to_wire(),
    }


def decode_request(h: dict) -> PackedRequest:
    """Raises RemoteProtocolError: a missing or mistyped field (ids are checked by the planner)."""
    xid, op, notify, addr, key, nbytes = h.get("x"), h.get("op"), h.get("n"), h.get("a"), h.get("k"), h.get("b")
    if (type(xid) is not int or op not in ("r", "w") or not (notify is None or isinstance(notify, bytes))
            or type(addr) is not int or not isinstance(key, bytes) or type(nbytes) is not int):
        raise RemoteProtocolError("malformed REQ")
    layers = h.get("l")
    reshard = None if h.get("rs") is None else _reshard_from_wire(h["rs"])
    width = id_width_from_wire(h)
    req = TransferRequest(xid, Op.READ if op == "r" else Op.WRITE, ids_from_wire(h.get("sb"), "sb", width),
                          ids_from_wire(h.get("db"), "db", width),
                          None if layers is None else ids_from_wire(layers, "l", width), notify, reshard)
    return PackedRequest(req, addr, key, nbytes)


def done_body(xid: int) -> dict[str, Any]:
    return {"x": xid}


def decode_done(h: dict) -> int:
    """The finished transfer's id. Raises RemoteProtocolError."""
    if type(h.get("x")) is not int:
        raise RemoteProtocolError("malformed DONE")
    return h["x"]


def err_body(xid: int, kind: str, message: str) -> dict[str, Any]:
    return {"x": xid, "k": kind, "m": message}


def decode_err(h: dict) -> tuple[int, str, str]:
    """(transfer id, error kind, message) of a refusal. Raises RemoteProtocolError."""
    xid, k, m = h.get("x"), h.get("k"), h.get("m")
    if type(xid) is not int or not isinstance(k, str) or not isinstance(m, str):
        raise RemoteProtocolError("malformed ERR")
    return xid, k, m


def progress_body(xid: int, upto: int) -> dict[str, Any]:
    return {"x": xid, "b": upto}


def decode_progress(h: dict) -> tuple[int, int]:
    """(transfer id, bytes of the staged stream covered) of a LANDED or READY message.
    Raises RemoteProtocolError (the link checks the count against the transfer)."""
    xid, upto = h.get("x"), h.get("b")
    if type(xid) is not int or type(upto) is not int or upto < 0:
        raise RemoteProtocolError("malformed LANDED/READY")
    return xid, upto


def note_body(payload: bytes) -> dict[str, Any]:
    return {"n": payload}


def decode_note(h: dict) -> bytes:
    """The notification payload. Raises RemoteProtocolError."""
    n = h.get("n")
    if not isinstance(n, bytes):
        raise RemoteProtocolError("NOTE without a bytes payload")
    return n
