"""The UCX backend's packed path: staging buffers registered for RMA, over the shared staging.

Layer: backends/ucx, above :mod:`~kvxfer.backends.ucx.ucp` and the shared
:mod:`kvxfer.backends.staging`. A PACKED transfer gathers a plan's ranges into one contiguous
buffer (:class:`~kvxfer.backends.staging.Packer`: vectorized numpy for host memory, the
one-launch block-pair kernel for GPU memory), moves it with RMA in pieces and scatters it on
the other side. What is UCX's own here: each buffer is registered with ``ucp_mem_map`` once
(its packed rkey goes to the peer in a request) and reused by size class
(:class:`~kvxfer.backends.staging.SizePool`) until the pool closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..._tensors import MemoryKind
from ..staging import SizePool, alloc_buffer
from .ucp import MemoryType, Ucp

__all__ = ["Staging", "StagingPool", "staging_pool"]


@dataclass(eq=False)
class Staging:
    """A contiguous buffer registered with UCX (host numpy or GPU cupy array): a
    :class:`~kvxfer.backends.staging.ContiguousBuffer` with its memory handle and packed rkey."""

    array: Any
    address: int
    nbytes: int
    memh: int
    rkey: bytes


StagingPool = SizePool[Staging]


def staging_pool(ucp: Ucp, context: int, memory: MemoryKind, device: int, keep: int) -> StagingPool:
    """Registered staging buffers in ``memory`` (on ``device`` for GPU memory), reused by size
    class; at most ``keep`` free ones are kept. Registration errors (UcxCallError) come from
    :meth:`~kvxfer.backends.staging.SizePool.get`."""
    mt = MemoryType.HOST if memory is MemoryKind.HOST else MemoryType.CUDA

    def make(size: int) -> Staging:
        arr, addr = alloc_buffer(memory, device, size)
        memh = ucp.mem_map(context, addr, size, mt)
        return Staging(arr, addr, size, memh, ucp.rkey_pack(context, memh))

    def free(s: Staging) -> None:
        ucp.mem_unmap(context, s.memh)

    return SizePool(make, free, keep)
