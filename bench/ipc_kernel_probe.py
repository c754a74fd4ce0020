"""Probe: kv_copy over peer memory (GPU1 pulls from / pushes to GPU0) for kernels and build variants.

One process, two GPUs, peer access enabled; the llama8b and llama8b-tp8 geometries; CUDA-event
medians; the same bytes through a contiguous cudaMemcpyPeerAsync as the ceiling. Finds which
launch shape keeps enough NVLink reads in flight. Prints a table, writes JSON to argv[1].
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _peer import cases, finish, gbps, peer_memcpy_gbps  # noqa: E402

from kvxfer.ops import cuda as ops  # noqa: E402
from kvxfer.ops._loader import KernelSpec  # noqa: E402
from kvxfer.ops.pairs import copy_block_pairs, prepare_pairs  # noqa: E402


def spec(**d):
    return KernelSpec("kv_copy.cu", "kv_copy_jobs", tuple(sorted(d.items())))


VARIANTS = {
    "default": (spec(), None),
}


# block-pair kernel builds, records prepared on the GPU (no upload in the timing)
PAIR_VARIANTS = {
    "pairs_prep": KernelSpec("kv_copy.cu", "kv_copy_pairs"),
}


def main() -> None:
    res = {}
    for c in cases():
        ls, ld, stream, nbytes = c.src_layout, c.dst_layout, c.stream, c.nbytes
        row = {"peer_memcpy_GBps": peer_memcpy_gbps(c)}
        for vname, (sp, cps) in VARIANTS.items():
            try:
                pull = ops.prepare(c.plan.jobs, ls, ld, device=1, spec=sp, ctas_per_sm=cps)
                push = ops.prepare(c.push_plan.jobs, ld, ls, device=1, spec=sp, ctas_per_sm=cps)
                row[f"{vname}_pull_GBps"] = gbps(nbytes, lambda: pull.launch(stream.ptr), stream)
                row[f"{vname}_push_GBps"] = gbps(nbytes, lambda: push.launch(stream.ptr), stream)
            except Exception as exc:  # a variant that does not build or launch is reported
                row[f"{vname}_error"] = repr(exc)[:200]
        # the block-pair kernels (what the cuda_ipc backend launches): with the upload of the
        # records (as a transfer does), then prepared, per build; every variant's pull checked
        bp, push_bp = c.plan.block_pairs, c.push_plan.block_pairs
        row["pairs_pull_GBps"] = gbps(nbytes, lambda: copy_block_pairs(bp, ls, ld, stream=stream.ptr, device=1), stream)
        row["pairs_push_GBps"] = gbps(nbytes, lambda: copy_block_pairs(push_bp, ld, ls, stream=stream.ptr, device=1), stream)
        for tag, psp in PAIR_VARIANTS.items():
            try:
                pull = prepare_pairs(bp, ls, ld, device=1, spec=psp)
                push = prepare_pairs(push_bp, ld, ls, device=1, spec=psp)
                c.clear()
                pull.launch(stream.ptr)
                stream.synchronize()
                row[f"{tag}_correct"] = c.pull_matches()
                row[f"{tag}_pull_GBps"] = gbps(nbytes, lambda: pull.launch(stream.ptr), stream)
                row[f"{tag}_push_GBps"] = gbps(nbytes, lambda: push.launch(stream.ptr), stream)
            except Exception as exc:  # a variant that does not build or launch is reported
                row[f"{tag}_error"] = repr(exc)[:200]
        # correctness of the default pull
        c.clear()
        ops.prepare(c.plan.jobs, ls, ld, device=1).launch(stream.ptr)
        stream.synchronize()
        row["default_pull_correct"] = c.pull_matches()
        res[c.name] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}
        print(c.name, json.dumps(res[c.name], indent=1), flush=True)
    finish(res)


if __name__ == "__main__":
    main()
