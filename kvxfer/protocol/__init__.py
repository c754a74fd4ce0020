"""Sans-I/O wire protocol: frames (magic, version, type, lengths), the data path's typed
messages and the rules of the transfers on a link.

- :mod:`.frames`: the frame format, shared by the TCP data path and the registry.
- :mod:`.messages`: transfer request, done, refusal, cancel, notify (and the staged transfers'
  progress, the hello's answer, goodbye) with their one msgpack codec.
- :mod:`.transfer`: :class:`TransferSession`, the outstanding transfers of one link and what
  each answer, deadline and close does to them.

Nothing here touches a socket.
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
from .messages import (
    Cancel,
    Done,
    Goodbye,
    HelloAck,
    Notify,
    Progress,
    Refusal,
    Request,
    StagingRef,
    TransferRequest,
)
from .transfer import TransferSession

__all__ = [
    "Cancel",
    "FRAME_PREFIX_SIZE",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Done",
    "Frame",
    "FramePrefix",
    "FrameReader",
    "FrameType",
    "Goodbye",
    "HelloAck",
    "Notify",
    "Progress",
    "Refusal",
    "Request",
    "StagingRef",
    "TransferRequest",
    "TransferSession",
    "decode_header",
    "encode_frame",
    "parse_prefix",
]
