"""Transfer statistics in vLLM's connector-stats form (``KVConnectorStats``).

Layer: engine integration. Workers return one :class:`KvxferStats` per step that moved
something; vLLM aggregates them across workers and steps and logs :meth:`reduce` as
"KV Transfer metrics: ...". The payload is a flat dict of numbers, serializable as vLLM needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from .worker import TransferCounters

__all__ = ["KvxferStats"]

_FIELDS = tuple(TransferCounters.__slots__)


@dataclass
class KvxferStats(KVConnectorStats):
    """Counters summed over workers and steps (keys of :class:`~.worker.TransferCounters`)."""

    def __post_init__(self) -> None:
        self.data = {k: self.data.get(k, 0) for k in _FIELDS}

    def reset(self) -> None:
        self.data = {k: 0 for k in _FIELDS}

    def aggregate(self, other: KVConnectorStats) -> KvxferStats:
        if other is not None and not other.is_empty():
            for k in _FIELDS:
                self.data[k] += other.data.get(k, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        load_s = d["load_seconds"]
        push_s = d["push_seconds"]
        return {
            "transfers": d["loads"] + d["sends"],
            "failures": d["load_failures"] + d["send_failures"],
            "MB loaded": round(d["load_bytes"] / 1e6, 3),
            "load GB/s": round(d["load_bytes"] / load_s / 1e9, 3) if load_s > 0 else 0.0,
            "MB pushed": round(d["push_bytes"] / 1e6, 3),
            "push GB/s": round(d["push_bytes"] / push_s / 1e9, 3) if push_s > 0 else 0.0,
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in _FIELDS)

    @classmethod
    def from_counters(cls, counters: TransferCounters) -> KvxferStats:
        return cls(data=counters.as_dict())

    @classmethod
    def from_data(cls, data: dict[str, Any] | None) -> KvxferStats:
        return cls(data=dict(data or {}))
