"""Vectorized host-memory gather and scatter for block-pair plans (the numpy reference's bytes,
one fancy-indexed copy per (tensor, segment) pair instead of a Python step per run).

Layer: ops. Used by host-memory packers (the UCX backend's packed path); the reference in
:mod:`kvxfer.ops.reference` stays the oracle and the fallback for plans without block pairs.
``views[t]`` is a uint8 array over tensor ``t`` from its first byte.

Stream order (see :mod:`kvxfer.plan`): pair by pair; inside a pair, run by run; a run of L
consecutive blocks holds ``count`` rows of ``L * run`` bytes. Viewing a pair's share of the
stream as one row of ``count * run`` bytes per block, a single-block run is exactly the row at
its block's position, so all of those move in one indexed copy; longer runs (rare for random
block ids) are copied one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..plan import TransferPlan
from . import reference

__all__ = ["gather", "scatter"]


def _blocks_view(view: np.ndarray, off: int, bstride: int, count: int, stride: int, run: int, nblocks: int) -> np.ndarray | None:
    """``view`` as (block, row, byte) from byte ``off``; None if block ``nblocks - 1`` would
    reach past the view (the caller then falls back to the bounds-checked reference)."""
    last = off + (nblocks - 1) * bstride + (count - 1) * stride + run
    if off < 0 or bstride < 0 or stride < 0 or last > view.size:
        return None
    base = view[off:]
    return as_strided(base, shape=(nblocks, count, run), strides=(bstride, stride, 1), writeable=True)


def _move(plan: TransferPlan, buf: np.ndarray, views: Sequence[np.ndarray], side: str) -> bool:
    """Copy between ``buf`` (the stream) and ``side``'s blocks; False when the plan is not a
    block-pair plan or a view is too short (nothing was copied then)."""
    bp = plan.block_pairs
    if bp is None:
        return False
    ids = bp.src_blocks if side == "src" else bp.dst_blocks
    n = int(ids.size)
    if n == 0 or bp.pairs.size == 0:
        return True
    p = bp.pairs
    need = int(ids.max()) + 1
    lens, starts = bp.run_lengths, bp.run_starts
    pre = np.cumsum(lens) - lens  # blocks of the stream before each run
    long_runs = np.flatnonzero(lens > 1)
    single = np.ones(n, dtype=bool)
    for j in long_runs.tolist():
        single[starts[j] : starts[j] + lens[j]] = False
    single_pos = np.flatnonzero(single)  # block positions (in the list) moved as single runs
    stream = 0
    views_b = []
    for q in range(p.size):
        t = int(p["t"][q])
        run, count = int(p[f"{side}_run"][q]), int(p[f"{side}_count"][q])
        v = _blocks_view(views[t], int(p[f"{side}_off"][q]), int(p[f"{side}_bstride"][q]), count,
                         int(p[f"{side}_stride"][q]) if count > 1 else 0, run, need)
        if v is None:
            return False
        views_b.append(v)
    for q in range(p.size):
        run, count = int(p[f"{side}_run"][q]), int(p[f"{side}_count"][q])
        share = buf[stream : stream + n * count * run]
        rows = share.reshape(n, count * run)
        v = views_b[q]
        coal = bool(p["coal"][q])
        pos = single_pos if coal else np.arange(n)
        if pos.size:
            if side == "src":
                rows[pos] = v[ids[pos]].reshape(pos.size, count * run)
            else:
                v[ids[pos]] = rows[pos].reshape(pos.size, count, run)
        if coal:
            for j in long_runs.tolist():
                b0, L = int(ids[starts[j]]), int(lens[j])
                chunk = share[int(pre[j]) * count * run : (int(pre[j]) + L) * count * run].reshape(count, L, run)
                if side == "src":
                    chunk[...] = v[b0 : b0 + L].transpose(1, 0, 2)
                else:
                    v[b0 : b0 + L] = chunk.transpose(1, 0, 2)
        stream += n * count * run
    return True


def gather(plan: TransferPlan, views: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """Copy the source side of ``plan`` into one contiguous buffer in stream order (the same
    bytes as :func:`kvxfer.ops.reference.gather`)."""
    if out is None:
        out = np.empty(plan.nbytes, dtype=np.uint8)
    if out.nbytes < plan.nbytes:
        raise ValueError(f"gather buffer holds {out.nbytes} bytes; the plan needs {plan.nbytes}")
    if not _move(plan, out, views, "src"):
        reference.gather(plan, views, out)
    return out


def scatter(plan: TransferPlan, buf: np.ndarray, views: Sequence[np.ndarray]) -> None:
    """Copy a stream-ordered buffer into the destination side of ``plan`` (the same bytes as
    :func:`kvxfer.ops.reference.scatter`)."""
    if buf.nbytes < plan.nbytes:
        raise ValueError(f"scatter buffer holds {buf.nbytes} bytes; the plan needs {plan.nbytes}")
    if not _move(plan, buf, views, "dst"):
        reference.scatter(plan, buf, views)
