"""GPU memory over host transports: pack on the GPU, stage through pinned host chunks.

Layer: backends (used by tcp, and by ucx for its host path). Sending: one gather launch packs
the whole transfer into a device buffer in stream order; each chunk is then copied down into a
pinned slot just before its socket send, so chunks on different connections overlap PCIe and
the socket. Receiving: each chunk lands in a pinned slot, is copied up into the device buffer,
and one scatter launch places every block once all chunks are in. Slots come from two pinned
pools per device (send, receive); a sender takes its slot before it sends a frame header and a
receiver only after a header arrived, so the two sides can never wait on each other in a cycle.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..config import TcpConfig
from ..errors import BackendUnavailableError, TransportError
from ..layout import KVLayout
from ..plan import TransferPlan
from .stream import StreamSide

__all__ = ["GpuStreamSide", "PinnedPool"]

_D2H, _H2D = 2, 1


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"GPU memory over TCP needs CuPy: {exc}") from None
    return cupy


class PinnedPool:
    """Fixed-size pinned host slots, handed out and returned under a condition variable."""

    def __init__(self, slot_bytes: int, slots: int):
        cupy = _cupy()
        self.slot_bytes = slot_bytes
        self._mem = cupy.cuda.alloc_pinned_memory(slot_bytes * slots)
        self._base = int(self._mem.ptr)
        self._free = list(range(slots))
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=timeout):
                raise TransportError(f"no pinned staging slot free within {timeout} s")
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def addr(self, slot: int) -> int:
        return self._base + slot * self.slot_bytes


_pools: dict[tuple[int, str], PinnedPool] = {}
_pools_lock = threading.Lock()


def _pool(device: int, direction: str, config: TcpConfig) -> PinnedPool:
    key = (device, direction)
    with _pools_lock:
        p = _pools.get(key)
        if p is None:
            with _cupy().cuda.Device(device):
                p = _pools[key] = PinnedPool(config.chunk_bytes, max(2, config.staging_bytes // config.chunk_bytes))
        return p


class GpuStreamSide(StreamSide):
    """The stream of a plan over GPU-resident KV memory, staged through pinned chunks."""

    def __init__(self, plan: TransferPlan, side: str, layout: KVLayout, config: TcpConfig):
        from ..ops import cuda as ops

        super().__init__(plan, side)
        cupy = _cupy()
        self._cupy = cupy
        self._ops = ops
        self._plan = plan
        self._layout = layout
        self._dev = layout.device
        self._sending = side == "src"
        self._pool = _pool(self._dev, "send" if self._sending else "recv", config)
        self._timeout = config.request_wait
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        with cupy.cuda.Device(self._dev):
            self._stream = cupy.cuda.Stream(non_blocking=True)
            # gather or scatter only after the work the caller queued on the cache so far
            self._stream.wait_event(ops.caller_ready_event(layout))
            with self._stream:
                self._buf = cupy.empty(max(plan.nbytes, 1), dtype=cupy.uint8)
            if self._sending and plan.nbytes:
                ops.gather(plan, layout, int(self._buf.data.ptr), stream=self._stream.ptr, device=self._dev)
                self._packed = cupy.cuda.Event(disable_timing=True)
                self._packed.record(self._stream)

    # the tcp link calls these per chunk, from several threads
    def before_send(self, a: int, b: int) -> None:
        slot = self._pool.acquire(self._timeout)
        with self._lock:
            self._slots[a] = slot
        cupy = self._cupy
        with cupy.cuda.Device(self._dev):
            s = cupy.cuda.Stream(non_blocking=True)
            s.wait_event(self._packed)
            cupy.cuda.runtime.memcpyAsync(self._pool.addr(slot), int(self._buf.data.ptr) + a, b - a, _D2H, s.ptr)
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
                cupy.cuda.runtime.memcpyAsync(int(self._buf.data.ptr) + a, self._pool.addr(slot), b - a, _H2D, s.ptr)
                s.synchronize()
        finally:
            self._pool.release(slot)

    def finish(self) -> None:
        """Receiving: every chunk is on the GPU; scatter them into the KV blocks and wait."""
        if self._sending or not self._plan.nbytes:
            return
        with self._cupy.cuda.Device(self._dev):
            self._ops.scatter(self._plan, int(self._buf.data.ptr), self._layout, stream=self._stream.ptr, device=self._dev)
            self._stream.synchronize()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots, self._slots = list(self._slots.values()), {}
        for s in slots:
            self._pool.release(s)
        self._buf = None
