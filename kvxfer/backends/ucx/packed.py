"""The UCX backend's packed path: registered staging buffers and the gather/scatter around them.

Layer: backends/ucx, above :mod:`~kvxfer.backends.ucx.ucp`. A PACKED transfer gathers a plan's
ranges into one registered contiguous buffer (vectorized numpy for host memory,
:mod:`kvxfer.ops.host`; the one-launch block-pair kernel for GPU memory), moves it with RMA in
pieces and scatters it on the other side. Buffers are registered with ``ucp_mem_map`` once and reused by size class.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._memory import host_bytes
from ..._tensors import MemoryKind
from ...layout import KVLayout
from ...plan import TransferPlan
from .ucp import MemoryType, Ucp

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

    def __init__(self, ucp: Ucp, context: int, memory: MemoryKind, device: int, keep: int):
        self._ucp, self._ctx, self._memory, self._device, self._keep = ucp, context, memory, device, keep
        self._free: list[Staging] = []
        self._held: list[Staging] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> Staging:
        size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
        with self._lock:
            for i, s in enumerate(self._free):
                if s.nbytes == size:
                    return self._free.pop(i)
        if self._memory is MemoryKind.HOST:
            arr = np.empty(size, dtype=np.uint8)
            addr, mt = int(arr.ctypes.data), MemoryType.HOST
        else:
            import cupy

            with cupy.cuda.Device(self._device):
                arr = cupy.empty(size, dtype=cupy.uint8)
            addr, mt = int(arr.data.ptr), MemoryType.CUDA
        memh = self._ucp.mem_map(self._ctx, addr, size, mt)
        return Staging(arr, addr, size, memh, self._ucp.rkey_pack(self._ctx, memh))

    def put(self, s: Staging) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(s)
                return
        self._ucp.mem_unmap(self._ctx, s.memh)

    def hold(self, s: Staging) -> None:
        """Keep ``s`` allocated and registered, never reused, until :meth:`close`: a buffer of
        a transfer cut off by its link's close, which the peer (or an RMA of ours still in
        flight) may yet write. Freed, its memory would go back to the allocator while UCX
        still has it registered."""
        with self._lock:
            self._held.append(s)

    @property
    def held(self) -> tuple[Staging, ...]:
        """The buffers :meth:`hold` keeps."""
        with self._lock:
            return tuple(self._held)

    def close(self) -> None:
        with self._lock:
            done, self._free, self._held = self._free + self._held, [], []
        for s in done:
            self._ucp.mem_unmap(self._ctx, s.memh)


class Packer:
    """Gather/scatter between a plan's side of this layout and a contiguous staging buffer.

    ``gather``/``scatter`` move one plan (often one chunk of a transfer, see
    :meth:`~kvxfer.plan.TransferPlan.chunk_bounds`) at ``offset`` in the buffer and return a token
    for :meth:`wait`: GPU copies are queued on the packer's own stream (in order, so waiting for
    the last token covers the earlier ones); host copies are done when the call returns.
    """

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

    def wait_for(self, event: Any) -> None:
        """Queue a wait for ``event`` (GPU; None: nothing) before our next gather or scatter."""
        if event is not None and not self.host:
            self._gpu_stream().wait_event(event)

    def _record(self) -> Any:
        import cupy

        with cupy.cuda.Device(self.layout.device):
            ev = cupy.cuda.Event(disable_timing=True)
            ev.record(self._gpu_stream())
        return ev

    def gather(self, plan: TransferPlan, buf: Staging, offset: int = 0) -> Any:
        """Copy ``plan``'s source blocks into ``buf`` from byte ``offset``; returns a token."""
        if self.host:
            from ...ops.host import gather

            gather(plan, self._views, buf.array[offset : offset + plan.nbytes])
            return None
        from ...ops import cuda as ops_cuda

        ops_cuda.gather(plan, self.layout, buf.address + offset, stream=self._gpu_stream(), device=self.layout.device)
        return self._record()

    def scatter(self, plan: TransferPlan, buf: Staging, offset: int = 0) -> Any:
        """Copy ``buf`` from byte ``offset`` into ``plan``'s destination blocks; returns a token."""
        if self.host:
            from ...ops.host import scatter

            scatter(plan, buf.array[offset : offset + plan.nbytes], self._views)
            return None
        from ...ops import cuda as ops_cuda

        ops_cuda.scatter(plan, buf.address + offset, self.layout, stream=self._gpu_stream(), device=self.layout.device)
        return self._record()

    def pieces(self, plan: TransferPlan, buf: Staging, bounds: list[tuple[int, int, int, int]], gather: bool) -> _Pieces:
        """The pieces ``bounds`` (:meth:`~kvxfer.plan.TransferPlan.chunk_bounds`) of a gather into
        (or scatter from) ``buf``, prepared once; ``launch(i)`` queues piece ``i``, returns a token."""
        return _Pieces(self, plan, buf, bounds, gather)

    @staticmethod
    def wait(token: Any) -> None:
        """Block until the copy behind ``token`` (and every earlier one) is done."""
        if token is not None:
            token.synchronize()


class _Pieces:
    """A gather or scatter prepared once and run piece by piece (see :meth:`Packer.pieces`)."""

    def __init__(self, packer: Packer, plan: TransferPlan, buf: Staging, bounds: list[tuple[int, int, int, int]],
                 gather: bool):
        self._packer, self._plan, self._buf, self._bounds, self._gather = packer, plan, buf, bounds, gather
        self._gpu: Any = None
        if not packer.host and plan.block_pairs is not None:
            from ...ops.pairs import BUF_DST, BUF_SRC, PairPieces

            lay = packer.layout
            src, dst = (lay, buf.address) if gather else (buf.address, lay)
            self._gpu = PairPieces(plan.block_pairs, src, dst, buffer_side=BUF_DST if gather else BUF_SRC,
                                   bounds=[b[:2] for b in bounds], stream=packer._gpu_stream(), device=lay.device)

    def gather_staged(self) -> Iterator[tuple[int, int]]:
        """Yield each piece's stream bytes (lo, hi) as soon as that piece is in the buffer.

        GPU: two gathers are queued ahead, the next one launched while the GPU runs the
        current one, so when piece i is yielded (and put on the wire) piece i + 1 is already
        gathering and its launch (~20 us of host time) is off the wire's path; the first
        piece still moves after one gather. Host memory: a gather is the copy itself, so
        piece i + 1 is gathered only after piece i has been yielded."""
        n = len(self._bounds)
        ahead = 2 if self._gpu is not None else 1
        tokens = [self.launch(i) for i in range(min(ahead, n))]
        for i, (_, _, lo, hi) in enumerate(self._bounds):
            self._packer.wait(tokens[i])
            yield lo, hi
            if i + ahead < n:
                tokens.append(self.launch(i + ahead))

    def launch(self, i: int) -> Any:
        p0, p1, lo, _ = self._bounds[i]
        if self._gpu is not None:
            self._gpu.launch(i)
            return self._packer._record()
        sub = self._plan.piece(p0, p1)
        return self._packer.gather(sub, self._buf, lo) if self._gather else self._packer.scatter(sub, self._buf, lo)
