"""Typed registry messages over the frame protocol (sans-I/O).

Layer: registry wire format, shared by the embedded server, its client and the Redis store.
Nothing here touches a socket.

* A client sends ``REG_REQUEST`` frames whose msgpack header is ``{"id": n, "op": <Op>, ...fields}``.
* The server answers each with one ``REG_REPLY`` frame ``{"id": n, "r": <ResultKind>, ...fields}``;
  replies to waiting operations (pull, await-expect) may come out of order.
* The server pushes ``REG_EVENT`` frames ``{"ev": <EventKind>, ...fields}`` to a connector that
  produced or consumed a request, e.g. to say that the request is finished.

Every field that comes from the wire is type- and range-checked here; anything else is a
:class:`~kvxfer.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from types import UnionType
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

from ..errors import LocalProtocolError, RemoteProtocolError
from ..protocol.frames import (FRAME_PREFIX_SIZE, MAGIC, MAX_HEADER_BYTES, PROTOCOL_VERSION, Frame, FrameType,
                               decode_header, encode_frame, parse_prefix)
from .errors import ErrorCode

__all__ = [
    "MAX_BLOCKS", "MAX_CONSUMERS", "MAX_ID_LEN", "MAX_METADATA_BYTES", "MAX_SECONDS",
    "Op", "ResultKind", "EventKind", "Mode", "RequestState", "Role",
    "Hello", "Register", "Heartbeat", "Unregister", "Lookup", "Publish", "Pull", "Expect",
    "AwaitExpect", "Complete", "Cancel", "Query",
    "Ack", "Lease", "ConnectorInfo", "Claim", "Expectation", "RequestInfo", "Failure",
    "RequestEvent", "RegRequest", "RegResult",
    "encode_request", "decode_request", "encode_reply", "decode_reply", "encode_event",
    "decode_event", "to_wire", "from_wire", "decode_header", "FrameDecoder",
]

MAX_ID_LEN = 512
MAX_METADATA_BYTES = 512 * 1024
MAX_BLOCKS = 1 << 17
MAX_CONSUMERS = 1024
MAX_SECONDS = 7 * 24 * 3600.0
_MAX_BLOCK_ID = 1 << 40
_MAX_REQUEST_SEQ = (1 << 63) - 1


class Op(Enum):
    """Registry operations (the ``op`` of a request frame)."""

    HELLO = "hello"
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    UNREGISTER = "unregister"
    LOOKUP = "lookup"
    PUBLISH = "publish"
    PULL = "pull"
    EXPECT = "expect"
    AWAIT_EXPECT = "await_expect"
    COMPLETE = "complete"
    CANCEL = "cancel"
    QUERY = "query"


class ResultKind(Enum):
    """What a reply carries (the ``r`` of a reply frame)."""

    ACK = "ack"
    LEASE = "lease"
    CONNECTOR = "connector"
    CLAIM = "claim"
    EXPECTATION = "expectation"
    INFO = "info"
    FAILURE = "failure"


class EventKind(Enum):
    """What happened to a request, pushed to its parties."""

    CONSUMED = "consumed"      # final: the consumer has the bytes; the producer may free its blocks
    EXPIRED = "expired"        # final: the TTL ran out before the request finished
    FAILED = "failed"          # final: a party reported failure or was lost
    CANCELLED = "cancelled"    # final: a party cancelled
    DELIVERED = "delivered"    # push mode, to the consumer: the producer wrote every layer

    @property
    def is_final(self) -> bool:
        return self is not EventKind.DELIVERED


class Mode(Enum):
    """Who moves the bytes: the consumer reads (pull) or the producer writes (push)."""

    PULL = "pull"
    PUSH = "push"


class RequestState(Enum):
    """Life cycle of a registry entry."""

    PUBLISHED = "published"    # pull: waiting for a consumer
    CLAIMED = "claimed"        # pull: a consumer is reading
    EXPECTED = "expected"      # push: waiting for the producer
    PUSHING = "pushing"        # push: the producer is writing
    DELIVERED = "delivered"    # push: written, waiting for the consumer's confirmation


class Role(Enum):
    """A connector's part in one request."""

    PRODUCER = "producer"
    CONSUMER = "consumer"


# --- requests ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of a connection; the token is compared with the server's (if it has one)."""

    token: str | None
    client: str


@dataclass(frozen=True, slots=True)
class Register:
    """Put ``name -> metadata`` in the directory under a lease of ``lease_s`` seconds."""

    name: str
    instance: str
    metadata: bytes
    lease_s: float


@dataclass(frozen=True, slots=True)
class Heartbeat:
    name: str
    instance: str


@dataclass(frozen=True, slots=True)
class Unregister:
    name: str
    instance: str


@dataclass(frozen=True, slots=True)
class Lookup:
    name: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Pull mode, producer: request ``request_id``'s KV is in ``blocks`` for ``ttl_s`` seconds,
    to be read by ``consumers`` distinct consumers (each claims once and confirms)."""

    request_id: str
    producer: str
    blocks: tuple[int, ...]
    ttl_s: float
    consumers: int = 1


@dataclass(frozen=True, slots=True)
class Pull:
    """Pull mode, consumer: claim the publication, waiting up to ``timeout_s`` for it."""

    request_id: str
    consumer: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Expect:
    """Push mode, consumer: write request ``request_id`` into ``dst_blocks`` within ``ttl_s``."""

    request_id: str
    consumer: str
    dst_blocks: tuple[int, ...]
    ttl_s: float


@dataclass(frozen=True, slots=True)
class AwaitExpect:
    """Push mode, producer: take the consumer's expectation, waiting up to ``timeout_s``."""

    request_id: str
    producer: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Complete:
    """A party reports its side done (``ok``) or failed (``reason``)."""

    request_id: str
    party: str
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Cancel:
    request_id: str
    party: str
    reason: str


@dataclass(frozen=True, slots=True)
class Query:
    request_id: str


RegRequest = Union[Hello, Register, Heartbeat, Unregister, Lookup, Publish, Pull, Expect, AwaitExpect,
                   Complete, Cancel, Query]

_REQUEST_OF_OP: dict[Op, type] = {
    Op.HELLO: Hello, Op.REGISTER: Register, Op.HEARTBEAT: Heartbeat, Op.UNREGISTER: Unregister,
    Op.LOOKUP: Lookup, Op.PUBLISH: Publish, Op.PULL: Pull, Op.EXPECT: Expect,
    Op.AWAIT_EXPECT: AwaitExpect, Op.COMPLETE: Complete, Op.CANCEL: Cancel, Op.QUERY: Query,
}
_OP_OF_REQUEST = {cls: op for op, cls in _REQUEST_OF_OP.items()}
_REQUEST_OF_VALUE: dict[Any, type] = {op.value: cls for op, cls in _REQUEST_OF_OP.items()}


# --- results -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class Lease:
    lease_s: float


@dataclass(frozen=True, slots=True)
class ConnectorInfo:
    name: str
    metadata: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """Pull mode: the consumer won the request; read ``blocks`` from ``producer``."""

    request_id: str
    producer: str
    blocks: tuple[int, ...]
    metadata: bytes


@dataclass(frozen=True, slots=True)
class Expectation:
    """Push mode: the producer won the request; write into ``consumer``'s ``dst_blocks``."""

    request_id: str
    consumer: str
    dst_blocks: tuple[int, ...]
    metadata: bytes


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A live request. ``consumer``: the first consumer that claimed it (pull) or the one that
    expects it (push); ``consumers`` the publication's consumer count, ``claimed`` and
    ``confirmed`` how many of them have claimed and confirmed it so far."""

    request_id: str
    mode: Mode
    state: RequestState
    producer: str | None
    consumer: str | None
    consumers: int = 1
    claimed: int = 0
    confirmed: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    code: ErrorCode
    message: str


RegResult = Union[Ack, Lease, ConnectorInfo, Claim, Expectation, RequestInfo, Failure]

_RESULT_OF_KIND: dict[ResultKind, type] = {
    ResultKind.ACK: Ack, ResultKind.LEASE: Lease, ResultKind.CONNECTOR: ConnectorInfo,
    ResultKind.CLAIM: Claim, ResultKind.EXPECTATION: Expectation, ResultKind.INFO: RequestInfo,
    ResultKind.FAILURE: Failure,
}
_KIND_OF_RESULT = {cls: kind for kind, cls in _RESULT_OF_KIND.items()}
_RESULT_OF_VALUE: dict[Any, type] = {kind.value: cls for kind, cls in _RESULT_OF_KIND.items()}


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """Pushed to a party of ``request_id`` (its role in ``role``)."""

    request_id: str
    kind: EventKind
    role: Role
    reason: str


# --- field validation ----------------------------------------------------------------------
def _fail(cls: type, name: str, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"registry {cls.__name__}.{name}: {why}")


def _check_str(cls: type, name: str, v: Any) -> str:
    if type(v) is not str and not isinstance(v, str):
        raise _fail(cls, name, f"expected a string, got {type(v).__name__}")
    if len(v) > MAX_ID_LEN:
        raise _fail(cls, name, f"string of {len(v)} characters exceeds {MAX_ID_LEN}")
    return v


def _check_int(cls: type, name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _MAX_REQUEST_SEQ:
        raise _fail(cls, name, f"expected a non-negative int, got {v!r:.40}")
    return v


def _check_float(cls: type, name: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= MAX_SECONDS:
        raise _fail(cls, name, f"expected seconds in [0, {MAX_SECONDS:g}], got {v!r:.40}")
    return float(v)


def _check_bool(cls: type, name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail(cls, name, f"expected a bool, got {type(v).__name__}")
    return v


def _check_bytes(cls: type, name: str, v: Any) -> bytes:
    if not isinstance(v, (bytes, bytearray)):
        raise _fail(cls, name, f"expected bytes, got {type(v).__name__}")
    if len(v) > MAX_METADATA_BYTES:
        raise _fail(cls, name, f"{len(v)} B exceeds {MAX_METADATA_BYTES} B")
    return bytes(v)


def _check_blocks(cls: type, name: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise _fail(cls, name, f"expected a list of block ids, got {type(v).__name__}")
    if len(v) > MAX_BLOCKS:
        raise _fail(cls, name, f"{len(v)} block ids exceed {MAX_BLOCKS}")
    for b in v:
        if type(b) is not int:  # bool is not int here, and neither is float
            raise _fail(cls, name, f"bad block id {b!r:.40}")
    if v and (min(v) < 0 or max(v) >= _MAX_BLOCK_ID):
        raise _fail(cls, name, f"block id out of range [0, {_MAX_BLOCK_ID})")
    return tuple(v)


_Checker = Callable[[type, str, Any], Any]
_SIMPLE: dict[Any, _Checker] = {str: _check_str, int: _check_int, float: _check_float, bool: _check_bool,
                                 bytes: _check_bytes}


def _checker_for(tp: Any) -> _Checker:
    if tp in _SIMPLE:
        return _SIMPLE[tp]
    origin = get_origin(tp)
    if origin is tuple and get_args(tp) == (int, ...):
        return _check_blocks
    if origin in (Union, UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = _checker_for(args[0])
        return lambda cls, name, v: None if v is None else inner(cls, name, v)
    if isinstance(tp, type) and issubclass(tp, Enum):
        values = {m.value: m for m in tp}

        def check_enum(cls: type, name: str, v: Any) -> Enum:
            try:
                return values[v]
            except (KeyError, TypeError):
                raise _fail(cls, name, f"unknown {tp.__name__} {v!r:.40}") from None
        return check_enum
    raise TypeError(f"no wire checker for {tp!r}")  # a programming error in this module


def _spec(cls: type) -> tuple[tuple[str, _Checker, Any], ...]:
    hints = get_type_hints(cls)
    return tuple((f.name, _checker_for(hints[f.name]), f.default) for f in fields(cls))


_SPECS: dict[type, tuple[tuple[str, _Checker, Any], ...]] = {
    cls: _spec(cls) for cls in (*_REQUEST_OF_OP.values(), *_RESULT_OF_KIND.values(), RequestEvent)
}


def to_wire(msg: Any) -> dict[str, Any]:
    """The msgpack-ready map of a message's fields (enums as values, tuples as lists)."""
    out: dict[str, Any] = {}
    for name, _, _ in _SPECS[type(msg)]:
        v = getattr(msg, name)
        if isinstance(v, Enum):
            v = v.value
        elif isinstance(v, tuple):
            v = list(v)
        out[name] = v
    return out


def from_wire(cls: type, obj: Any) -> Any:
    """Build and validate a ``cls`` message from a decoded map; unknown keys are ignored, and a
    missing field that has a default (added in a later version) takes that default.

    Raises:
        RemoteProtocolError: a field is missing or has the wrong type or range.
    """
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"registry {cls.__name__}: expected a map, got {type(obj).__name__}")
    args = []
    for name, check, default in _SPECS[cls]:
        try:
            v = obj[name]
        except KeyError:
            if default is MISSING:
                raise _fail(cls, name, "missing") from None
            v = default
        args.append(check(cls, name, v))
    return cls(*args)


# --- frames --------------------------------------------------------------------------------
def encode_request(seq: int, msg: RegRequest) -> bytes:
    """A whole REG_REQUEST frame.

    Raises:
        LocalProtocolError: ``msg`` is not a request message, or the header is too large.
    """
    op = _OP_OF_REQUEST.get(type(msg))
    if op is None:
        raise LocalProtocolError(f"{type(msg).__name__} is not a registry request")
    header = to_wire(msg)
    header["id"] = seq
    header["op"] = op.value
    return encode_frame(FrameType.REG_REQUEST, header)


def _frame_check(frame: Frame, ftype: FrameType) -> None:
    if frame.type is not ftype:
        raise RemoteProtocolError(f"expected a {ftype.name} frame, got {frame.type.name}")
    if frame.payload:
        raise RemoteProtocolError(f"registry {ftype.name} frame carries a {len(frame.payload)} B payload")


def decode_request(frame: Frame) -> tuple[int, RegRequest]:
    """``(seq, message)`` of a REG_REQUEST frame.

    Raises:
        RemoteProtocolError: wrong frame type, unknown op, bad or missing fields.
    """
    _frame_check(frame, FrameType.REG_REQUEST)
    h = frame.header
    seq = _check_int(Frame, "id", h.get("id"))
    op = h.get("op")
    cls = _REQUEST_OF_VALUE.get(op) if isinstance(op, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown registry op {op!r:.40}")
    return seq, from_wire(cls, h)


def encode_reply(seq: int, result: RegResult) -> bytes:
    """A whole REG_REPLY frame."""
    header = to_wire(result)
    header["id"] = seq
    header["r"] = _KIND_OF_RESULT[type(result)].value
    return encode_frame(FrameType.REG_REPLY, header)


def decode_reply(frame: Frame) -> tuple[int, RegResult]:
    """``(seq, result)`` of a REG_REPLY frame.

    Raises:
        RemoteProtocolError: wrong frame type, unknown result kind, bad or missing fields.
    """
    _frame_check(frame, FrameType.REG_REPLY)
    h = frame.header
    seq = _check_int(Frame, "id", h.get("id"))
    kind = h.get("r")
    cls = _RESULT_OF_VALUE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown registry result kind {kind!r:.40}")
    return seq, from_wire(cls, h)


def encode_event(event: RequestEvent) -> bytes:
    """A whole REG_EVENT frame."""
    return encode_frame(FrameType.REG_EVENT, to_wire(event))


def decode_event(frame: Frame) -> RequestEvent:
    """The event of a REG_EVENT frame.

    Raises:
        RemoteProtocolError: wrong frame type, bad or missing fields.
    """
    _frame_check(frame, FrameType.REG_EVENT)
    return from_wire(RequestEvent, frame.header)


# --- byte stream -> frames -----------------------------------------------------------------
_PREFIX = struct.Struct("!4sBBHIQ")  # the layout kvxfer.protocol.frames documents
_TYPES = {int(t): t for t in FrameType}
assert _PREFIX.size == FRAME_PREFIX_SIZE
class FrameDecoder:
    """Incremental bytes -> :class:`Frame` decoder for the registry (frames carry no payload).

    ``max_header`` bounds a header below the protocol's own limit; a larger one, a payload, bad
    magic, version or type is a :class:`RemoteProtocolError` (the caller drops the connection).
    """

    __slots__ = ("_buf", "_max_header")

    def __init__(self, max_header: int = MAX_HEADER_BYTES):
        self._buf = bytearray()
        self._max_header = max_header

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> list[Frame]:
        """Every complete frame buffered so far (consumed from the buffer).

        Raises:
            RemoteProtocolError: malformed or oversized input.
        """
        buf = self._buf
        if 4 <= len(buf) < FRAME_PREFIX_SIZE and buf[:4] != MAGIC:  # refuse garbage before a whole prefix
            raise RemoteProtocolError(f"bad frame magic {bytes(buf[:4])!r}; expected {MAGIC!r}")
        out: list[Frame] = []
        pos, n = 0, len(buf)
        while n - pos >= FRAME_PREFIX_SIZE:
            magic, version, ftype, _flags, hlen, plen = _PREFIX.unpack_from(buf, pos)
            if magic != MAGIC or version != PROTOCOL_VERSION or plen or ftype not in _TYPES:
                parse_prefix(bytes(buf[pos:pos + FRAME_PREFIX_SIZE]), max_payload=0)  # raises, saying why
            if hlen > self._max_header:
                raise RemoteProtocolError(f"registry frame header of {hlen} B exceeds the {self._max_header} B limit")
            end = pos + FRAME_PREFIX_SIZE + hlen
            if n < end:
                break
            out.append(Frame(_TYPES[ftype], decode_header(buf[pos + FRAME_PREFIX_SIZE:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out
