"""A small memo keyed by objects' identity, for per-transfer caches of derived data.

Layer: library internals, no dependencies. Planning derives data from long-lived objects (a
layout pair's segment-pair array, a peer's geometry) on every transfer; comparing those objects
by value costs more than the derivation saves, so entries are found by ``id()``. Each entry
holds its objects, so an id cannot be reused by another object while the entry lives.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["IdentityMemo"]

V = TypeVar("V")


class IdentityMemo(Generic[V]):
    """``get(objs, extra, make)``: ``make()`` once per (identity of each of ``objs``, ``extra``);
    the whole memo is dropped when it reaches ``maxsize`` entries (few distinct keys recur)."""

    def __init__(self, maxsize: int = 256):
        self._max = maxsize
        self._entries: dict[tuple, tuple[tuple, V]] = {}

    def get(self, objs: tuple, extra: Hashable, make: Callable[[], V]) -> V:
        # an entry keeps its objects alive, so no other object can carry their ids meanwhile:
        # a key match is an identity match
        key = (tuple(map(id, objs)), extra)
        hit = self._entries.get(key)
        if hit is not None:
            return hit[1]
        value = make()
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[key] = (objs, value)
        return value

    def clear(self) -> None:
        self._entries.clear()
