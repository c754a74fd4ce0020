"""Transfer statistics in vLLM's connector-stats form (``KVConnectorStats``) and Prometheus.

Layer: engine integration. Workers return one :class:`KvxferStats` per step that moved
something; vLLM aggregates them across workers and steps (:meth:`KvxferStats.aggregate`), logs
:meth:`KvxferStats.reduce` as "KV Transfer metrics: ...", and hands the aggregated dict to
:class:`KvxferPromMetrics` (built by the connector's ``build_prom_metrics``), which records,
labelled per backend: ``vllm:kvxfer_transfer_time_seconds`` (histogram), and the counters
``vllm:kvxfer_bytes_total``, ``vllm:kvxfer_transfers_total``, ``vllm:kvxfer_failures_total``,
``vllm:kvxfer_expired_requests_total``. The payload is a dict of lists and numbers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from .counters import COUNTERS, TransferCounters, merge_counters

__all__ = ["KvxferPromMetrics", "KvxferStats"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class KvxferStats(KVConnectorStats):
    """Counters per backend summed over workers and steps (see :mod:`.counters`)."""

    def __post_init__(self) -> None:
        self.data = merge_counters({"backends": {}, "seconds": []}, self.data or {})

    def reset(self) -> None:
        self.data = {"backends": {}, "seconds": []}

    def aggregate(self, other: KVConnectorStats) -> KvxferStats:
        if other is not None and not other.is_empty():
            merge_counters(self.data, other.data)
        return self

    def _total(self, name: str) -> int:
        return sum(row.get(name, 0) for row in self.data["backends"].values())

    def reduce(self) -> dict[str, int | float]:
        t = {k: self._total(k) for k in COUNTERS}
        seconds = [s for _, s in self.data["seconds"]]
        return {
            "transfers": t["loads"] + t["sends"],
            "failures": t["load_failures"] + t["send_failures"],
            "expired": t["expired"],
            "MB loaded": round(t["load_bytes"] / 1e6, 3),
            "MB pushed": round(t["push_bytes"] / 1e6, 3),
            "mean transfer ms": round(1e3 * sum(seconds) / len(seconds), 3) if seconds else 0.0,
            "backends": ",".join(sorted(self.data["backends"])),
        }

    def is_empty(self) -> bool:
        return not self.data["seconds"] and not any(any(r.values()) for r in self.data["backends"].values())

    @classmethod
    def from_counters(cls, counters: TransferCounters) -> KvxferStats:
        return cls(data=copy.deepcopy(counters.data))

    @classmethod
    def from_data(cls, data: dict[str, Any] | None) -> KvxferStats:
        return cls(data=copy.deepcopy(dict(data or {})))


class KvxferPromMetrics(KVConnectorPromMetrics):
    """kvxfer's Prometheus metrics, each with vLLM's per-engine labels plus ``backend``."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        names = [*labelnames, "backend"]
        self.time = self._histogram_cls(
            name="vllm:kvxfer_transfer_time_seconds", labelnames=names, buckets=list(_BUCKETS),
            documentation="Duration of kvxfer KV transfers (a request's KV-cache group, load or push).")
        self.bytes = self._counter_cls(name="vllm:kvxfer_bytes", labelnames=names,
                                       documentation="Bytes kvxfer loaded or pushed.")
        self.transfers = self._counter_cls(name="vllm:kvxfer_transfers", labelnames=names,
                                           documentation="kvxfer transfers that ended (loads and sends).")
        self.failures = self._counter_cls(name="vllm:kvxfer_failures", labelnames=names,
                                          documentation="kvxfer transfers that failed (loads and sends).")
        self.expired = self._counter_cls(name="vllm:kvxfer_expired_requests", labelnames=names,
                                         documentation="Requests whose published KV expired before a consumer read it.")

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [str(v) for v in self.per_engine_labelvalues[engine_idx]]
        for backend, row in (transfer_stats_data.get("backends") or {}).items():
            lv = [*labels, str(backend)]
            get = row.get
            self.bytes.labels(*lv).inc(get("load_bytes", 0) + get("push_bytes", 0))
            self.transfers.labels(*lv).inc(get("loads", 0) + get("sends", 0))
            self.failures.labels(*lv).inc(get("load_failures", 0) + get("send_failures", 0))
            self.expired.labels(*lv).inc(get("expired", 0))
        for backend, seconds in transfer_stats_data.get("seconds") or []:
            self.time.labels(*labels, str(backend)).observe(float(seconds))
