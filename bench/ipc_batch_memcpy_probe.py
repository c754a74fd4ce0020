"""Probe: the copy engines through one cuMemcpyBatchAsync per transfer, against kv_copy_pairs.

Question: SM-issued peer copies (our kernel, the anchor kernel, every cache hint tried) stay at
0.92-0.945 of a contiguous cudaMemcpyPeerAsync over NVLink; the copy engines reach the memcpy
figure. CUDA 12.8+ can hand a whole list of (dst, src, size) to the driver in one call. Does
that list of 32 KiB or 4 KiB pieces run at the copy engine's speed, and what does the call cost
on the host?

One process, GPU1 pulls from / pushes to GPU0 (peer access on), llama8b and llama8b-tp8
geometry, random distinct blocks; CUDA-event medians; host time of the call alone; flags 0 and
CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE (1). Every variant's pull is checked byte for byte.
Prints a table, writes JSON to argv[1].
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _peer import cases, finish, gbps, peer_memcpy_gbps, timeit  # noqa: E402

from kvxfer.ops.pairs import prepare_pairs  # noqa: E402


class MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class MemcpyAttributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", MemLocation), ("dstLocHint", MemLocation),
                ("flags", ctypes.c_uint)]


_lib = ctypes.CDLL("libcuda.so.1")
_v2 = getattr(_lib, "cuMemcpyBatchAsync_v2", None)
_v1 = getattr(_lib, "cuMemcpyBatchAsync", None)


def batch(dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, flags: int, stream: int) -> None:
    attrs = MemcpyAttributes(1, MemLocation(0, 0), MemLocation(0, 0), flags)  # 1: source in stream order
    idx = (ctypes.c_size_t * 1)(0)
    n = ctypes.c_size_t(dsts.size)
    p = lambda a: ctypes.c_void_p(a.ctypes.data)
    if _v2 is not None:
        rc = _v2(p(dsts), p(srcs), p(sizes), n, ctypes.byref(attrs), idx, ctypes.c_size_t(1), ctypes.c_void_p(stream))
    else:
        fail = ctypes.c_size_t(0)
        rc = _v1(p(dsts), p(srcs), p(sizes), n, ctypes.byref(attrs), idx, ctypes.c_size_t(1), ctypes.byref(fail),
                 ctypes.c_void_p(stream))
    if rc != 0:
        raise RuntimeError(f"cuMemcpyBatchAsync returned CUresult {rc}")


def piece_lists(src, dst, s, d, half_bytes, blk):
    """(dsts, srcs, sizes) of every (layer, K/V, block) piece."""
    sb = np.array([t.data.ptr for t in src], dtype=np.uint64)[:, None, None]
    db = np.array([t.data.ptr for t in dst], dtype=np.uint64)[:, None, None]
    kv = (np.arange(2, dtype=np.uint64) * np.uint64(half_bytes))[None, :, None]
    so = (s.astype(np.uint64) * np.uint64(blk))[None, None, :]
    do = (d.astype(np.uint64) * np.uint64(blk))[None, None, :]
    srcs = np.ascontiguousarray((sb + kv + so).ravel())
    dsts = np.ascontiguousarray((db + kv + do).ravel())
    return dsts, srcs, np.full(srcs.size, blk, dtype=np.uint64)


def main() -> None:
    res: dict = {"api": "cuMemcpyBatchAsync_v2" if _v2 is not None else ("cuMemcpyBatchAsync" if _v1 else None)}
    for c in cases():
        stream, nbytes, blk, s, d = c.stream, c.nbytes, c.block_bytes, c.s, c.d
        row: dict = {"pieces": nbytes // blk, "piece_bytes": blk}
        mem = row["peer_memcpy_GBps"] = peer_memcpy_gbps(c)
        pull_k = prepare_pairs(c.plan.block_pairs, c.src_layout, c.dst_layout, device=1)
        push_k = prepare_pairs(c.push_plan.block_pairs, c.dst_layout, c.src_layout, device=1)
        row["kernel_pull_GBps"] = gbps(nbytes, lambda: pull_k.launch(stream.ptr), stream)
        row["kernel_push_GBps"] = gbps(nbytes, lambda: push_k.launch(stream.ptr), stream)
        half = c.src[0][0].nbytes  # K, then V, of each layer
        pd, ps, sz = piece_lists(c.src, c.dst, s, d, half, blk)
        qd, qs, _ = piece_lists(c.dst, c.src, d, s, half, blk)
        t0 = time.perf_counter()
        piece_lists(c.src, c.dst, s, d, half, blk)
        row["build_lists_ms"] = (time.perf_counter() - t0) * 1e3
        for flags in (0, 1):
            tag = f"batch_f{flags}"
            try:
                c.clear()
                batch(pd, ps, sz, flags, stream.ptr)
                stream.synchronize()
                row[f"{tag}_correct"] = c.pull_matches()
                dv, hs = timeit(lambda: batch(pd, ps, sz, flags, stream.ptr), stream)
                row[f"{tag}_pull_GBps"], row[f"{tag}_pull_host_ms"] = nbytes / dv / 1e9, hs * 1e3
                dv, hs = timeit(lambda: batch(qd, qs, sz, flags, stream.ptr), stream)  # push: into GPU0
                row[f"{tag}_push_GBps"], row[f"{tag}_push_host_ms"] = nbytes / dv / 1e9, hs * 1e3
            except Exception as exc:
                row[f"{tag}_error"] = repr(exc)[:200]
        for k, v in list(row.items()):
            if k.endswith("GBps") and k != "peer_memcpy_GBps":
                row[k.replace("_GBps", "_ratio")] = round(v / mem, 3)
        res[c.name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print(c.name, json.dumps(res[c.name], indent=1), flush=True)
    finish(res)


if __name__ == "__main__":
    main()
