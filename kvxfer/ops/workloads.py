"""The standard benchmark workloads of BENCHMARKS.md, as data (shared by GPU tests and bench/).

Layer: ops support, pure Python/numpy. A workload is a per-layer KV tensor shape, the dimension
that indexes blocks, a layer count and how many blocks move; block ids come from a fixed seed,
distinct on each side and different on the two sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Workload", "STANDARD", "by_name"]


@dataclass(frozen=True, slots=True)
class Workload:
    """One named paged-KV geometry and transfer size."""

    name: str
    shape: tuple[int, ...]  # per layer
    block_dim: int
    layers: int
    moved: int  # blocks moved
    dtype: str = "bfloat16"
    itemsize: int = 2
    seed: int = 1234

    @property
    def num_blocks(self) -> int:
        return self.shape[self.block_dim]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one layer."""
        return int(np.prod(self.shape)) // self.num_blocks * self.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes moved by the transfer."""
        return self.layers * self.moved * self.block_nbytes

    def block_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, destination ids): distinct on each side, different on the two sides."""
        rng = np.random.default_rng(self.seed)
        src = rng.permutation(self.num_blocks)[: self.moved].astype(np.int64)
        dst = rng.permutation(self.num_blocks)[: self.moved].astype(np.int64)
        return src, dst


STANDARD: tuple[Workload, ...] = (
    Workload("llama8b", (2, 2048, 16, 8, 128), 1, 32, 512),
    Workload("llama8b-tp8", (2, 8192, 16, 1, 128), 1, 32, 4096),
    Workload("llama70b-tp8", (2, 4096, 16, 1, 128), 1, 80, 512),
    Workload("mla", (4096, 16, 576), 0, 61, 512),
    Workload("small", (2, 2048, 16, 8, 128), 1, 32, 1),
)


def by_name(name: str) -> Workload:
    """The standard workload called ``name``.

    Raises:
        KeyError: no such workload (the message lists the valid names).
    """
    for w in STANDARD:
        if w.name == name:
            return w
    raise KeyError(f"unknown workload {name!r}; standard ones are {[w.name for w in STANDARD]}")
