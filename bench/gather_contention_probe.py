"""Probe: does a gather on the source GPU slow the peer copy running beside it?

In a packed UCX read the responder gathers piece i + 1 on its GPU while piece i goes out over
NVLink (UCX's cuda_ipc put is a copy-engine memcpy). Traces show the first 64 MiB put landing
0.34 ms after it was posted, twice its wire time, while the next piece's gather ran at full
speed beside it. Here, on GPU0: a contiguous peer memcpy GPU0 -> GPU1 of the transfer's bytes,
alone and with kv_copy_pairs gathering the same number of bytes into a local buffer on another
stream at once, the gather capped at several warp counts (a capped gather is slower but may
leave HBM to the copy engine). Also each gather alone. CUDA-event medians; llama8b and
llama8b-tp8 geometry. Prints a table, writes JSON to argv[1].
"""

from __future__ import annotations

import json
import os
import sys

import cupy as cp

sys.path.insert(0, os.path.dirname(__file__))
from _peer import cases, finish, timeit  # noqa: E402

from kvxfer import plan_transfer  # noqa: E402
from kvxfer.ops.pairs import gather_pairs  # noqa: E402

WARPS = [None, 2048, 1024, 512, 256]  # None: the launch kvxfer picks


def main() -> None:
    res: dict = {}
    for c in cases():
        n = c.nbytes
        geom = c.src_layout.geometry
        bp = plan_transfer(geom, geom, c.s, c.s).block_pairs  # the source blocks, gathered on GPU0
        with cp.cuda.Device(0):
            out0 = cp.empty(n, dtype=cp.uint8)  # the gather's buffer
            src0 = cp.ones(n, dtype=cp.uint8)  # the memcpy's source (a buffer of its own)
            copy_s, gather_s = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
            go = cp.cuda.Event(disable_timing=True)
        dst1 = cp.empty(n, dtype=cp.uint8)  # on GPU1

        def memcpy() -> None:
            cp.cuda.runtime.memcpyPeerAsync(dst1.data.ptr, 1, src0.data.ptr, 0, n, copy_s.ptr)

        def gather(warps) -> None:
            gather_pairs(bp, c.src_layout, out0.data.ptr, stream=gather_s.ptr, device=0, max_warps=warps)

        row: dict = {}
        with cp.cuda.Device(0):
            row["memcpy_alone_ms"] = timeit(memcpy, copy_s)[0] * 1e3
            for w in WARPS:
                tag = "auto" if w is None else str(w)
                row[f"gather_{tag}_alone_ms"] = timeit(lambda w=w: gather(w), gather_s)[0] * 1e3

                def both(w=w) -> None:  # the gather is queued first, the copy starts with it
                    go.record(copy_s)
                    gather_s.wait_event(go)
                    gather(w)
                    memcpy()

                row[f"memcpy_beside_gather_{tag}_ms"] = timeit(both, copy_s)[0] * 1e3
        base = row["memcpy_alone_ms"]
        row["memcpy_slowdown"] = {k.split("_")[3]: row[k] / base for k in row if k.startswith("memcpy_beside")}
        res[c.name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(c.name, json.dumps(res[c.name]), flush=True)
        del out0, src0, dst1
    finish(res)


if __name__ == "__main__":
    main()
