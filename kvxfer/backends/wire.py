"""Compatibility names for the UCX backend until it uses :mod:`kvxfer.protocol.messages`
directly (the one codec of transfer requests); nothing else imports this module."""

from __future__ import annotations

from ..protocol.messages import (  # noqa: F401
    MAX_IDS,
    Request,
    TransferRequest,
    _reshard_from_wire,
    decode,
    encode,
    id_width_from_wire,
    ids_from_wire,
    ids_to_wire,
    ids_width,
)

__all__ = ["MAX_IDS", "id_width_from_wire", "ids_from_wire", "ids_to_wire", "ids_width", "request_from_wire",
           "request_ids_to_wire", "request_to_wire"]


def request_ids_to_wire(req: TransferRequest) -> tuple[int, bytes, bytes, bytes | None]:
    """(bytes per id, source ids, destination ids, layers or None) of ``req`` on the wire."""
    h = encode(Request(req))
    return h["iw"], h["s"], h["d"], h["l"]


def request_from_wire(h: dict) -> TransferRequest:
    """The transfer of a request map. Raises RemoteProtocolError."""
    return decode(Request, h).transfer


def request_to_wire(req: TransferRequest) -> dict:
    """The request map of ``req``."""
    return encode(Request(req))
