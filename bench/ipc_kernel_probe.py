"""Probe: kv_copy over peer memory (GPU1 pulls from / pushes to GPU0) for kernels and build variants.

One process, two GPUs, peer access enabled; the llama8b and llama8b-tp8 geometries; CUDA-event
medians; the same bytes through a contiguous cudaMemcpyPeerAsync as the ceiling. Finds which
launch shape keeps enough NVLink reads in flight. Prints a table, writes JSON to argv[1].
"""

from __future__ import annotations

import json
import statistics
import sys

import cupy as cp
import numpy as np

from kvxfer import KVLayout, plan_transfer
from kvxfer.ops import cuda as ops
from kvxfer.ops._loader import KernelSpec

WL = {"llama8b": (32, 2048, 8, 512), "llama8b-tp8": (32, 8192, 1, 4096)}


def spec(**d):
    return KernelSpec("kv_copy.cu", "kv_copy_jobs", tuple(sorted(d.items())))


VARIANTS = {
    "default": (spec(), None),
}


# block-pair kernel builds, records prepared on the GPU (no upload in the timing)
PAIR_VARIANTS = {
    "pairs_prep": KernelSpec("kv_copy.cu", "kv_copy_pairs"),
}


def timeit(fn, stream, n=10):
    fn()
    stream.synchronize()
    out = []
    for _ in range(n):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        out.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return statistics.median(out)


def main() -> None:
    res = {}
    for name, (L, NB, H, NSEL) in WL.items():
        shape = (2, NB, 16, H, 128)
        with cp.cuda.Device(0):
            src = [cp.random.randint(0, 2**15, shape, dtype=cp.int16) for _ in range(L)]
        with cp.cuda.Device(1):
            try:
                cp.cuda.runtime.deviceEnablePeerAccess(0)
            except cp.cuda.runtime.CUDARuntimeError:
                pass  # already enabled by the previous workload
            dst = [cp.zeros(shape, dtype=cp.int16) for _ in range(L)]
            stream = cp.cuda.Stream(non_blocking=True)
            ls, ld = KVLayout.from_tensors(src, block_dim=1), KVLayout.from_tensors(dst, block_dim=1)
            rng = np.random.default_rng(0)
            s, d = rng.choice(NB, NSEL, replace=False), rng.choice(NB, NSEL, replace=False)
            plan = plan_transfer(ls.geometry, ld.geometry, s, d)
            nbytes = plan.nbytes
            row = {}
            with cp.cuda.Device(0):
                c0 = cp.empty(nbytes, dtype=cp.uint8)
            cp.cuda.Device(1).use()
            c1 = cp.empty(nbytes, dtype=cp.uint8)
            row["peer_memcpy_GBps"] = nbytes / timeit(lambda: cp.cuda.runtime.memcpyPeerAsync(c1.data.ptr, 1, c0.data.ptr, 0, nbytes, stream.ptr), stream) / 1e9
            for vname, (sp, cps) in VARIANTS.items():
                try:
                    pull = ops.prepare(plan.jobs, ls, ld, device=1, spec=sp, ctas_per_sm=cps)
                    push_plan = plan_transfer(ld.geometry, ls.geometry, d, s)
                    push = ops.prepare(push_plan.jobs, ld, ls, device=1, spec=sp, ctas_per_sm=cps)
                    row[f"{vname}_pull_GBps"] = nbytes / timeit(lambda: pull.launch(stream.ptr), stream) / 1e9
                    row[f"{vname}_push_GBps"] = nbytes / timeit(lambda: push.launch(stream.ptr), stream) / 1e9
                except Exception as exc:  # a variant that does not build or launch is reported
                    row[f"{vname}_error"] = repr(exc)[:200]
            # the block-pair kernels (what the cuda_ipc backend launches): with the upload of the
            # records (as a transfer does), then prepared, per build; every variant's pull checked
            from kvxfer.ops.pairs import PAIRS_KERNEL, copy_block_pairs, prepare_pairs

            push_bp = plan_transfer(ld.geometry, ls.geometry, d, s).block_pairs
            for tag, psp in (("pairs", PAIRS_KERNEL),):
                row[f"{tag}_pull_GBps"] = nbytes / timeit(lambda: copy_block_pairs(plan.block_pairs, ls, ld, stream=stream.ptr, device=1, spec=psp), stream) / 1e9
                row[f"{tag}_push_GBps"] = nbytes / timeit(lambda: copy_block_pairs(push_bp, ld, ls, stream=stream.ptr, device=1, spec=psp), stream) / 1e9
            for tag, psp in PAIR_VARIANTS.items():
                try:
                    pull = prepare_pairs(plan.block_pairs, ls, ld, device=1, spec=psp)
                    push = prepare_pairs(push_bp, ld, ls, device=1, spec=psp)
                    for x in dst[:2]:
                        x.fill(0)
                    pull.launch(stream.ptr)
                    stream.synchronize()
                    row[f"{tag}_correct"] = all(bool((cp.asnumpy(b[:, d]) == cp.asnumpy(a[:, s])).all()) for a, b in zip(src[:2], dst[:2]))
                    row[f"{tag}_pull_GBps"] = nbytes / timeit(lambda: pull.launch(stream.ptr), stream) / 1e9
                    row[f"{tag}_push_GBps"] = nbytes / timeit(lambda: push.launch(stream.ptr), stream) / 1e9
                except Exception as exc:  # a variant that does not build or launch is reported
                    row[f"{tag}_error"] = repr(exc)[:200]
            # correctness of the default pull
            ops.prepare(plan.jobs, ls, ld, device=1).launch(stream.ptr)
            stream.synchronize()
            ok = all(bool((cp.asarray(b[:, d]).get() == cp.asnumpy(a[:, s])).all()) for a, b in zip(src[:2], dst[:2]))
            row["default_pull_correct"] = ok
            res[name] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}
            print(name, json.dumps(res[name], indent=1), flush=True)
            del src, dst
            cp.get_default_memory_pool().free_all_blocks()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
