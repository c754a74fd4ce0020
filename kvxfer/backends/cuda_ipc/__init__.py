"""CUDA IPC backend: GPU to GPU on one host, one kernel launch per transfer.

- :mod:`.backend`: :class:`CudaIpcBackend` (export, connect, launch, completion).
- :mod:`.link`: :class:`CudaIpcLink`, one peer's mappings and its TCP control channel.
- :mod:`.endpoint`: a peer's endpoint, validated; the bounds checks of every copy.
- :mod:`.handles`: CUDA IPC handles through the runtime (export, open, release).
- :mod:`.ordered`, :mod:`.completion`: finishing queued work in order, on whichever thread.
"""

from .backend import CudaIpcBackend
from .endpoint import ENDPOINT_VERSION
from .link import CudaIpcLink

__all__ = ["CudaIpcBackend", "CudaIpcLink", "ENDPOINT_VERSION"]
