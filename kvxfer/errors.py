"""The kvxfer error hierarchy: every failure the library reports is a KvxferError.

Layer: shared by every other module. Callers catch ``KvxferError`` for anything kvxfer raises,
or one of the subclasses below to react to a specific cause.
"""

from __future__ import annotations

__all__ = [
    "KvxferError",
    "LayoutError",
    "LayoutMismatchError",
    "BlockIdError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "TransportError",
    "PeerLostError",
    "TransferTimeoutError",
    "TransferCancelledError",
    "RemoteTransferError",
    "KernelCompileError",
    "BackendUnavailableError",
    "RegistryError",
    "ConfigError",
]


class KvxferError(Exception):
    """Base class of every error kvxfer raises."""


class ConfigError(KvxferError, ValueError):
    """A configuration value (argument or ``KVXFER_*`` variable) is invalid."""


class LayoutError(KvxferError, ValueError):
    """Tensors cannot be described as a paged KV layout (bad shape, dim, dtype, memory)."""


class LayoutMismatchError(LayoutError):
    """Two peers' layouts are not compatible (their fingerprints differ)."""


class BlockIdError(KvxferError, ValueError):
    """Block ids are out of range, duplicated, or the source and destination lists disagree."""


class ProtocolError(KvxferError):
    """Bytes that do not follow kvxfer's wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent malformed, oversized, truncated or unknown-version bytes."""


class TransportError(KvxferError):
    """A backend failed to move bytes (socket, CUDA, UCX error)."""


class PeerLostError(TransportError):
    """The peer disconnected or died; transfers pending on it are failed."""


class TransferTimeoutError(KvxferError, TimeoutError):
    """A transfer or a wait did not finish within its timeout."""


class TransferCancelledError(KvxferError):
    """The transfer was cancelled (``TransferHandle.cancel``); no byte of it lands afterwards."""


class RemoteTransferError(TransportError):
    """The peer refused or failed its side of a transfer; the message is the peer's reason."""


class KernelCompileError(KvxferError):
    """A CUDA kernel of kvxfer/csrc/ failed to compile or load."""


class BackendUnavailableError(KvxferError):
    """A backend was asked for that cannot run here (package missing, no GPU, no peer access)."""


class RegistryError(KvxferError):
    """The registry refused a request, lost a party, or could not be reached."""
