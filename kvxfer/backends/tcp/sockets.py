"""Blocking socket helpers of the TCP backend: addresses, whole frames' headers, discarding.

Layer: backends, tcp package (over :mod:`kvxfer.protocol.frames`).
"""

from __future__ import annotations

import socket

from ...errors import PeerLostError
from ...protocol.frames import FramePrefix, decode_header, parse_prefix

__all__ = ["FLAG_FROM_INITIATOR", "discard", "parse_host_port", "read_frame_header", "recv_exact_into"]

FLAG_FROM_INITIATOR = 1  # DATA frame flag: the frame belongs to a transfer its sender initiated
_DISCARD = memoryview(bytearray(1 << 20))


def parse_host_port(addr: str) -> tuple[str, int]:
    """'host:port' -> (host, port); ConfigError-free ValueError on bad input."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {addr!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``. Raises PeerLostError when the peer closes first."""
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise PeerLostError("connection closed by peer")
        view = view[n:]


def read_frame_header(sock: socket.socket, prefix_buf: memoryview, max_payload: int) -> tuple[FramePrefix, dict]:
    """The next frame's prefix and header (its payload, if any, is still to be read).

    Raises:
        RemoteProtocolError: a malformed prefix or header. PeerLostError: the peer closed.
    """
    recv_exact_into(sock, prefix_buf)
    prefix = parse_prefix(prefix_buf, max_payload)
    hbuf = bytearray(prefix.header_len)
    recv_exact_into(sock, memoryview(hbuf))
    return prefix, decode_header(hbuf)


def discard(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes (a payload nobody waits for any more)."""
    while n:
        k = min(n, _DISCARD.nbytes)
        recv_exact_into(sock, _DISCARD[:k])
        n -= k
