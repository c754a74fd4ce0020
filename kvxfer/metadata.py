"""Connector metadata: what a peer needs to connect to us, as msgpack bytes.

Layer: protocol-level data model. Parsed from untrusted bytes with full validation.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import msgpack

from .errors import LayoutError, RemoteProtocolError
from .layout import LayoutGeometry

__all__ = ["PeerMetadata", "boot_id"]

_METADATA_VERSION = 1
_MAX_METADATA_BYTES = 16 << 20


@cache
def boot_id() -> str:
    """Identifier of this host's boot: equal for processes on the same host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return f"node-{uuid.getnode():x}"


@dataclass(frozen=True, slots=True)
class PeerMetadata:
    """A connector's self-description: name, host identity, layout geometry, backend endpoints."""

    name: str
    session: str
    boot_id: str
    pid: int
    geometry: LayoutGeometry | None
    device: int
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str | None:
        return None if self.geometry is None else self.geometry.fingerprint

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "v": _METADATA_VERSION,
                "name": self.name,
                "session": self.session,
                "boot": self.boot_id,
                "pid": self.pid,
                "dev": self.device,
                "geom": None if self.geometry is None else self.geometry.to_wire(),
                "fp": self.fingerprint,
                "be": self.backends,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerMetadata:
        """Parse a peer's metadata blob.

        Raises:
            RemoteProtocolError: not msgpack, wrong version, missing or mistyped fields, or a
                fingerprint that does not match the geometry it came with.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > _MAX_METADATA_BYTES:
            raise RemoteProtocolError("connector metadata must be bytes of at most 16 MiB")
        try:
            obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
        except Exception as exc:
            raise RemoteProtocolError(f"connector metadata is not valid msgpack: {exc}") from None
        if not isinstance(obj, dict) or obj.get("v") != _METADATA_VERSION:
            raise RemoteProtocolError(f"connector metadata version {obj.get('v') if isinstance(obj, dict) else None!r}; expected {_METADATA_VERSION}")
        try:
            name, session, boot, pid, dev, be = obj["name"], obj["session"], obj["boot"], obj["pid"], obj["dev"], obj["be"]
            if not (isinstance(name, str) and isinstance(session, str) and isinstance(boot, str)
                    and type(pid) is int and type(dev) is int and isinstance(be, dict)
                    and all(isinstance(k, str) and isinstance(v, dict) for k, v in be.items())):
                raise RemoteProtocolError("connector metadata has mistyped fields")
            geom = None if obj["geom"] is None else LayoutGeometry.from_wire(obj["geom"])
        except KeyError as exc:
            raise RemoteProtocolError(f"connector metadata lacks field {exc}") from None
        except LayoutError as exc:
            raise RemoteProtocolError(f"connector metadata carries a bad layout: {exc}") from None
        if geom is not None and obj.get("fp") != geom.fingerprint:
            raise RemoteProtocolError("connector metadata fingerprint does not match its layout geometry")
        return cls(name=name, session=session, boot_id=boot, pid=pid, geometry=geom, device=dev, backends=be)

    @staticmethod
    def new_session() -> str:
        return f"{os.getpid():x}-{uuid.uuid4().hex[:12]}"
