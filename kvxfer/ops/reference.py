"""Numpy reference of the copy operations: gather, scatter and block-to-block copy over a plan.

Layer: ops. Works on host memory; it is the oracle the CUDA kernels are tested against and the
pack/unpack path of host-memory backends. ``views[t]`` is a uint8 array over tensor ``t`` from
its first byte (see :func:`kvxfer._memory.host_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..plan import TransferPlan

__all__ = ["gather", "scatter", "copy_blocks"]


def _pairs(plan: TransferPlan, side: str):
    t, off, ln = plan.runs(side)
    pos = np.zeros(ln.size + 1, dtype=np.int64)
    np.cumsum(ln, out=pos[1:])
    return zip(t.tolist(), off.tolist(), ln.tolist(), pos[:-1].tolist())


def gather(plan: TransferPlan, views: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """Copy the source side of ``plan`` into one contiguous buffer in stream order."""
    if out is None:
        out = np.empty(plan.nbytes, dtype=np.uint8)
    if out.nbytes < plan.nbytes:
        raise ValueError(f"gather buffer holds {out.nbytes} bytes; the plan needs {plan.nbytes}")
    for t, off, ln, pos in _pairs(plan, "src"):
        out[pos : pos + ln] = views[t][off : off + ln]
    return out


def scatter(plan: TransferPlan, buf: np.ndarray, views: Sequence[np.ndarray]) -> None:
    """Copy a stream-ordered buffer into the destination side of ``plan``."""
    if buf.nbytes < plan.nbytes:
        raise ValueError(f"scatter buffer holds {buf.nbytes} bytes; the plan needs {plan.nbytes}")
    for t, off, ln, pos in _pairs(plan, "dst"):
        views[t][off : off + ln] = buf[pos : pos + ln]


def copy_blocks(plan: TransferPlan, src_views: Sequence[np.ndarray], dst_views: Sequence[np.ndarray]) -> None:
    """Block-to-block copy: the source side of ``plan`` straight into its destination side."""
    scatter(plan, gather(plan, src_views), dst_views)
