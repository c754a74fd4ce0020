"""Metrics: kvxfer's own counters and duration histogram, per backend, peer and direction.

Layer: connector internals plus a read-only public view. The Connector gives every handle it
returns from ``read``/``write`` (a :class:`CountedHandle`) the counters of its (backend, peer);
the handle counts itself once, when it finishes (``TransferHandle._finished``), on whatever
thread finishes it. So
every backend is counted by the same code, and the hot path is one lock and a few integer adds.

What is counted, per (backend, peer name, op), on the side that called ``read``/``write``:

- ``transfers``, ``bytes``, ``seconds``: transfers that completed, the bytes they moved, the sum
  of their durations (handle created to completion, as ``TransferHandle.stats.seconds``), and a
  histogram of those durations over :data:`DURATION_BUCKETS`.
- ``failures``: failed transfers by kind, the class name of the :class:`~kvxfer.KvxferError`
  that failed the handle (``PeerLostError``, ``TransferTimeoutError``, ``BlockIdError``,
  ``RemoteTransferError``, ...). Integrity failures are the kind :data:`INTEGRITY_KIND`.
  Bytes of failed transfers are not counted.
- ``cancels``: transfers that ended cancelled (neither done nor failed).

A call to ``read``/``write`` that raises returns no handle and is not counted. The requests of
``pull``/``push`` are counted through the transfers they make. Counters are cumulative for the
connector's lifetime and never reset; a peer that disconnects keeps its series (a counter must
not go back to zero under a scraper). Rates and per-interval figures are the caller's diffs of
two snapshots.

``prometheus_client`` is optional (``pip install kvxfer[metrics]``) and imported only by
:func:`register_prometheus`.
"""

from __future__ import annotations

import logging
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from .errors import ConfigError
from .handle import Op, TransferHandle, TransferStatus

__all__ = [
    "DURATION_BUCKETS",
    "INTEGRITY_KIND",
    "MetricsSnapshot",
    "SeriesMetrics",
    "register_prometheus",
]

DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
"""Upper bounds in seconds of the transfer-duration histogram's buckets (100 µs to 30 s; a
last bucket, +Inf, holds the rest). A duration ``s`` falls in the first bucket with ``s <= bound``,
as Prometheus' ``le`` label reads."""

INTEGRITY_KIND = "IntegrityError"
"""The failure kind counted when a transfer's integrity check fails."""

log = logging.getLogger(__name__)
_NBUCKETS = len(DURATION_BUCKETS) + 1


@dataclass(frozen=True, slots=True)
class SeriesMetrics:
    """Cumulative figures of one (backend, peer, op) series.

    ``buckets`` holds the count of completed transfers per duration bucket (not cumulative),
    one per :data:`DURATION_BUCKETS` bound plus a last one for longer transfers.
    ``failures`` maps a failure kind (error class name) to its count.
    """

    backend: str
    peer: str
    op: Op
    transfers: int
    bytes: int
    seconds: float
    buckets: tuple[int, ...]
    failures: Mapping[str, int]
    cancels: int

    @property
    def failed(self) -> int:
        """Failures of every kind."""
        return sum(self.failures.values())

    @property
    def integrity_failures(self) -> int:
        """Failures of kind :data:`INTEGRITY_KIND`."""
        return self.failures.get(INTEGRITY_KIND, 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``op`` as its string)."""
        return {
            "backend": self.backend, "peer": self.peer, "op": self.op.value,
            "transfers": self.transfers, "bytes": self.bytes, "seconds": self.seconds,
            "buckets": list(self.buckets), "failures": dict(self.failures), "cancels": self.cancels,
        }


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """A consistent copy of a connector's metrics (:meth:`Connector.metrics`).

    Cumulative since the connector was made; subtract two snapshots for an interval. ``series``
    holds one entry per (backend, peer, op) that finished at least one transfer, sorted.
    """

    bucket_bounds: tuple[float, ...]
    series: tuple[SeriesMetrics, ...]

    def get(self, backend: str, peer: str, op: Op) -> SeriesMetrics | None:
        """The series of ``backend``, ``peer`` and ``op``, or None if it has finished nothing."""
        for s in self.series:
            if s.backend == backend and s.peer == peer and s.op is op:
                return s
        return None

    def select(self, *, backend: str | None = None, peer: str | None = None, op: Op | None = None) -> Iterator[SeriesMetrics]:
        """The series matching every filter given."""
        for s in self.series:
            if (backend is None or s.backend == backend) and (peer is None or s.peer == peer) and (op is None or s.op is op):
                yield s

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: ``{"bucket_bounds": [...], "series": [...]}``."""
        return {"bucket_bounds": list(self.bucket_bounds), "series": [s.to_dict() for s in self.series]}


class _Row:
    """Mutable figures of one op of one (backend, peer); guarded by the Metrics lock."""

    __slots__ = ("transfers", "bytes", "seconds", "buckets", "failures", "cancels")

    def __init__(self) -> None:
        self.transfers = 0
        self.bytes = 0
        self.seconds = 0.0
        self.buckets = [0] * _NBUCKETS
        self.failures: dict[str, int] = {}
        self.cancels = 0


class PeerCounters:
    """The counters of one (backend, peer name); handles of that peer record into it.

    Internal: the Connector hands these out; callers read :class:`MetricsSnapshot`.
    """

    __slots__ = ("backend", "peer", "_lock", "_read", "_write")

    def __init__(self, backend: str, peer: str, lock: threading.Lock):
        self.backend = backend
        self.peer = peer
        self._lock = lock
        self._read = _Row()
        self._write = _Row()

    def record(self, h: TransferHandle) -> None:
        """Count ``h``, which has just finished (called once, by the handle)."""
        row = self._read if h.op is Op.READ else self._write
        status = h._status
        lock = self._lock  # acquire/release: about half the cost of ``with`` on CPython 3.11
        if status is TransferStatus.DONE:
            s = h._t1 - h._t0  # type: ignore[operator]  # set before the handle records
            i = bisect_left(DURATION_BUCKETS, s)
            lock.acquire()
            try:
                row.transfers += 1
                row.bytes += h.nbytes
                row.seconds += s
                row.buckets[i] += 1
            finally:
                lock.release()
        elif status is TransferStatus.FAILED:
            kind = type(h._exc).__name__
            with lock:
                row.failures[kind] = row.failures.get(kind, 0) + 1
        else:  # cancelled
            with lock:
                row.cancels += 1


class CountedHandle(TransferHandle):
    """The handle ``Connector.read``/``write`` return: a :class:`TransferHandle` that counts
    itself in its peer's counters once, when it finishes."""

    __slots__ = ("_counters",)

    def __init__(self, op: Op, peer_name: str, nbytes: int, backend: str, dst_blocks: Any, counters: PeerCounters):
        super().__init__(op, peer_name, nbytes, backend, dst_blocks)
        self._counters = counters

    def _finished(self) -> None:
        try:
            self._counters.record(self)
        except Exception:  # a metrics bug must not keep waiters from waking
            log.exception("recording the metrics of %r", self)


class Metrics:
    """A connector's counters, by (backend, peer name). Internal; see :meth:`snapshot`."""

    __slots__ = ("_lock", "_peers")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: dict[tuple[str, str], PeerCounters] = {}

    def counters(self, backend: str, peer: str) -> PeerCounters:
        """The counters of (``backend``, ``peer``), made on first use (once per connect)."""
        with self._lock:
            c = self._peers.get((backend, peer))
            if c is None:
                c = self._peers[(backend, peer)] = PeerCounters(backend, peer, self._lock)
            return c

    def snapshot(self) -> MetricsSnapshot:
        out = []
        with self._lock:
            for (backend, peer), c in sorted(self._peers.items()):
                for op, row in ((Op.READ, c._read), (Op.WRITE, c._write)):
                    if row.transfers or row.failures or row.cancels:
                        out.append(SeriesMetrics(backend, peer, op, row.transfers, row.bytes, row.seconds,
                                                 tuple(row.buckets), MappingProxyType(dict(row.failures)), row.cancels))
        return MetricsSnapshot(DURATION_BUCKETS, tuple(out))


# -- Prometheus ------------------------------------------------------------------------------

class HasMetrics(Protocol):
    """What :func:`register_prometheus` reads: a :class:`~kvxfer.Connector`, or anything with
    its ``metrics()``."""

    def metrics(self) -> MetricsSnapshot: ...


def _prometheus_collector(source: Any, prefix: str) -> Any:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    labels = ["backend", "peer", "op"]

    class KvxferCollector:
        """Reads the connector's snapshot at each scrape: no Prometheus work on the hot path."""

        def describe(self) -> list:
            """The families without samples, so that the registry refuses a name clash."""
            return list(self._families())

        def _families(self) -> tuple:
            transfers = CounterMetricFamily(f"{prefix}_transfers", "Transfers completed", labels=labels)
            nbytes = CounterMetricFamily(f"{prefix}_transfer_bytes", "Bytes moved by completed transfers", labels=labels)
            failures = CounterMetricFamily(f"{prefix}_transfer_failures", "Failed transfers, by error class",
                                           labels=[*labels, "kind"])
            cancels = CounterMetricFamily(f"{prefix}_transfer_cancels", "Cancelled transfers", labels=labels)
            seconds = HistogramMetricFamily(f"{prefix}_transfer_seconds", "Durations of completed transfers",
                                            labels=labels)
            return transfers, nbytes, seconds, failures, cancels

        def collect(self) -> Iterator[Any]:
            metrics = source()  # a closed or collected connector yields empty families
            snap = metrics() if metrics is not None else MetricsSnapshot(DURATION_BUCKETS, ())
            transfers, nbytes, seconds, failures, cancels = families = self._families()
            bounds = [floatToGoString(b) for b in snap.bucket_bounds] + ["+Inf"]
            for s in snap.series:
                lv = [s.backend, s.peer, s.op.value]
                transfers.add_metric(lv, s.transfers)
                nbytes.add_metric(lv, s.bytes)
                cancels.add_metric(lv, s.cancels)
                for kind, n in sorted(s.failures.items()):
                    failures.add_metric([*lv, kind], n)
                cum, acc = [], 0
                for b, n in zip(bounds, s.buckets):
                    acc += n
                    cum.append((b, acc))
                seconds.add_metric(lv, cum, s.seconds)
            yield from families

    return KvxferCollector()


def register_prometheus(connector: HasMetrics, registry: Any = None, prefix: str = "kvxfer") -> Any:
    """Expose ``connector``'s metrics to Prometheus through a custom collector.

    The collector holds the connector weakly: a connector that is gone scrapes as no series.

    Registers a collector on ``registry`` (default: ``prometheus_client.REGISTRY``) that reads
    :meth:`Connector.metrics` at each scrape. Families, with labels ``backend``, ``peer``,
    ``op`` (and ``kind`` on failures): ``{prefix}_transfers_total``,
    ``{prefix}_transfer_bytes_total``, ``{prefix}_transfer_seconds`` (a histogram over
    :data:`DURATION_BUCKETS`), ``{prefix}_transfer_failures_total``,
    ``{prefix}_transfer_cancels_total``. Returns the collector (``registry.unregister`` it to
    stop). Two connectors on one registry need distinct prefixes (or registries).

    Raises:
        ValueError: ``registry`` already holds these metric names (prometheus_client's error).
        ConfigError: ``prefix`` is not a valid metric name prefix.
        BackendUnavailableError: ``prometheus_client`` is not installed (``kvxfer[metrics]``).
    """
    import re

    from .errors import BackendUnavailableError

    if not isinstance(prefix, str) or not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", prefix):
        raise ConfigError(f"prefix {prefix!r} is not a Prometheus metric name prefix; expected [a-zA-Z_:][a-zA-Z0-9_:]*")
    try:
        import prometheus_client
    except ImportError:
        raise BackendUnavailableError("prometheus_client is not installed; pip install 'kvxfer[metrics]'") from None
    collector = _prometheus_collector(weakref.WeakMethod(connector.metrics), prefix)
    (registry if registry is not None else prometheus_client.REGISTRY).register(collector)
    return collector
