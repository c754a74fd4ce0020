"""Block-pair copies: one launch that computes every address on the GPU from block ids.

Layer: ops. For a plan between layouts of the same segment structure (the usual case:
:class:`~kvxfer.plan.BlockPairs`), the host uploads only the (tensor, segment) pairs and the
block-id runs, a few KiB, instead of one record per layer and block; the ``kv_copy_pairs``
kernel in ``csrc/kv_copy.cu`` expands them. This keeps the host cost of a CUDA IPC transfer
flat in the number of layers and blocks (``kv_copy_jobs`` remains the path for layout changes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import TransportError
from ..plan import BlockPairs
from . import cuda as _cuda
from ._loader import KernelSpec, get_kernel

__all__ = ["PAIRS_KERNEL", "PAIR_DTYPE", "pair_records", "copy_block_pairs"]

PAIRS_KERNEL = KernelSpec("kv_copy.cu", "kv_copy_pairs")
MAX_ITEM_BYTES = 64 << 10  # one warp copies at most this much per item: long runs are split

# Must match `struct KvPair` in csrc/kv_copy.cu.
PAIR_DTYPE = np.dtype(
    [
        ("src", np.uint64),
        ("dst", np.uint64),
        ("src_bstride", np.int64),
        ("dst_bstride", np.int64),
        ("run", np.int64),
        ("count", np.int64),
        ("src_stride", np.int64),
        ("dst_stride", np.int64),
        ("coal", np.int64),
        ("item0", np.int64),
        ("unit", np.int64),
        ("pad", np.int64),
    ]
)
assert PAIR_DTYPE.itemsize == 96


def _unit(mix: np.ndarray) -> np.ndarray:
    out = np.zeros(mix.size, dtype=np.int64)
    for b in range(1, 5):
        out += ((mix & np.uint64((1 << b) - 1)) == 0).astype(np.int64)
    return out


def pair_records(bp: BlockPairs, src_bases: np.ndarray, dst_bases: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(pair records, coalesced runs, single-block runs, item count) for ``kv_copy_pairs``.

    Each runs array is ``[src ids | dst ids | blocks per run]``. Coalesced runs are split so that
    no item exceeds :data:`MAX_ITEM_BYTES` (a long contiguous run would leave one warp copying
    it alone).
    """
    pairs = bp.pairs
    s, d = bp.src_blocks, bp.dst_blocks
    rec = np.zeros(pairs.size, dtype=PAIR_DTYPE)
    if pairs.size == 0 or s.size == 0:
        return rec, np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    coal = pairs["coal"]
    # coalesced runs, split to bounded items
    max_run = int(pairs["src_run"][coal].max()) if coal.any() else 1
    per_item = max(1, MAX_ITEM_BYTES // max_run)
    lens = bp.run_lengths
    pieces = -(-lens // per_item)
    idx = np.repeat(np.arange(lens.size), pieces)
    within = (np.arange(idx.size, dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * per_item
    starts = bp.run_starts[idx]
    coal_runs = np.concatenate((s[starts] + within, d[starts] + within, np.minimum(per_item, lens[idx] - within)))
    single_runs = np.concatenate((s, d, np.ones(s.size, dtype=np.int64)))
    n_coal, n_single = idx.size, s.size

    src_bases = np.asarray(src_bases, dtype=np.uint64)
    dst_bases = np.asarray(dst_bases, dtype=np.uint64)
    t = pairs["t"]
    rec["src"] = src_bases[t] + pairs["src_off"].astype(np.uint64)
    rec["dst"] = dst_bases[t] + pairs["dst_off"].astype(np.uint64)
    rec["src_bstride"] = pairs["src_bstride"]
    rec["dst_bstride"] = pairs["dst_bstride"]
    rec["run"] = pairs["src_run"]
    rec["count"] = pairs["src_count"]
    rec["src_stride"] = np.where(pairs["src_count"] > 1, pairs["src_stride"], 0)
    rec["dst_stride"] = np.where(pairs["dst_count"] > 1, pairs["dst_stride"], 0)
    rec["coal"] = coal
    items = pairs["src_count"] * np.where(coal, n_coal, n_single)
    rec["item0"] = np.cumsum(items) - items
    mix = rec["src"] | rec["dst"]
    for f in ("src_bstride", "dst_bstride", "run", "src_stride", "dst_stride"):
        mix |= rec[f].astype(np.uint64)
    rec["unit"] = _unit(mix)
    return rec, coal_runs, single_runs, int(items.sum())


def copy_block_pairs(bp: BlockPairs, src_bases: Any, dst_bases: Any, *, stream: Any = None,
                     device: int | None = None, spec: KernelSpec = PAIRS_KERNEL) -> None:
    """Copy every block of ``bp`` from the source tensors to the destination tensors, one launch.

    ``src_bases``/``dst_bases``: a KVLayout, or per-tensor device addresses / torch tensors /
    cupy arrays. Asynchronous on the launch stream (the caller's, as in :func:`kvxfer.ops.cuda.copy_jobs`).

    Raises:
        TransportError: the upload or launch failed.
        KernelCompileError: the kernel does not build.
        BackendUnavailableError: CuPy is missing.
    """
    src, src_objs = _cuda._flatten_bases(src_bases, "src_bases")
    dst, dst_objs = _cuda._flatten_bases(dst_bases, "dst_bases")
    objs = src_objs + dst_objs
    rec, coal_runs, single_runs, nitems = pair_records(bp, np.asarray(src, np.uint64), np.asarray(dst, np.uint64))
    if nitems == 0:
        return
    dev = _cuda._device_of(objs, (src_bases, dst_bases), device)
    cupy = _cuda._cupy()
    sptr = _cuda._stream_ptr(stream, objs, dev)
    st = _cuda._state(dev, sptr)
    head = -(-rec.nbytes // 64) * 64
    c_off = head
    s_off = c_off + coal_runs.nbytes
    total = s_off + single_runs.nbytes
    warps, ctas = _cuda._workers_for(spec, dev, bp.nbytes, None)
    with st.lock, cupy.cuda.Device(dev):
        cstream = _cuda._cupy_stream(sptr, dev)
        slot = _cuda._staging(st, total)
        view = slot[1]
        view[: rec.nbytes] = rec.view(np.uint8)
        view[c_off:s_off] = coal_runs.view(np.uint8)
        view[s_off:total] = single_runs.view(np.uint8)
        mem = _cuda._device_buffer(st, total, cstream)
        base = int(mem.ptr)
        try:
            cupy.cuda.runtime.memcpyAsync(base, view.ctypes.data, total, _cuda._H2D, sptr)
            ev = cupy.cuda.Event(disable_timing=True)
            ev.record(cstream)
            slot[2] = ev
            fn = get_kernel(spec, dev)
            fn((ctas,), (_cuda._threads(spec),),
               (np.uint64(base), np.int64(rec.size), np.uint64(base + c_off), np.int64(coal_runs.size // 3),
                np.uint64(base + s_off), np.int64(single_runs.size // 3), np.int64(nitems)),
               stream=cstream)
        except Exception as exc:
            raise TransportError(f"kv_copy_pairs upload or launch failed on cuda:{dev}: {exc}") from exc
