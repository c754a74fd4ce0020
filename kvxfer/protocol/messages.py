"""The data path's messages: a transfer request and its replies, as typed values and msgpack maps.

Layer: protocol (sans-I/O; below the backends). Every backend that ships transfer requests
uses these: TCP carries each body in a frame whose type names the message
(:class:`~kvxfer.protocol.frames.FrameType`), UCX in an active message whose envelope names it.
The body of each message is one msgpack map with one key set, whatever the transport:

=============  ======================================================================
message        keys
=============  ======================================================================
Request        ``x`` id, ``op`` "r"/"w", ``iw`` bytes per id (2/4/8), ``s``/``d`` packed
               source/destination ids, ``l`` packed layers or nil, ``n`` notification or
               nil, ``rs`` head reshard or nil; a staged request adds ``a`` address,
               ``k`` packed rkey, ``b`` byte count of the initiator's staging buffer
Done           ``x`` id, ``m`` True when the transfer is the receiver's own (it initiated it)
Refusal        ``x`` id, ``k`` error class name, ``m`` message
Cancel         ``x`` id of a transfer the receiver serves: the initiator cancelled it
Notify         ``n`` payload
Progress       ``x`` id, ``b`` bytes of the staged stream covered (UCX's LANDED / READY)
HelloAck       ``ok`` True, or ``m`` the reason the link was refused
Goodbye        (empty)
=============  ======================================================================

Every field from a peer is type-checked here (:class:`~kvxfer.errors.RemoteProtocolError`);
block ids are then bounds-checked by planning against the receiver's own layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..errors import KvxferError, LayoutError, RemoteProtocolError, RemoteTransferError
from ..handle import Op
from ..reshard import HeadReshard

__all__ = [
    "MAX_IDS",
    "Cancel",
    "Done",
    "Goodbye",
    "HelloAck",
    "Message",
    "Notify",
    "Progress",
    "Refusal",
    "Request",
    "StagingRef",
    "TransferRequest",
    "decode",
    "encode",
    "id_width_from_wire",
    "ids_from_wire",
    "ids_to_wire",
    "ids_width",
    "remote_error",
]

MAX_IDS = 1 << 22  # block ids in one request at most

_WIDTHS = {2: "<u2", 4: "<u4", 8: "<i8"}  # bytes per block id on the wire -> its dtype


# --------------------------------------------------------------------------------------------
# block ids
# --------------------------------------------------------------------------------------------
def ids_width(*lists: np.ndarray) -> int:
    """Bytes per id that carry every id of ``lists`` (int64 arrays): 2 or 4 where all are
    non-negative and small enough, else 8. A request of 4096 ids among 8192 blocks is 16 KB
    instead of 64 (its post and its transit are on a packed read's critical path)."""
    bits = 0  # the OR of every id: below 2**16 iff all are in [0, 2**16); negative iff one is
    for ids in lists:
        if ids.size:
            bits |= int(np.bitwise_or.reduce(ids))
    return 8 if bits < 0 else 2 if bits < 1 << 16 else 4 if bits < 1 << 32 else 8


def ids_to_wire(ids: np.ndarray, width: int = 8) -> bytes:
    """Block ids as packed little-endian integers of ``width`` bytes (see :func:`ids_width`)."""
    return np.ascontiguousarray(ids).astype(_WIDTHS[width], copy=False).tobytes()


def ids_from_wire(raw: Any, what: str, width: int = 8) -> np.ndarray:
    """Packed block ids of ``width`` bytes from a peer, as int64 (a read-only view of ``raw``
    for 8-byte ids on a little-endian host). Raises RemoteProtocolError when malformed."""
    if not isinstance(raw, bytes) or len(raw) % width or len(raw) > width * MAX_IDS:
        raise RemoteProtocolError(f"field {what!r} must be packed {width}-byte block ids (at most {MAX_IDS})")
    return np.frombuffer(raw, dtype=_WIDTHS[width]).astype(np.int64, copy=False)


def id_width_from_wire(h: dict) -> int:
    """The request's bytes per id (field ``iw``, 8 when absent). Raises RemoteProtocolError."""
    width = h.get("iw", 8)
    if type(width) is not int or width not in _WIDTHS:
        raise RemoteProtocolError(f"field 'iw' must be one of {sorted(_WIDTHS)}; got {width!r}")
    return width


def _reshard_from_wire(obj: object) -> HeadReshard:
    try:
        return HeadReshard.from_wire(obj)
    except LayoutError as exc:
        raise RemoteProtocolError(str(exc)) from None


def _xfer_id(h: dict, what: str) -> int:
    xid = h.get("x")
    if type(xid) is not int:
        raise RemoteProtocolError(f"malformed {what}: field 'x' must be an integer transfer id; got {xid!r}")
    return xid


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TransferRequest:
    """One transfer as the initiator names it: block ids on each side, layers, notification."""

    xfer_id: int
    op: Op
    src_blocks: np.ndarray
    dst_blocks: np.ndarray
    layers: np.ndarray | None
    notify: bytes | None
    reshard: HeadReshard | None = None  # head slicing / NHD<->HND between unlike layouts

    @property
    def local_blocks(self) -> np.ndarray:
        """The initiator's own blocks."""
        return self.src_blocks if self.op is Op.WRITE else self.dst_blocks

    @property
    def remote_blocks(self) -> np.ndarray:
        """The responder's blocks."""
        return self.dst_blocks if self.op is Op.WRITE else self.src_blocks


@dataclass(frozen=True, slots=True)
class StagingRef:
    """Where a staged (packed) transfer's bytes wait on the initiator: its registered staging
    buffer's address and packed remote key, and the stream's byte count (UCX)."""

    address: int
    rkey: bytes
    nbytes: int


@dataclass(frozen=True, slots=True)
class Request:
    """The initiator asks its peer to take part in ``transfer``; ``staging`` for a staged one."""

    transfer: TransferRequest
    staging: StagingRef | None = None

    @property
    def xfer_id(self) -> int:
        return self.transfer.xfer_id

    def _body(self) -> dict[str, Any]:
        req = self.transfer
        layers = () if req.layers is None else (req.layers,)
        width = ids_width(req.src_blocks, req.dst_blocks, *layers)
        body: dict[str, Any] = {
            "x": req.xfer_id,
            "op": "r" if req.op is Op.READ else "w",
            "iw": width,
            "s": ids_to_wire(req.src_blocks, width),
            "d": ids_to_wire(req.dst_blocks, width),
            "l": None if req.layers is None else ids_to_wire(req.layers, width),
            "n": req.notify,
            "rs": None if req.reshard is None else req.reshard.to_wire(),
        }
        if self.staging is not None:
            body.update(a=self.staging.address, k=self.staging.rkey, b=self.staging.nbytes)
        return body

    @classmethod
    def _parse(cls, h: dict) -> Request:
        xid, op, notify, layers = h.get("x"), h.get("op"), h.get("n"), h.get("l")
        if type(xid) is not int or op not in ("r", "w") or not (notify is None or isinstance(notify, bytes)):
            raise RemoteProtocolError("malformed transfer request: 'x' must be an int, 'op' 'r' or 'w', "
                                      "'n' bytes or nil")
        width = id_width_from_wire(h)
        transfer = TransferRequest(
            xfer_id=xid,
            op=Op.READ if op == "r" else Op.WRITE,
            src_blocks=ids_from_wire(h.get("s"), "s", width),
            dst_blocks=ids_from_wire(h.get("d"), "d", width),
            layers=None if layers is None else ids_from_wire(layers, "l", width),
            notify=notify,
            reshard=None if h.get("rs") is None else _reshard_from_wire(h["rs"]),
        )
        staging = None
        if "a" in h or "k" in h or "b" in h:
            addr, key, nbytes = h.get("a"), h.get("k"), h.get("b")
            if type(addr) is not int or not isinstance(key, bytes) or type(nbytes) is not int or nbytes < 0:
                raise RemoteProtocolError("malformed staged transfer request: 'a' must be an int address, "
                                          "'k' bytes, 'b' a byte count")
            staging = StagingRef(addr, key, nbytes)
        return cls(transfer, staging)


@dataclass(frozen=True, slots=True)
class Done:
    """Transfer ``xfer_id`` is complete on the sender's side. ``yours``: the receiver
    initiated it (a responder confirming a write, or finishing a read it served); False when
    the sender did (an initiator confirming its read to the responder)."""

    xfer_id: int
    yours: bool = True

    def _body(self) -> dict[str, Any]:
        return {"x": self.xfer_id, "m": self.yours}

    @classmethod
    def _parse(cls, h: dict) -> Done:
        xid, mine = h.get("x"), h.get("m")
        if type(xid) is not int or type(mine) is not bool:
            raise RemoteProtocolError("malformed transfer done: 'x' must be an int, 'm' a bool")
        return cls(xid, mine)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The responder will not serve ``xfer_id``: ``kind`` names a :mod:`kvxfer.errors` class."""

    xfer_id: int
    kind: str
    message: str

    @classmethod
    def of(cls, xfer_id: int, exc: BaseException) -> Refusal:
        """The refusal that reports ``exc`` to the initiator."""
        return cls(xfer_id, type(exc).__name__, str(exc))

    def error(self) -> KvxferError:
        """The local exception for this refusal (see :func:`remote_error`)."""
        return remote_error(self.kind, self.message)

    def _body(self) -> dict[str, Any]:
        return {"x": self.xfer_id, "k": self.kind, "m": self.message}

    @classmethod
    def _parse(cls, h: dict) -> Refusal:
        xid, kind, msg = h.get("x"), h.get("k"), h.get("m")
        if type(xid) is not int or not isinstance(kind, str) or not isinstance(msg, str):
            raise RemoteProtocolError("malformed transfer error: 'x' must be an int, 'k' and 'm' strings")
        return cls(xid, kind, msg)


@dataclass(frozen=True, slots=True)
class Cancel:
    """The initiator cancelled ``xfer_id``: the responder stops serving it, sends or fetches
    no more of it and delivers no notification for it (UCX answers with a Refusal once none of
    its RMA on the transfer can still be in flight)."""

    xfer_id: int

    def _body(self) -> dict[str, Any]:
        return {"x": self.xfer_id}

    @classmethod
    def _parse(cls, h: dict) -> Cancel:
        return cls(_xfer_id(h, "transfer cancel"))


@dataclass(frozen=True, slots=True)
class Notify:
    """A notification for the peer's user (:meth:`Connector.notify`, or a transfer's)."""

    payload: bytes

    def _body(self) -> dict[str, Any]:
        return {"n": self.payload}

    @classmethod
    def _parse(cls, h: dict) -> Notify:
        n = h.get("n")
        if not isinstance(n, bytes):
            raise RemoteProtocolError("notification without a bytes payload ('n')")
        return cls(n)


@dataclass(frozen=True, slots=True)
class Progress:
    """Bytes ``[0, upto)`` of staged transfer ``xfer_id``'s stream are in place (UCX: LANDED
    from a read's responder, READY from a write's initiator)."""

    xfer_id: int
    upto: int

    def _body(self) -> dict[str, Any]:
        return {"x": self.xfer_id, "b": self.upto}

    @classmethod
    def _parse(cls, h: dict) -> Progress:
        xid, upto = h.get("x"), h.get("b")
        if type(xid) is not int or type(upto) is not int or upto < 0:
            raise RemoteProtocolError("malformed progress: 'x' must be an int, 'b' a non-negative byte count")
        return cls(xid, upto)


@dataclass(frozen=True, slots=True)
class HelloAck:
    """The answer to a link's hello: accepted (``refusal`` None) or refused with a reason."""

    refusal: str | None = None

    def _body(self) -> dict[str, Any]:
        return {"ok": True} if self.refusal is None else {"ok": False, "m": self.refusal}

    @classmethod
    def _parse(cls, h: dict) -> HelloAck:
        return cls(None if h.get("ok") is True else str(h.get("m")))


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The sender closes the link."""

    def _body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _parse(cls, h: dict) -> Goodbye:
        return cls()


Message = Request | Done | Refusal | Cancel | Notify | Progress | HelloAck | Goodbye
M = TypeVar("M", Request, Done, Refusal, Cancel, Notify, Progress, HelloAck, Goodbye)


def encode(msg: Message) -> dict[str, Any]:
    """The msgpack map of ``msg`` (the transport names its kind)."""
    return msg._body()


def decode(kind: type[M], h: dict) -> M:
    """The message of class ``kind`` in map ``h`` from a peer.

    Raises:
        RemoteProtocolError: a field is missing or of the wrong type.
    """
    if not isinstance(h, dict):
        raise RemoteProtocolError(f"{kind.__name__} must be a map; got {type(h).__name__}")
    return kind._parse(h)


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------
_REMOTE_KINDS: dict[str, type[KvxferError]] = {}


def remote_error(kind: str, message: str) -> KvxferError:
    """Turn a peer's refusal (error kind, message) into a local exception: the
    :mod:`kvxfer.errors` class of that name, else RemoteTransferError."""
    if not _REMOTE_KINDS:
        from .. import errors

        _REMOTE_KINDS.update({name: getattr(errors, name) for name in errors.__all__})
    cls = _REMOTE_KINDS.get(kind, RemoteTransferError)
    if not (isinstance(cls, type) and issubclass(cls, KvxferError)):
        cls = RemoteTransferError
    return cls(f"peer refused the transfer: {message}")
