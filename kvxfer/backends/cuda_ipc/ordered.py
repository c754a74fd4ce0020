"""Finish queued GPU work in submission order, from whichever thread sees it complete first.

Layer: backends, cuda_ipc package, no CUDA import. Work queued on one CUDA stream completes
in order, so once a work item is complete, every earlier one is too. The completion thread
settles items as their events complete; a caller waiting on a handle may settle its own item
(and the earlier ones) as soon as it sees the event complete, saving two thread hand-offs on a
small transfer. Either way each item is finished exactly once and in order, so notifications
still reach the peer in the order the transfers were submitted.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["OrderedCompletion"]

W = TypeVar("W")


class OrderedCompletion(Generic[W]):
    """Pending work items of one stream, finished in order by :meth:`settle`.

    ``finish(item, error)`` runs under this object's lock, once per item, oldest first.
    """

    def __init__(self, finish: Callable[[W, object], None]):
        self._finish = finish
        self._pending: collections.deque[W] = collections.deque()
        self._ids: set[int] = set()  # id() of each pending item (alive while pending)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: W) -> None:
        """Queue ``item`` (in stream order: call in the order the work was enqueued)."""
        with self._lock:
            self._pending.append(item)
            self._ids.add(id(item))

    def pending(self, item: W) -> bool:
        """True while ``item`` is not finished."""
        with self._lock:
            return id(item) in self._ids

    def settle(self, item: W, error: object = None) -> bool:
        """``item`` is complete (with ``error``, or None): finish it and every earlier item.

        Earlier items completed before it on the same stream, so they finish without error
        unless ``error`` is a sticky device error, which they share. Returns False when
        ``item`` was already finished (by another thread).
        """
        with self._lock:
            if id(item) not in self._ids:
                return False
            while self._pending:
                head = self._pending.popleft()
                self._ids.discard(id(head))
                self._finish(head, error)
                if head is item:
                    return True
        return True  # pragma: no cover - the loop always meets item
