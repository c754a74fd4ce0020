"""Deadline watchdog: fails transfer handles that outlive their deadline.

Layer: connector internals. One thread sleeps until the earliest deadline (no polling).
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


class Watchdog:
    def __init__(self, name: str):
        self._heap: list[tuple[float, int, weakref.ref[TransferHandle]]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kvxfer-watchdog-{name}", daemon=True)
        self._thread.start()

    def add(self, handle: TransferHandle, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._seq), weakref.ref(handle)))
            self._cond.notify()

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
