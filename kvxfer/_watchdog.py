"""Deadline watchdog: fails transfer handles that outlive their deadline.

Layer: connector internals. One thread sleeps until the earliest deadline (no polling); it is
woken only when a new deadline comes before every pending one. Entries of handles that finished
(or were dropped) are purged whenever the heap doubles, so a busy connector with long timeouts
holds about as many entries as transfers in flight, not as many as it started in a timeout.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import weakref

from .errors import TransferTimeoutError
from .handle import TransferHandle

__all__ = ["Watchdog"]


_COMPACT_MIN = 1024  # never purge a heap smaller than this


class Watchdog:
    def __init__(self, name: str):
        self._heap: list[tuple[float, int, weakref.ref[TransferHandle]]] = []
        self._compact_at = _COMPACT_MIN
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kvxfer-watchdog-{name}", daemon=True)
        self._thread.start()

    def add(self, handle: TransferHandle, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            if len(self._heap) >= self._compact_at:
                self._purge()
            first = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._seq), weakref.ref(handle)))
            if first:  # the thread sleeps until the old head's deadline otherwise: let it be
                self._cond.notify()

    def _purge(self) -> None:
        """Drop entries whose handle finished or is gone (caller holds the lock)."""
        live = [e for e in self._heap if (h := e[2]()) is not None and not h.done()]
        heapq.heapify(live)
        self._heap = live
        self._compact_at = max(_COMPACT_MIN, 2 * len(live))

    def __len__(self) -> int:
        """Entries held (pending deadlines, plus finished ones not purged yet)."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(None if not self._heap else self._heap[0][0] - now)
                if self._closed:
                    return
                _, _, ref = heapq.heappop(self._heap)
            h = ref()
            if h is not None and not h.done():
                h.set_failed(TransferTimeoutError(
                    f"{h.op.value} of {h.nbytes} B with {h.peer_name!r} via {h.backend} timed out"
                ))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
