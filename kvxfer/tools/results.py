"""What a benchmark point produced: timings, baselines and their ratio, as frozen dataclasses.

Layer: tools. Pure data plus the statistics that turn latency samples into figures; the
report module renders these, the runner produces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from .._tensors import MemoryKind
from ..backends.base import BackendKind
from ..handle import Op
from .workloads import Workload

__all__ = ["BaselineKind", "Timing", "BaselineResult", "PointResult"]


class BaselineKind(Enum):
    """The ceilings a kvxfer figure is compared with, each measured in the same run."""

    RAW_TCP = "raw_tcp"  # the same bytes over the same number of plain sockets, big sendall/recv_into
    DEVICE_MEMCPY = "device_memcpy"  # one contiguous copy on one GPU
    PEER_MEMCPY = "peer_memcpy"  # one contiguous copy between two GPUs
    NIXL = "nixl"  # NIXL over UCX on the same blocks, one descriptor per piece


@dataclass(frozen=True, slots=True)
class Timing:
    """Latency samples of one measured operation (seconds) and the bytes each moved."""

    nbytes: int
    samples: tuple[float, ...]

    @classmethod
    def of(cls, nbytes: int, samples: list[float] | tuple[float, ...]) -> Timing:
        if not samples:
            raise ValueError("a timing needs at least one sample")
        return cls(nbytes, tuple(float(s) for s in samples))

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.samples, 99))

    @property
    def min(self) -> float:
        return float(min(self.samples))

    @property
    def gbps(self) -> float:
        """Payload GB/s (1e9 bytes) at the median latency."""
        return self.nbytes / self.p50 / 1e9

    @property
    def gbps_mean(self) -> float:
        """Payload GB/s over all samples together."""
        return self.nbytes * len(self.samples) / sum(self.samples) / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "nbytes": self.nbytes,
            "gbps": self.gbps,
            "gbps_mean": self.gbps_mean,
            "latency_p50_s": self.p50,
            "latency_p99_s": self.p99,
            "latency_min_s": self.min,
            "samples_s": list(self.samples),
        }


@dataclass(frozen=True, slots=True)
class BaselineResult:
    """A baseline figure, or why it could not be measured."""

    kind: BaselineKind
    timing: Timing | None
    detail: str = ""  # how it was measured, or the reason it is missing

    @property
    def gbps(self) -> float | None:
        return None if self.timing is None else self.timing.gbps

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "detail": self.detail,
                "timing": None if self.timing is None else self.timing.to_json()}


@dataclass(frozen=True, slots=True)
class PointResult:
    """One measured point: a workload moved by one backend in one direction."""

    workload: Workload
    backend: BackendKind
    op: Op
    memory: MemoryKind
    devices: tuple[int, int]
    iters: int
    warmup: int
    timing: Timing | None
    verified: bool
    baseline: BaselineResult | None
    nixl: BaselineResult | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.timing is not None and self.verified and not self.error

    @property
    def gbps(self) -> float | None:
        return None if self.timing is None else self.timing.gbps

    @property
    def ratio(self) -> float | None:
        """kvxfer GB/s over the baseline's, when both were measured."""
        b = None if self.baseline is None else self.baseline.gbps
        return None if self.gbps is None or not b else self.gbps / b

    @property
    def nixl_ratio(self) -> float | None:
        n = None if self.nixl is None else self.nixl.gbps
        return None if self.gbps is None or not n else self.gbps / n

    def to_json(self) -> dict[str, Any]:
        w = self.workload
        return {
            "workload": w.name,
            "geometry": w.to_wire() | {"layer_shape": list(w.layer_shape), "dtype": "bfloat16"},
            "piece_bytes": w.piece_bytes,
            "blocks": w.blocks,
            "layers": w.layers,
            "pieces": w.pieces,
            "nbytes": w.total_bytes,
            "backend": self.backend.value,
            "op": self.op.value,
            "memory": self.memory.value,
            "devices": list(self.devices),
            "iters": self.iters,
            "warmup": self.warmup,
            "gbps": self.gbps,
            "latency_p50_s": None if self.timing is None else self.timing.p50,
            "latency_p99_s": None if self.timing is None else self.timing.p99,
            "timing": None if self.timing is None else self.timing.to_json(),
            "verified": self.verified,
            "baseline": None if self.baseline is None else self.baseline.to_json(),
            "baseline_gbps": None if self.baseline is None else self.baseline.gbps,
            "ratio": self.ratio,
            "nixl": None if self.nixl is None else self.nixl.to_json(),
            "nixl_gbps": None if self.nixl is None else self.nixl.gbps,
            "nixl_ratio": self.nixl_ratio,
            "error": self.error,
        }
