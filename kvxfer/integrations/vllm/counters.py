"""What a worker moved, per backend, in a plain dict that crosses vLLM's processes (no vLLM import).

Layer: engine integration. The worker side fills one :class:`TransferCounters` between stats
reports; :mod:`.stats` wraps its dict in vLLM's ``KVConnectorStats`` (summed across workers and
steps) and feeds it to Prometheus.

The dict: ``{"backends": {BACKEND: {COUNTER: n, ...}}, "seconds": [[BACKEND, s], ...]}``, with
the counters of :data:`COUNTERS` and one duration per finished transfer (loads and pushes).
``BACKEND`` is the data path that moved the bytes (``tcp``, ``cuda_ipc``, ``ucx``), or
``registry`` for a transfer that failed before any data path was chosen (never published,
cancelled, expired, refused by the compatibility check). A producer's sends in pull mode count
under the configured ``backend`` setting (possibly ``auto``): the consumer chose the path.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COUNTERS", "TransferCounters", "merge_counters"]

#: loads / load_bytes / load_failures: this side read (or was written) a request's group;
#: sends / send_failures: a request's group this side produced ended (consumed, or failed /
#: expired); expired: requests whose publication expired before every consumer came (once per
#: request); push_bytes: bytes this side wrote in push mode.
COUNTERS = ("loads", "load_bytes", "load_failures", "sends", "send_failures", "expired", "push_bytes")

_MAX_SECONDS = 4096  # durations kept per report (a histogram needs no more per interval)


class TransferCounters:
    """Counters per backend since the last report."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"backends": {}, "seconds": []}

    def add(self, backend: str, **counts: int) -> None:
        """Add ``counts`` (names of :data:`COUNTERS`) under ``backend``."""
        row = self.data["backends"].setdefault(backend or "unknown", dict.fromkeys(COUNTERS, 0))
        for k, v in counts.items():
            row[k] += v

    def time(self, backend: str, seconds: float) -> None:
        """One finished transfer's duration."""
        if len(self.data["seconds"]) < _MAX_SECONDS:
            self.data["seconds"].append([backend or "unknown", float(seconds)])

    def total(self, name: str) -> int:
        return sum(row[name] for row in self.data["backends"].values())

    def __bool__(self) -> bool:
        return bool(self.data["seconds"]) or any(any(r.values()) for r in self.data["backends"].values())


def merge_counters(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Sum ``other`` (a :class:`TransferCounters` dict) into ``into``; returns ``into``."""
    backends = into.setdefault("backends", {})
    for name, row in (other.get("backends") or {}).items():
        mine = backends.setdefault(name, dict.fromkeys(COUNTERS, 0))
        for k in COUNTERS:
            mine[k] = mine.get(k, 0) + int(row.get(k, 0))
    seconds = into.setdefault("seconds", [])
    seconds.extend([str(b), float(s)] for b, s in (other.get("seconds") or [])[: max(0, _MAX_SECONDS - len(seconds))])
    return into
