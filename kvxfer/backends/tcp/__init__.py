"""TCP backend: plain sockets, framed msgpack headers, payloads received straight into place.

- :mod:`.backend`: :class:`TcpBackend` (listener, handshake, links, control channels).
- :mod:`.link`: :class:`TcpLink`, one peer's connections and the transfers on them.
- :mod:`.sockets`: blocking frame and address helpers; :mod:`.iov`: ``readv``/``writev``.
"""

from .backend import TcpBackend
from .link import TcpLink
from .sockets import parse_host_port

__all__ = ["TcpBackend", "TcpLink", "parse_host_port"]
