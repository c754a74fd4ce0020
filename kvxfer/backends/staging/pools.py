"""Buffer pools for staging: pinned host slots, and contiguous buffers by size class.

Layer: backends, shared staging. Nothing here imports CuPy until a pool allocates GPU or
pinned memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from ..._tensors import MemoryKind
from ...errors import BackendUnavailableError, TransportError

__all__ = ["PinnedPool", "SizePool", "alloc_buffer", "cupy_module", "pinned_pool", "size_class"]


def cupy_module() -> Any:
    """The cupy module. Raises BackendUnavailableError when it is not installed."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"staging GPU memory needs CuPy: {exc}") from None
    return cupy


class PinnedPool:
    """Fixed-size pinned host slots, handed out and returned under a condition variable."""

    def __init__(self, slot_bytes: int, slots: int):
        cupy = cupy_module()
        self.slot_bytes = slot_bytes
        self._mem = cupy.cuda.alloc_pinned_memory(slot_bytes * slots)
        self._base = int(self._mem.ptr)
        self._free = list(range(slots))
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> int:
        """A free slot's index, waiting up to ``timeout`` s.

        Raises:
            TransportError: none came free in time.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=timeout):
                raise TransportError(f"no pinned staging slot free within {timeout} s")
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def addr(self, slot: int) -> int:
        """The host address of ``slot``'s first byte."""
        return self._base + slot * self.slot_bytes


_pinned: dict[tuple[int, str], PinnedPool] = {}
_pinned_lock = threading.Lock()


def pinned_pool(device: int, direction: str, slot_bytes: int, slots: int) -> PinnedPool:
    """The process's pinned pool for ``direction`` ("send" or "recv") on ``device``, made on
    first use with ``slots`` slots of ``slot_bytes``. One pool per direction, so that a sender
    (which takes its slot before sending a frame header) and a receiver (after a header
    arrived) never wait on each other in a cycle."""
    key = (device, direction)
    with _pinned_lock:
        p = _pinned.get(key)
        if p is None:
            with cupy_module().cuda.Device(device):
                p = _pinned[key] = PinnedPool(slot_bytes, slots)
        return p


def size_class(nbytes: int) -> int:
    """The buffer size that serves ``nbytes``: a power of two, at least 4 KiB."""
    return 1 << max(12, (max(nbytes, 1) - 1).bit_length())


def alloc_buffer(memory: MemoryKind, device: int, nbytes: int) -> tuple[Any, int]:
    """(array, address) of ``nbytes`` fresh contiguous bytes: a numpy array in host memory, a
    CuPy array on ``device`` in GPU memory."""
    if memory is MemoryKind.HOST:
        arr = np.empty(nbytes, dtype=np.uint8)
        return arr, int(arr.ctypes.data)
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        arr = cupy.empty(nbytes, dtype=cupy.uint8)
    return arr, int(arr.data.ptr)


class _Sized(Protocol):
    nbytes: int


B = TypeVar("B", bound=_Sized)


class SizePool(Generic[B]):
    """Contiguous buffers reused by size class (:func:`size_class`). ``make(size)`` creates one
    of ``size`` bytes (allocating and, say, registering it), ``free(b)`` releases one; at most
    ``keep`` free buffers are kept."""

    def __init__(self, make: Callable[[int], B], free: Callable[[B], None], keep: int):
        self._make, self._release, self._keep = make, free, keep
        self._free: list[B] = []
        self._held: list[B] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> B:
        """A buffer of at least ``nbytes``: a free one of its size class, else a new one."""
        size = size_class(nbytes)
        with self._lock:
            for i, b in enumerate(self._free):
                if b.nbytes == size:
                    return self._free.pop(i)
        return self._make(size)

    def put(self, b: B) -> None:
        """Give ``b`` back: kept for reuse, or released when ``keep`` are kept already."""
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(b)
                return
        self._release(b)

    def hold(self, b: B) -> None:
        """Keep ``b`` allocated, never reused, until :meth:`close`: a buffer of a transfer cut
        off by its link's close, which the peer (or an RMA of ours still in flight) may yet
        write. Freed, its memory would go back to the allocator while still registered."""
        with self._lock:
            self._held.append(b)

    @property
    def held(self) -> tuple[B, ...]:
        """The buffers :meth:`hold` keeps."""
        with self._lock:
            return tuple(self._held)

    def close(self) -> None:
        """Release every free and held buffer."""
        with self._lock:
            done, self._free, self._held = self._free + self._held, [], []
        for b in done:
            self._release(b)
