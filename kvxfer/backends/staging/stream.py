"""The byte stream of a plan, seen from one side: views of that side's memory, cut into chunks.

Layer: backends, shared staging. A plan's stream is its jobs' runs in order; the sender reads
(address, length) runs of the source side, the receiver writes into runs of the destination
side. Host memory is used in place (:class:`HostStreamSide`). GPU memory is staged behind the
same interface (:class:`GpuStreamSide`): sending, one gather packs the whole transfer into a
device buffer in stream order and each chunk is copied down into a pinned slot just before
its send, so chunks on different connections overlap PCIe and the wire; receiving, each chunk
lands in a pinned slot and is copied up into the device buffer, and one scatter places every
block once all chunks are in. A sender takes its slot before it sends a frame header and a
receiver only after a header arrived, from separate pools (:func:`~.pools.pinned_pool`), so
the two sides never wait on each other in a cycle.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ...config import TcpConfig
from ...layout import KVLayout
from ...plan import TransferPlan
from .packer import Buffer, Packer
from .pools import cupy_module, pinned_pool

__all__ = ["GpuStreamSide", "HostStreamSide", "StreamSide", "chunk_bounds"]

_D2H, _H2D = 2, 1


class StreamSide:
    """One side of a plan's stream. Subclasses decide where the bytes live."""

    def __init__(self, plan: TransferPlan, side: str):
        t, off, ln = plan.runs(side)
        self.tensor = t
        self.offset = off
        self.length = ln
        self.pos = np.zeros(ln.size + 1, dtype=np.int64)
        np.cumsum(ln, out=self.pos[1:])
        self.nbytes = int(self.pos[-1])

    def run_range(self, a: int, b: int) -> tuple[int, int]:
        """Indices [i0, i1) of the runs that overlap stream bytes [a, b)."""
        i0 = int(np.searchsorted(self.pos, a, side="right")) - 1
        i1 = int(np.searchsorted(self.pos, b, side="left"))
        return max(i0, 0), i1

    def iov(self, a: int, b: int) -> np.ndarray:
        """``(n, 2)`` uint64 (address, length) runs covering stream bytes [a, b), in order."""
        raise NotImplementedError

    def before_send(self, a: int, b: int) -> None:
        """Make stream bytes [a, b) readable through :meth:`iov` (e.g. pack a GPU chunk)."""

    def after_send(self, a: int, b: int) -> None:
        """Stream bytes [a, b) have been handed to the transport; staging may be reused."""

    def after_receive(self, a: int, b: int) -> None:
        """Stream bytes [a, b) have arrived in :meth:`iov`; move them home (e.g. unpack)."""

    def finish(self) -> None:
        """Every byte of the stream has arrived; complete the destination (e.g. unpack)."""

    def close(self) -> None:
        """Release staging resources."""


class HostStreamSide(StreamSide):
    """A stream side over host memory: the runs point straight into the KV tensors."""

    def __init__(self, plan: TransferPlan, side: str, tensor_addrs: np.ndarray):
        super().__init__(plan, side)
        self._addr = tensor_addrs[self.tensor].astype(np.uint64) + self.offset.astype(np.uint64)

    def iov(self, a: int, b: int) -> np.ndarray:
        i0, i1 = self.run_range(a, b)
        out = np.empty((i1 - i0, 2), dtype=np.uint64)
        out[:, 0] = self._addr[i0:i1]
        out[:, 1] = self.length[i0:i1]
        head = a - int(self.pos[i0])
        out[0, 0] += np.uint64(head)
        out[0, 1] -= np.uint64(head)
        out[-1, 1] -= np.uint64(int(self.pos[i1]) - b)
        return out


class GpuStreamSide(StreamSide):
    """The stream of a plan over GPU-resident KV memory, packed on the GPU by a
    :class:`~.packer.Packer` and staged through pinned chunks (``config``: chunk and pool
    sizes, the wait for a free slot)."""

    def __init__(self, plan: TransferPlan, side: str, layout: KVLayout, config: TcpConfig):
        from ...ops import cuda as ops

        super().__init__(plan, side)
        cupy = cupy_module()
        self._cupy = cupy
        self._plan = plan
        self._dev = layout.device
        self._sending = side == "src"
        self._pool = pinned_pool(self._dev, "send" if self._sending else "recv", config.chunk_bytes,
                                 max(2, config.staging_bytes // config.chunk_bytes))
        self._timeout = config.request_wait
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        with cupy.cuda.Device(self._dev):
            self._packer = Packer(layout)  # a stream of this transfer's own
            stream = self._packer.stream
            # gather or scatter only after the work the caller queued on the cache so far
            stream.wait_event(ops.caller_ready_event(layout))
            with stream:
                arr = cupy.empty(max(plan.nbytes, 1), dtype=cupy.uint8)
            self._buf: Buffer | None = Buffer(arr, int(arr.data.ptr), int(arr.nbytes))
            self._packed: Any = None
            if self._sending and plan.nbytes:
                self._packed = self._packer.gather(plan, self._buf)

    @property
    def _base(self) -> int:
        assert self._buf is not None, "stream side used after close()"
        return self._buf.address

    # the tcp link calls these per chunk, from several threads
    def before_send(self, a: int, b: int) -> None:
        slot = self._pool.acquire(self._timeout)
        with self._lock:
            self._slots[a] = slot
        cupy = self._cupy
        with cupy.cuda.Device(self._dev):
            s = cupy.cuda.Stream(non_blocking=True)
            s.wait_event(self._packed)
            cupy.cuda.runtime.memcpyAsync(self._pool.addr(slot), self._base + a, b - a, _D2H, s.ptr)
            s.synchronize()

    def after_send(self, a: int, b: int) -> None:
        with self._lock:
            slot = self._slots.pop(a, None)
        if slot is not None:
            self._pool.release(slot)

    def iov(self, a: int, b: int) -> np.ndarray:
        with self._lock:
            slot = self._slots.get(a)
        if slot is None:  # receiving: take a slot now that the frame header has arrived
            slot = self._pool.acquire(self._timeout)
            with self._lock:
                self._slots[a] = slot
        return np.array([[self._pool.addr(slot), b - a]], dtype=np.uint64)

    def after_receive(self, a: int, b: int) -> None:
        cupy = self._cupy
        with self._lock:
            slot = self._slots.pop(a)
        try:
            with cupy.cuda.Device(self._dev):
                s = cupy.cuda.Stream(non_blocking=True)
                cupy.cuda.runtime.memcpyAsync(self._base + a, self._pool.addr(slot), b - a, _H2D, s.ptr)
                s.synchronize()
        finally:
            self._pool.release(slot)

    def finish(self) -> None:
        """Receiving: every chunk is on the GPU; scatter them into the KV blocks and wait."""
        if self._sending or not self._plan.nbytes:
            return
        assert self._buf is not None
        with self._cupy.cuda.Device(self._dev):
            self._packer.wait(self._packer.scatter(self._plan, self._buf))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots, self._slots = list(self._slots.values()), {}
        for s in slots:
            self._pool.release(s)
        self._buf = None


def chunk_bounds(side: StreamSide, chunk_bytes: int, max_runs: int) -> np.ndarray:
    """Stream offsets cutting the stream into chunks of at most ``chunk_bytes`` bytes and
    about ``max_runs`` runs each (so one chunk fits one sendmsg/recvmsg iovec)."""
    total = side.nbytes
    if total == 0:
        return np.zeros(1, dtype=np.int64)
    by_bytes = np.arange(0, total, chunk_bytes, dtype=np.int64)
    by_runs = side.pos[:-1][::max_runs]
    bounds = np.union1d(np.union1d(by_bytes, by_runs), [total])
    return bounds
