"""Probe: how close can one kernel launch come to a device copy on the ``small`` workload?

``small`` (BENCHMARKS.md) gathers 64 pieces of 32 KiB (2 MiB); the timing is bench_pack's (a
CUDA graph of 100 launches, median of samples). Kernels, each in the same run against
``torch`` copy of 2 MiB:

* ``empty``: no work, the floor of a launch in a graph;
* ``contig``: a plain contiguous 2 MiB copy (no records at all), per grid and block size;
* ``spans``: the gather with every piece's (source, destination) in the launch parameters, so a
  CTA's first load depends on nothing but its index;
* our kernels as shipped: kv_copy_jobs (records uploaded) and kv_copy_pairs_inline.

Prints a table, writes JSON to argv[1].
"""

from __future__ import annotations

import json
import os
import sys

import cupy as cp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_pack import cuda_ms  # noqa: E402

from kvxfer import KVLayout, plan_transfer  # noqa: E402
from kvxfer.ops import cuda as ops  # noqa: E402
from kvxfer.ops.pairs import prepare_pairs  # noqa: E402
from kvxfer.ops.workloads import by_name  # noqa: E402

SRC = r"""
typedef unsigned long long u64;
extern "C" __global__ void empty(int x) {}

extern "C" __global__ void contig(const uint4* __restrict__ s, uint4* __restrict__ d, long long nvec) {
    const long long per = nvec / gridDim.x;
    const uint4* a = s + blockIdx.x * per;
    uint4* b = d + blockIdx.x * per;
    for (long long i = threadIdx.x; i < per; i += blockDim.x) b[i] = a[i];
}

#define MAXP 64
struct Spans { u64 src[MAXP]; u64 dst[MAXP]; long long vec_per_part; int split_shift; };

extern "C" __global__ void spans(const __grid_constant__ Spans p) {
    const int piece = blockIdx.x >> p.split_shift;
    const long long part = blockIdx.x & ((1 << p.split_shift) - 1);
    const uint4* a = (const uint4*)p.src[piece] + part * p.vec_per_part;
    uint4* b = (uint4*)p.dst[piece] + part * p.vec_per_part;
    const long long n = p.vec_per_part;
    long long i = threadIdx.x;
    for (; i + 3 * blockDim.x < n; i += 4 * blockDim.x) {
        uint4 v0 = a[i], v1 = a[i + blockDim.x], v2 = a[i + 2 * blockDim.x], v3 = a[i + 3 * blockDim.x];
        b[i] = v0; b[i + blockDim.x] = v1; b[i + 2 * blockDim.x] = v2; b[i + 3 * blockDim.x] = v3;
    }
    for (; i < n; i += blockDim.x) b[i] = a[i];
}
"""

SPANS_DT = np.dtype([("src", np.uint64, 64), ("dst", np.uint64, 64), ("vpp", np.int64), ("split", np.int32),
                     ("pad", np.int32)])


def gbps(n: int, ms: float) -> float:
    return round(n / (ms * 1e-3) / 1e9, 1)


def main() -> None:
    wl = by_name("small")
    torch.cuda.set_device(0)
    src = []
    for _ in range(wl.layers):
        t = torch.empty(wl.shape, dtype=torch.bfloat16, device="cuda")
        t.view(torch.uint8).random_(0, 256)
        src.append(t)
    layout = KVLayout.from_tensors(src, block_dim=wl.block_dim)
    sb, db = wl.block_ids()
    n = wl.nbytes
    reps = 100
    res: dict = {"bytes": n}
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 256)
    b = torch.empty_like(a)
    res["device_copy_GBps"] = gbps(n, cuda_ms(lambda: b.copy_(a), reps))
    mod = cp.RawModule(code=SRC, options=("--std=c++17",))
    stream = lambda: cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)  # noqa: E731
    k_empty, k_contig = mod.get_function("empty"), mod.get_function("contig")
    for g in (64, 132, 264):
        res[f"empty_g{g}_us"] = round(cuda_ms(lambda: k_empty((g,), (256,), (np.int32(0),), stream=stream()), reps) * 1e3, 3)
    for g, th in ((128, 256), (256, 256), (512, 128), (256, 512), (1024, 128)):
        res[f"contig_g{g}x{th}_GBps"] = gbps(n, cuda_ms(lambda: k_contig((g,), (th,), (a.data_ptr(), b.data_ptr(), np.int64(n // 16)), stream=stream()), reps))
    # the gather: piece i = (layer i // 2, K or V) of block sb[0]
    out = torch.empty(n, dtype=torch.uint8, device="cuda")
    piece = n // (2 * wl.layers)
    srcs = [t.data_ptr() + kv * (t.numel() * 2 // 2) + int(sb[0]) * piece for t in src for kv in (0, 1)]
    fn = mod.get_function("spans")
    for split, th in ((1, 256), (2, 256), (2, 128), (3, 128), (3, 64)):
        p = np.zeros(1, dtype=SPANS_DT)
        p["src"][0, :] = srcs
        p["dst"][0, :] = [out.data_ptr() + i * piece for i in range(64)]
        p["vpp"] = piece // 16 >> split
        p["split"] = split
        blob = p.view(np.uint8)
        argv = np.array([blob.ctypes.data], dtype=np.uintp)

        def launch(split=split, th=th, argv=argv):
            cp.cuda.driver.launchKernel(fn.kernel.ptr, 64 << split, 1, 1, th, 1, 1, 0, torch.cuda.current_stream().cuda_stream,
                                        argv.ctypes.data, 0)

        out.zero_()
        launch()
        torch.cuda.synchronize()
        ref = torch.cat([t[:, int(sb[0])].reshape(2, -1).view(torch.uint8) for t in src]).reshape(-1)
        res[f"spans_s{split}x{th}_correct"] = bool(torch.equal(out, ref))
        res[f"spans_s{split}x{th}_GBps"] = gbps(n, cuda_ms(launch, reps))
    # shipped kernels
    dlay = KVLayout.from_tensors([torch.empty_like(t) for t in src], block_dim=wl.block_dim)
    plan = plan_transfer(layout.geometry, dlay.geometry, sb, db)
    g = ops.prepare_gather(plan, layout, out)
    res["jobs_gather_GBps"] = gbps(n, cuda_ms(lambda: g.launch(torch.cuda.current_stream()), reps))
    pg = prepare_pairs(plan.block_pairs, layout, out, buffer_side=2)
    res["pairs_inline_gather_GBps"] = gbps(n, cuda_ms(lambda: pg.launch(torch.cuda.current_stream()), reps))
    for k, v in list(res.items()):
        if k.endswith("GBps") and k != "device_copy_GBps":
            res[k.replace("GBps", "ratio")] = round(v / res["device_copy_GBps"], 3)
    print(json.dumps(res, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
