"""Frames: a fixed 20-byte prefix, a msgpack header, an optional raw payload.

Prefix (network byte order): magic ``b"KVXF"``, version (u8), type (u8), flags (u16),
header length (u32), payload length (u64). Anything else (bad magic, unknown version or type,
oversized header or payload, a header that is not a msgpack map) is a RemoteProtocolError; the
I/O layer drops that connection and logs the reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "FRAME_PREFIX_SIZE",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Frame",
    "FramePrefix",
    "FrameReader",
    "FrameType",
    "decode_header",
    "encode_frame",
    "parse_prefix",
]

MAGIC = b"KVXF"
PROTOCOL_VERSION = 1
_PREFIX = struct.Struct("!4sBBHIQ")
FRAME_PREFIX_SIZE = _PREFIX.size
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD = 1 << 30


class FrameType(IntEnum):
    """Every frame type kvxfer sends."""

    # data path (backends/tcp/; the messages of protocol/messages.py)
    HELLO = 1
    HELLO_ACK = 2
    XFER_REQUEST = 3
    DATA = 4
    XFER_DONE = 5
    XFER_ERROR = 6
    NOTIFY = 7
    GOODBYE = 8
    XFER_CANCEL = 9
    # registry (registry/)
    REG_REQUEST = 32
    REG_REPLY = 33
    REG_EVENT = 34


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


@dataclass(frozen=True, slots=True)
class FramePrefix:
    type: FrameType
    flags: int
    header_len: int
    payload_len: int


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole decoded frame."""

    type: FrameType
    header: dict[str, Any]
    payload: bytes = b""


def encode_frame(ftype: FrameType, header: dict[str, Any], payload_len: int = 0, flags: int = 0) -> bytes:
    """Prefix and header of a frame; the caller sends ``payload_len`` payload bytes after it."""
    body = msgpack.packb(header, use_bin_type=True)
    if len(body) > MAX_HEADER_BYTES:
        raise LocalProtocolError(f"frame header of {len(body)} B exceeds the {MAX_HEADER_BYTES} B limit")
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(ftype), flags, len(body), payload_len) + body


def parse_prefix(data: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD) -> FramePrefix:
    """Parse and check the 20-byte prefix.

    Raises:
        RemoteProtocolError: wrong length, magic, version or type; header or payload too long.
    """
    if len(data) != FRAME_PREFIX_SIZE:
        raise RemoteProtocolError(f"frame prefix is {len(data)} B; expected {FRAME_PREFIX_SIZE}")
    magic, version, ftype, flags, hlen, plen = _PREFIX.unpack(data)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad frame magic {bytes(magic)!r}; expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version}; this side speaks {PROTOCOL_VERSION}")
    if ftype not in _KNOWN_TYPES:
        raise RemoteProtocolError(f"unknown frame type {ftype}")
    if hlen > MAX_HEADER_BYTES:
        raise RemoteProtocolError(f"frame header of {hlen} B exceeds the {MAX_HEADER_BYTES} B limit")
    if plen > max_payload:
        raise RemoteProtocolError(f"frame payload of {plen} B exceeds the {max_payload} B limit")
    return FramePrefix(FrameType(ftype), flags, hlen, plen)


def decode_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode a msgpack header that must be a map with string keys.

    Raises:
        RemoteProtocolError: not msgpack, trailing bytes, or not a map.
    """
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(f"frame header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise RemoteProtocolError(f"frame header must be a map with string keys; got {type(obj).__name__}")
    return obj


class FrameReader:
    """Incremental decoder for a byte stream of whole frames (payload included).

    Feed bytes with :meth:`feed`; take complete frames with :meth:`next_frame` (None when more
    bytes are needed). Used by the registry and by tests; the TCP data path receives payloads
    straight into KV memory instead.
    """

    def __init__(self, max_payload: int = 1 << 24):
        self._buf = bytearray()
        self._prefix: FramePrefix | None = None
        self._max_payload = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None. Raises RemoteProtocolError on malformed input."""
        if self._prefix is None:
            if len(self._buf) < FRAME_PREFIX_SIZE:
                return None
            self._prefix = parse_prefix(bytes(self._buf[:FRAME_PREFIX_SIZE]), self._max_payload)
        p = self._prefix
        total = FRAME_PREFIX_SIZE + p.header_len + p.payload_len
        if len(self._buf) < total:
            return None
        header = decode_header(bytes(self._buf[FRAME_PREFIX_SIZE : FRAME_PREFIX_SIZE + p.header_len]))
        payload = bytes(self._buf[FRAME_PREFIX_SIZE + p.header_len : total])
        del self._buf[:total]
        self._prefix = None
        return Frame(p.type, header, payload)
