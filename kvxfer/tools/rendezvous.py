"""Finding the serving side of ``kvxfer-bench`` through a kvxfer registry (``--registry URL``).

Layer: tools, over :mod:`kvxfer.registry.client`. The serving side registers its bootstrap
address under a name (an opaque msgpack blob in the registry's connector directory, renewed by
the client's heartbeats); the measuring side looks the name up, waiting for it to appear.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import msgpack

from ..errors import ConfigError, KvxferError, RegistryError

__all__ = ["registry_available", "announce", "lookup"]

_BLOB_KIND = "kvxfer-bench"
_BLOB_VERSION = 1


def registry_available() -> bool:
    """Whether this kvxfer has a registry client."""
    return importlib.util.find_spec("kvxfer.registry.client") is not None


def _client(url: str, name: str | None) -> Any:
    if not registry_available():
        raise ConfigError("--registry needs kvxfer.registry.client, which this kvxfer lacks; use --peer HOST:PORT")
    from ..registry.client import RegistryClient

    try:
        return RegistryClient(url, name=name)
    except KvxferError:
        raise
    except OSError as exc:
        raise RegistryError(f"cannot reach the registry at {url}: {exc}") from None


def announce(url: str, name: str, host: str, port: int) -> Any:
    """Register ``host:port`` as the bench server called ``name``; returns the client (close it to withdraw).

    Raises:
        ConfigError: no registry client in this kvxfer, or a bad URL.
        RegistryError: the registry cannot be reached or refused the entry.
    """
    client = _client(url, name)
    blob = msgpack.packb({"kind": _BLOB_KIND, "v": _BLOB_VERSION, "host": host, "port": port}, use_bin_type=True)
    try:
        client.register(blob)
    except BaseException:
        client.close()
        raise
    return client


def lookup(url: str, name: str, timeout: float) -> tuple[str, int]:
    """The bootstrap address registered as ``name``, waiting up to ``timeout`` s for it to appear.

    Raises:
        ConfigError: the entry is not a kvxfer-bench server (e.g. a plain connector's name).
        RegistryError: unreachable registry, or no such name within ``timeout``.
    """
    client = _client(url, None)
    from ..registry.errors import UnknownConnectorError

    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                blob = client.lookup(name)
                break
            except UnknownConnectorError as exc:
                if time.monotonic() > deadline:
                    raise RegistryError(f"no kvxfer-bench server {name!r} in the registry at {url} within {timeout:g} s: {exc}") from None
                time.sleep(0.2)
    finally:
        client.close()
    try:
        obj = msgpack.unpackb(blob, raw=False)
        if obj.get("kind") != _BLOB_KIND or obj.get("v") != _BLOB_VERSION:
            raise ValueError("not a kvxfer-bench entry")
        return str(obj["host"]), int(obj["port"])
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as exc:
        raise ConfigError(f"registry entry {name!r} is not a kvxfer-bench server ({exc}); start one with --listen HOST:PORT --registry URL --name {name}") from None
