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

__all__ = ["MAX_IDS", "id_width_from_wire", "ids_from_wire", "ids_to_wire", "ids_width", "request_from_wire",
           "request_ids_to_wire", "request_to_wire"]

MAX_IDS = 1 << 22  # block ids in one request at most


_WIDTHS = {2: "<u2", 4: "<u4", 8: "<i8"}  # bytes per block id on the wire -> its dtype


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


def request_ids_to_wire(req: TransferRequest) -> tuple[int, bytes, bytes, bytes | None]:
    """(bytes per id, source ids, destination ids, layers or None) of ``req`` on the wire, every
    list in the one width that holds them all."""
    layers = () if req.layers is None else (req.layers,)
    width = ids_width(req.src_blocks, req.dst_blocks, *layers)
    return (width, ids_to_wire(req.src_blocks, width), ids_to_wire(req.dst_blocks, width),
            None if req.layers is None else ids_to_wire(req.layers, width))


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


def request_from_wire(h: dict) -> TransferRequest:
    """Parse an XFER_REQUEST header. Raises RemoteProtocolError."""
    x, op, notify, layers = h.get("x"), h.get("op"), h.get("n"), h.get("l")
    if type(x) is not int or op not in ("r", "w") or not (notify is None or isinstance(notify, bytes)):
        raise RemoteProtocolError("malformed transfer request")
    width = id_width_from_wire(h)
    return TransferRequest(
        xfer_id=x,
        op=Op.READ if op == "r" else Op.WRITE,
        src_blocks=ids_from_wire(h.get("s"), "s", width),
        dst_blocks=ids_from_wire(h.get("d"), "d", width),
        layers=None if layers is None else ids_from_wire(layers, "l", width),
        notify=notify,
        reshard=None if h.get("rs") is None else _reshard_from_wire(h["rs"]),
    )


def request_to_wire(req: TransferRequest) -> dict:
    """The msgpack map of ``req``, as :func:`request_from_wire` reads it."""
    width, src, dst, layers = request_ids_to_wire(req)
    return {
        "x": req.xfer_id,
        "op": "r" if req.op is Op.READ else "w",
        "iw": width,
        "s": src,
        "d": dst,
        "l": layers,
        "n": req.notify,
        "rs": None if req.reshard is None else req.reshard.to_wire(),
    }
