"""The UCX backend's packed path: registered staging buffers and the gather/scatter around them.

Layer: backends (memory of ucx.py). A PACKED transfer gathers a plan's ranges into one
registered contiguous buffer (numpy for host memory, the one-launch kernels of
:mod:`kvxfer.ops.cuda` for GPU memory), moves it with one RMA and scatters it on the other
side. Buffers are registered with ``ucp_mem_map`` once and reused by size class.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._memory import host_bytes
from .._tensors import MemoryKind
from ..layout import KVLayout
from ..plan import TransferPlan
from . import _ucp

__all__ = ["Packer", "Staging", "StagingPool"]


@dataclass(eq=False)
class Staging:
    """A registered contiguous buffer (host numpy or GPU cupy array)."""

    array: Any
    address: int
    nbytes: int
    memh: int
    rkey: bytes


class StagingPool:
    """Registered staging buffers, reused by size class (powers of two)."""

    def __init__(self, ucp: _ucp.Ucp, context: int, memory: MemoryKind, device: int, keep: int):
        self._ucp, self._ctx, self._memory, self._device, self._keep = ucp, context, memory, device, keep
        self._free: list[Staging] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> Staging:
        size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
        with self._lock:
            for i, s in enumerate(self._free):
                if s.nbytes == size:
                    return self._free.pop(i)
        if self._memory is MemoryKind.HOST:
            arr = np.empty(size, dtype=np.uint8)
            addr, mt = int(arr.ctypes.data), _ucp.MemoryType.HOST
        else:
            import cupy

            with cupy.cuda.Device(self._device):
                arr = cupy.empty(size, dtype=cupy.uint8)
            addr, mt = int(arr.data.ptr), _ucp.MemoryType.CUDA
        memh = self._ucp.mem_map(self._ctx, addr, size, mt)
        return Staging(arr, addr, size, memh, self._ucp.rkey_pack(self._ctx, memh))

    def put(self, s: Staging) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(s)
                return
        self._ucp.mem_unmap(self._ctx, s.memh)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for s in free:
            self._ucp.mem_unmap(self._ctx, s.memh)


class Packer:
    """Gather/scatter between a plan's side of this layout and a contiguous staging buffer."""

    def __init__(self, layout: KVLayout):
        self.layout = layout
        self.host = layout.memory is MemoryKind.HOST
        self._views = None if not self.host else [host_bytes(int(a), t.span) for a, t in zip(layout.addrs, layout.geometry.tensors)]
        self._stream: Any = None

    def _gpu_stream(self) -> Any:
        if self._stream is None:
            import cupy

            with cupy.cuda.Device(self.layout.device):
                self._stream = cupy.cuda.Stream(non_blocking=True)
        return self._stream

    def gather(self, plan: TransferPlan, buf: Staging) -> None:
        if self.host:
            from ..ops.reference import gather

            gather(plan, self._views, buf.array)
        else:
            from ..ops import cuda as ops_cuda

            s = self._gpu_stream()
            ops_cuda.gather(plan, self.layout, buf.array, stream=s, device=self.layout.device)
            s.synchronize()  # UCX reads the buffer outside any stream

    def scatter(self, plan: TransferPlan, buf: Staging) -> None:
        if self.host:
            from ..ops.reference import scatter

            scatter(plan, buf.array, self._views)
        else:
            from ..ops import cuda as ops_cuda

            s = self._gpu_stream()
            ops_cuda.scatter(plan, buf.array, self.layout, stream=s, device=self.layout.device)
            s.synchronize()
