"""Configuration: explicit frozen configs, with every ``KVXFER_*`` environment read in this module.

Precedence: an explicit argument, then the ``KVXFER_*`` variable, then the default. A bad value
raises ConfigError naming the variable and what is expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["MAX_DATA_FRAME", "TcpConfig", "ConnectorConfig", "from_env"]

T = TypeVar("T")


MAX_DATA_FRAME = 64 << 20  # the largest DATA payload any kvxfer peer sends or accepts


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """TCP backend settings (``KVXFER_TCP_<FIELD>`` variables)."""

    streams: int = 4  # data connections per peer
    # bytes per DATA frame at most; 16 MiB measured 87-93% of raw sockets against 72% for 4 MiB
    # on a 2-core host (bench/bench_tcp.py), where each frame's bookkeeping competes for the cores
    chunk_bytes: int = 16 << 20
    max_iov: int = 1000  # memory runs per DATA frame at most (IOV_MAX is 1024)
    socket_buffer: int = 0  # SO_SNDBUF/SO_RCVBUF; 0 keeps the kernel's autotuning (measured faster)
    handshake_timeout: float = 10.0
    request_wait: float = 10.0  # how long DATA may wait for its request on another connection
    staging_bytes: int = 64 << 20  # pinned staging per GPU transfer direction
    advertise: str = ""  # host to advertise when listening on a wildcard address

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= 64:
            raise ConfigError(f"tcp streams={self.streams}; expected 1..64")
        if not 4096 <= self.chunk_bytes <= MAX_DATA_FRAME:
            raise ConfigError(f"tcp chunk_bytes={self.chunk_bytes}; expected 4096..{MAX_DATA_FRAME}")
        if not 1 <= self.max_iov <= 1000:
            raise ConfigError(f"tcp max_iov={self.max_iov}; expected 1..1000")
        if self.staging_bytes < self.chunk_bytes:
            raise ConfigError("tcp staging_bytes must be at least chunk_bytes")


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """Connector settings (``KVXFER_<FIELD>`` variables)."""

    timeout: float = 60.0  # default deadline of a transfer, seconds
    connect_timeout: float = 10.0
    prefer_ucx: bool = False  # auto backend: UCX before TCP for host memory (RDMA-capable UCX)
    registry_lease: float = 5.0  # seconds a registry entry lives without a heartbeat

    def __post_init__(self) -> None:
        if not self.timeout > 0 or not self.connect_timeout > 0 or not self.registry_lease > 0:
            raise ConfigError("timeouts must be positive numbers of seconds")


def _parse(value: str, like: Any, name: str) -> Any:
    try:
        if isinstance(like, bool):
            return value.lower() in ("1", "true", "yes", "on")
        return type(like)(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}; expected a {type(like).__name__}") from None


def from_env(cls: type[T], prefix: str, **overrides: Any) -> T:
    """Build ``cls`` from defaults, then ``{prefix}{FIELD}`` variables, then ``overrides``."""
    base = cls()
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        var = f"{prefix}{f.name.upper()}"
        if var in os.environ:
            values[f.name] = _parse(os.environ[var], getattr(base, f.name), var)
    unknown = set(overrides) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} options {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")  # type: ignore[arg-type]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return replace(base, **values)  # type: ignore[type-var]
