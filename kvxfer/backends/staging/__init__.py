"""Staging: moving a plan's bytes through buffers, for every backend that stages.

Layer: backends, shared (below the backend packages; above ops). Three things, one module each:

- :mod:`.stream`: a plan's **byte stream** seen from one side (:class:`StreamSide`): the
  (address, length) runs that a host transport reads or writes, cut into chunks
  (:func:`chunk_bounds`). Host memory is viewed in place (:class:`HostStreamSide`); GPU memory
  is staged through pinned chunks (:class:`GpuStreamSide`). :func:`stream_side` picks one.
- :mod:`.pools`: **buffer pools**: fixed pinned host slots (:class:`PinnedPool`, one pair per
  device from :func:`pinned_pool`) and contiguous buffers reused by size class
  (:class:`SizePool`, host or device memory from :func:`alloc_buffer`, registered by whoever
  makes them).
- :mod:`.packer`: **packing**: gather a plan's source blocks into a contiguous buffer and
  scatter one back (:class:`Packer`; the GPU kernels of :mod:`kvxfer.ops` for device memory,
  numpy for host memory), whole or piece by piece (:class:`Pieces`).

TCP uses the stream sides (GPU ones pack with a :class:`Packer` through a pinned pool); UCX's
packed path uses :class:`Packer` over its registered :class:`SizePool` buffers.
"""

from __future__ import annotations

from ...config import TcpConfig
from ..._tensors import MemoryKind
from ...errors import LayoutError
from ...layout import KVLayout
from ...plan import TransferPlan
from .packer import Buffer, ContiguousBuffer, Packer, Pieces
from .pools import PinnedPool, SizePool, alloc_buffer, pinned_pool, size_class
from .stream import GpuStreamSide, HostStreamSide, StreamSide, chunk_bounds

__all__ = [
    "Buffer",
    "ContiguousBuffer",
    "GpuStreamSide",
    "HostStreamSide",
    "Packer",
    "Pieces",
    "PinnedPool",
    "SizePool",
    "StreamSide",
    "alloc_buffer",
    "chunk_bounds",
    "pinned_pool",
    "size_class",
    "stream_side",
]


def stream_side(plan: TransferPlan, side: str, layout: KVLayout | None, config: TcpConfig) -> StreamSide:
    """The stream side of ``plan`` over ``layout``'s memory (``side`` is "src" or "dst"):
    in place for host memory, staged through pinned chunks for GPU memory.

    Raises:
        LayoutError: no layout is registered.
        BackendUnavailableError: GPU memory without CuPy.
    """
    if layout is None:
        raise LayoutError("no KV layout is registered on this connector")
    if layout.memory is MemoryKind.HOST:
        return HostStreamSide(plan, side, layout.addrs)
    return GpuStreamSide(plan, side, layout, config)
