"""The byte stream of a plan: views of one side's memory, cut into chunks.

Layer: backends (shared by tcp and ucx). A plan's stream is its jobs' runs in order; the
sender reads (address, length) runs of the source side, the receiver writes into runs of the
destination side. Host memory is used in place; GPU memory is staged (see staging.py) behind the same
interface.
"""

from __future__ import annotations

import numpy as np

from ..plan import TransferPlan

__all__ = ["HostStreamSide", "StreamSide", "chunk_bounds"]


class StreamSide:
    """One side of a plan's stream. Subclasses decide where the bytes live."""

    def __init__(self, plan: TransferPlan, side: str):
        t, off, ln = plan.runs(side)
        self.tensor = t
        self.offset = off
        self.length = ln
        self.pos = np.zeros(ln.size + 1, dtype=np.int64)
        np.cumsum(ln, out=self.pos[1:])
        self.nbytes = int(self.pos[-1])

    def run_range(self, a: int, b: int) -> tuple[int, int]:
        """Indices [i0, i1) of the runs that overlap stream bytes [a, b)."""
        i0 = int(np.searchsorted(self.pos, a, side="right")) - 1
        i1 = int(np.searchsorted(self.pos, b, side="left"))
        return max(i0, 0), i1

    def iov(self, a: int, b: int) -> np.ndarray:
        """``(n, 2)`` uint64 (address, length) runs covering stream bytes [a, b), in order."""
        raise NotImplementedError

    def before_send(self, a: int, b: int) -> None:
        """Make stream bytes [a, b) readable through :meth:`iov` (e.g. pack a GPU chunk)."""

    def after_send(self, a: int, b: int) -> None:
        """Stream bytes [a, b) have been handed to the transport; staging may be reused."""

    def after_receive(self, a: int, b: int) -> None:
        """Stream bytes [a, b) have arrived in :meth:`iov`; move them home (e.g. unpack)."""

    def finish(self) -> None:
        """Every byte of the stream has arrived; complete the destination (e.g. unpack)."""

    def close(self) -> None:
        """Release staging resources."""


class HostStreamSide(StreamSide):
    """A stream side over host memory: the runs point straight into the KV tensors."""

    def __init__(self, plan: TransferPlan, side: str, tensor_addrs: np.ndarray):
        super().__init__(plan, side)
        self._addr = tensor_addrs[self.tensor].astype(np.uint64) + self.offset.astype(np.uint64)

    def iov(self, a: int, b: int) -> np.ndarray:
        i0, i1 = self.run_range(a, b)
        out = np.empty((i1 - i0, 2), dtype=np.uint64)
        out[:, 0] = self._addr[i0:i1]
        out[:, 1] = self.length[i0:i1]
        head = a - int(self.pos[i0])
        out[0, 0] += np.uint64(head)
        out[0, 1] -= np.uint64(head)
        out[-1, 1] -= np.uint64(int(self.pos[i1]) - b)
        return out


def chunk_bounds(side: StreamSide, chunk_bytes: int, max_runs: int) -> np.ndarray:
    """Stream offsets cutting the stream into chunks of at most ``chunk_bytes`` bytes and
    about ``max_runs`` runs each (so one chunk fits one sendmsg/recvmsg iovec)."""
    total = side.nbytes
    if total == 0:
        return np.zeros(1, dtype=np.int64)
    by_bytes = np.arange(0, total, chunk_bytes, dtype=np.int64)
    by_runs = side.pos[:-1][::max_runs]
    bounds = np.union1d(np.union1d(by_bytes, by_runs), [total])
    return bounds
