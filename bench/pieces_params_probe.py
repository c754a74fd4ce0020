"""Probe: a pipelined gather's pieces with their records in the kernel parameters or uploaded.

``PairPieces`` builds the UCX packed path's gather and scatter. Where the GPU takes 32 KiB of
kernel parameters it launches ``kv_copy_pairs_ids`` with the pair records and block ids in
the parameters (nothing uploaded); otherwise ``kv_copy_pairs`` with records uploaded into a
device buffer of their own. For each standard workload on GPU0 this times, both ways:

- the host steps before the first piece runs (``PairPieces``, the first launch, its sync),
  back to back and after a 5 ms sleep (the responder's case: caches cool between transfers);
- the GPU time of the whole gather, all pieces (CUDA events), and that both ways gather the
  same bytes.

Medians in microseconds; JSON to $OUT/pieces_params.json.

    python3 bench/pieces_params_probe.py [llama8b llama8b-tp8]
"""

from __future__ import annotations

import json
import os
import sys
import time

import cupy as cp
import numpy as np

from kvxfer.layout import KVLayout
from kvxfer.ops.pairs import BUF_DST, PairPieces
from kvxfer.ops.workloads import by_name
from kvxfer.plan import plan_transfer

REPS = 40


def probe(name: str) -> dict:
    w = by_name(name)
    cp.cuda.Device(0).use()
    tensors = [cp.random.randint(0, 2**16, w.shape, dtype=cp.uint16) for _ in range(w.layers)]
    layout = KVLayout.from_tensors(tensors, block_dim=w.block_dim)
    src, dst = w.block_ids()
    plan = plan_transfer(layout.geometry, layout.geometry, src, dst)
    bounds = [b[:2] for b in plan.chunk_bounds(plan.nbytes // 4, 16 << 20, 64 << 20)]
    stream = cp.cuda.Stream(non_blocking=True)
    bufs = {True: cp.zeros(plan.nbytes, dtype=cp.uint8), False: cp.zeros(plan.nbytes, dtype=cp.uint8)}

    def pieces(in_params: bool) -> PairPieces:
        p = PairPieces(plan.block_pairs, layout, int(bufs[in_params].data.ptr), buffer_side=BUF_DST, bounds=bounds,
                       stream=stream, device=0, in_params=in_params)
        assert p.in_params == in_params
        return p

    def host_steps(in_params: bool, gap: float) -> list[float]:
        rows = []
        for _ in range(REPS):
            if gap:
                time.sleep(gap)
            t = [time.perf_counter()]
            p = pieces(in_params)
            t.append(time.perf_counter())
            p.launch(0)
            t.append(time.perf_counter())
            stream.synchronize()
            t.append(time.perf_counter())
            rows.append(np.diff(t) * 1e6)
        return np.median(np.array(rows), axis=0).round(1).tolist()

    def gpu_us(in_params: bool) -> float:
        p = pieces(in_params)
        times = []
        for _ in range(10):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            for i in range(len(p)):
                p.launch(i)
            e1.record(stream)
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3)
        return round(float(np.median(times)), 1)

    for flag in (True, False):  # warm-up: kernels built, pools filled
        host_steps(flag, 0)
    out: dict = {"bytes": plan.nbytes, "pieces": len(bounds), "blocks": int(src.size)}
    for label, gap in (("hot", 0.0), ("after 5 ms sleep", 0.005)):
        for flag in (True, False, True, False):  # alternated
            key = f"{label} [PairPieces, launch 0, sync] {'in parameters' if flag else 'uploaded'}"
            out.setdefault(key, []).append(host_steps(flag, gap))
    for flag in (True, False):
        out[f"gather GPU us {'in parameters' if flag else 'uploaded'}"] = gpu_us(flag)
    stream.synchronize()
    out["same bytes"] = bool(cp.array_equal(bufs[True], bufs[False]))
    return out


def main() -> None:
    names = sys.argv[1:] or ["llama8b", "llama8b-tp8"]
    res = {n: probe(n) for n in names}
    print(json.dumps(res, indent=1))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "pieces_params.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
