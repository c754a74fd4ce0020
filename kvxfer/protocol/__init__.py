"""Sans-I/O wire protocol: frames (magic, version, type, lengths) and typed messages.

Shared by the TCP data path and the registry. Nothing here touches a socket.
"""

from .frames import (
    FRAME_PREFIX_SIZE,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Frame,
    FrameReader,
    FrameType,
    FramePrefix,
    decode_header,
    encode_frame,
    parse_prefix,
)

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
