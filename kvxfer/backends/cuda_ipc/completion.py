"""The thread that finishes one stream's queued work in order, without waking for driven items.

Layer: backends, cuda_ipc package, no CUDA import: the device calls are passed in.

Every item is first added to an :class:`~kvxfer.backends.cuda_ipc.ordered.OrderedCompletion`
in stream order, then submitted here. An *eager* item wakes the thread, which blocks until it
is complete (``sync``) and settles it. A *driven* item is a small transfer whose caller is
expected to wait on its handle and settle it on its own thread; waking this thread for it
would only cost the caller GIL hand-offs while its copy runs. Driven items are swept instead:
while any is outstanding the thread wakes every ``sweep_s``, settles those already complete
(``query``), and blocks on one that was :meth:`kick`-ed (its caller stopped driving, or a done
callback relies on this thread) or is older than ``max_age_s``. After the last driven item it
keeps sweeping for ``linger_s`` (a burst of small transfers does not wake it each time), then
sleeps until the next submission.

Each item is released (``release``) exactly once, by this thread, after it is settled.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from .ordered import OrderedCompletion

__all__ = ["CompletionThread"]

W = TypeVar("W")

_TICK = object()  # wakes the thread for a sweep


class CompletionThread(Generic[W]):
    """Finishes the items of ``order`` (see the module docstring).

    Args:
        order: the items' :class:`OrderedCompletion` (each item is added there first).
        sync: blocks until ``item`` is complete; returns the error to settle it with, or None.
        query: True once ``item`` is complete (or failed: ``sync`` then reports the error).
        release: frees an item's resources once it is settled.
        name: the thread's name.
        setup: run first on the thread (selecting its device).
    """

    def __init__(self, order: OrderedCompletion[W], *, sync: Callable[[W], object], query: Callable[[W], bool],
                 release: Callable[[W], None], name: str, setup: Callable[[], None] | None = None,
                 sweep_s: float = 1e-3, linger_s: float = 0.02, max_age_s: float = 0.05):
        self._order, self._sync, self._query, self._release, self._setup = order, sync, query, release, setup
        self._sweep_s, self._linger_s, self._max_age_s = sweep_s, linger_s, max_age_s
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._driven: collections.deque[list] = collections.deque()  # [item, submitted at, kicked]
        self._by_id: dict[int, list] = {}
        self._idle = False  # blocked without a timeout: a driven submission must wake it
        self._linger_until = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: W, *, driven: bool = False) -> None:
        """Hand ``item`` (already added to the order) over; a driven item wakes nobody."""
        if not driven:
            self._queue.put(item)
            return
        now = time.perf_counter()
        entry = [item, now, False]
        with self._lock:
            self._driven.append(entry)
            self._by_id[id(item)] = entry
            self._linger_until = now + self._linger_s
            wake, self._idle = self._idle, False
        if wake:
            self._queue.put(_TICK)

    def kick(self, item: W) -> None:
        """Nobody drives driven ``item`` any more: block on it at the next sweep, now."""
        with self._lock:
            entry = self._by_id.get(id(item))
            if entry is None:
                return
            entry[2] = True
        self._queue.put(_TICK)

    def close(self, timeout: float) -> bool:
        """Finish every outstanding item (blocking on each) and stop; False when the thread
        is still blocked after ``timeout`` seconds."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        if self._setup is not None:
            self._setup()
        while True:
            try:
                item = self._queue.get(timeout=self._wait_s())
            except queue.Empty:
                item = _TICK
            if item is None:
                break
            if item is not _TICK:
                self._order.settle(item, self._sync(item))  # no-op when settled already
                self._release(item)
            self._sweep(drain=False)
        self._sweep(drain=True)

    def _wait_s(self) -> float | None:
        with self._lock:
            if self._driven or time.perf_counter() < self._linger_until:
                return self._sweep_s
            self._idle = True
            return None

    def _sweep(self, *, drain: bool) -> None:
        """Settle driven items from the oldest on, while they are complete (or must be waited for)."""
        while True:
            with self._lock:
                if not self._driven:
                    return
                item, t0, kicked = self._driven[0]
            if self._order.pending(item):
                must_wait = drain or kicked or time.perf_counter() - t0 > self._max_age_s
                if not (must_wait or self._query(item)):
                    return  # later items were queued after it on the same stream: not done either
                self._order.settle(item, self._sync(item))
            with self._lock:
                self._driven.popleft()
                del self._by_id[id(item)]
            self._release(item)
