"""Transfer requests as msgpack maps: what an initiator asks of its peer, parsed without trust.

Layer: backends, sans-I/O (shared by the TCP data path and anything else that ships a
:class:`~kvxfer.backends.base.TransferRequest`). Every field from a peer is type-checked here;
block ids are then bounds-checked by planning against the receiver's own layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import LayoutError, RemoteProtocolError
from ..handle import Op
from ..reshard import HeadReshard
from .base import TransferRequest

__all__ = ["MAX_IDS", "ids_from_wire", "ids_to_wire", "request_from_wire", "request_to_wire"]

MAX_IDS = 1 << 22  # block ids in one request at most


def ids_to_wire(ids: np.ndarray) -> bytes:
    """Block ids as packed little-endian int64."""
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def ids_from_wire(raw: Any, what: str) -> np.ndarray:
    """Packed int64 block ids from a peer, as a read-only view of ``raw`` where the host is
    little-endian (no copy on the request's path). Raises RemoteProtocolError when malformed."""
    if not isinstance(raw, bytes) or len(raw) % 8 or len(raw) > 8 * MAX_IDS:
        raise RemoteProtocolError(f"field {what!r} must be packed int64 block ids (at most {MAX_IDS})")
    return np.frombuffer(raw, dtype="<i8").astype(np.int64, copy=False)


def _reshard_from_wire(obj: object) -> HeadReshard:
    try:
        return HeadReshard.from_wire(obj)
    except LayoutError as exc:
        raise RemoteProtocolError(str(exc)) from None


def request_from_wire(h: dict) -> TransferRequest:
    """Parse an XFER_REQUEST header. Raises RemoteProtocolError."""
    x, op, notify, layers = h.get("x"), h.get("op"), h.get("n"), h.get("l")
    if type(x) is not int or op not in ("r", "w") or not (notify is None or isinstance(notify, bytes)):
        raise RemoteProtocolError("malformed transfer request")
    return TransferRequest(
        xfer_id=x,
        op=Op.READ if op == "r" else Op.WRITE,
        src_blocks=ids_from_wire(h.get("s"), "s"),
        dst_blocks=ids_from_wire(h.get("d"), "d"),
        layers=None if layers is None else ids_from_wire(layers, "l"),
        notify=notify,
        reshard=None if h.get("rs") is None else _reshard_from_wire(h["rs"]),
    )


def request_to_wire(req: TransferRequest) -> dict:
    """The msgpack map of ``req``, as :func:`request_from_wire` reads it."""
    return {
        "x": req.xfer_id,
        "op": "r" if req.op is Op.READ else "w",
        "s": ids_to_wire(req.src_blocks),
        "d": ids_to_wire(req.dst_blocks),
        "l": None if req.layers is None else ids_to_wire(req.layers),
        "n": req.notify,
        "rs": None if req.reshard is None else req.reshard.to_wire(),
    }
