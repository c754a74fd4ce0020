"""Gather / scatter bandwidth of kvxfer's one-launch kernel on the standard workloads.

For every workload of BENCHMARKS.md, in the same run on the same card: the ceiling, the fastest
of three ways to copy the same number of bytes on the device (``copy_`` inside a CUDA graph,
``copy_`` outside one, and a plain vectorized copy kernel built by kvxfer's NVRTC loader; the
winner is named), ``torch.index_select`` per layer (the baseline), and kvxfer's gather and
scatter (jobs prepared on the GPU, then launched). Times are CUDA-event medians over >= 10
samples after warm-up; each sample replays a CUDA graph of ``reps`` calls (the eager ``copy_``:
``reps`` calls between two events), so small transfers are not measured as Python launch
overhead (for ``small`` the repeated 2 MiB stays in L2 for every contender alike). Ratios to
"device copy" divide by the ceiling. Also reported: host time to prepare jobs, and the wall
time of a one-shot ``gather()`` (resolve + upload + launch + sync).

Usage: python bench/bench_pack.py [OUT_JSON] [--commit SHA] [--workloads a,b] [--variants]
Writes JSON to OUT_JSON, else $OUT/pack_<card>_<date>.json, else the current directory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvxfer.layout import KVLayout  # noqa: E402
from kvxfer.ops import cuda as ops  # noqa: E402
from kvxfer.ops.loader import KernelSpec, arch_of, compile_cubin  # noqa: E402
from kvxfer.ops.runtime import device_runtime  # noqa: E402
from kvxfer.ops.workloads import STANDARD  # noqa: E402
from kvxfer.plan import plan_transfer  # noqa: E402

SAMPLES = 15
WARMUP = 3

def _spec(**defines: int) -> KernelSpec:
    return KernelSpec("kv_copy.cu", "kv_copy_jobs", tuple(sorted(defines.items())))


VARIANTS = {
    "default": ops.KERNEL,
    "stream_hint": _spec(KVX_STREAMING=1),
    "mb3u4": _spec(KVX_MIN_BLOCKS=3, KVX_UNROLL=4),
    "t128u16": _spec(KVX_THREADS=128, KVX_MIN_BLOCKS=2, KVX_UNROLL=16),
    "mb1u8": _spec(KVX_MIN_BLOCKS=1),
}


def cuda_ms(fn, reps: int) -> float:
    """Median milliseconds per call of ``fn`` (graph of ``reps`` calls, CUDA events)."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        fn()
        with torch.cuda.graph(graph, stream=side):
            for _ in range(reps):
                fn()
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(SAMPLES):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return statistics.median(times)


def cuda_ms_eager(fn, reps: int) -> float:
    """Median milliseconds per call of ``fn``, ``reps`` calls queued between two CUDA events."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(SAMPLES):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


# A plain copy: 16-byte vectors, four loads in flight per thread before their stores, a
# grid-stride loop; the bytes past the last whole vector are copied one per thread.
_COPY_SRC = r"""
extern "C" __global__ void __launch_bounds__(256)
bench_copy(const uint4* __restrict__ src, uint4* __restrict__ dst, long long n16,
           const unsigned char* __restrict__ s8, unsigned char* __restrict__ d8, long long n) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long nth = (long long)gridDim.x * blockDim.x;
    long long i = tid;
    for (; i + 3 * nth < n16; i += 4 * nth) {
        const uint4 a = __ldg(src + i), b = __ldg(src + i + nth);
        const uint4 c = __ldg(src + i + 2 * nth), d = __ldg(src + i + 3 * nth);
        dst[i] = a; dst[i + nth] = b; dst[i + 2 * nth] = c; dst[i + 3 * nth] = d;
    }
    for (; i < n16; i += nth) dst[i] = __ldg(src + i);
    const long long tail = n16 * 16 + tid;
    if (tail < n) d8[tail] = s8[tail];
}
"""
_copy_kernel = None


def copy_kernel():
    """The plain copy kernel (a ``cupy.RawFunction``) on the current device, built once."""
    global _copy_kernel
    if _copy_kernel is None:
        import tempfile

        import cupy

        dev = torch.cuda.current_device()
        arch = arch_of(dev)
        cubin = compile_cubin(_COPY_SRC, "bench_copy.cu", ("--std=c++17", f"--gpu-architecture={arch}"))
        suffix = ".ptx" if arch.startswith("compute_") else ".cubin"
        # kept until exit: CuPy may load a module from its file lazily, per device
        with tempfile.NamedTemporaryFile(prefix="kvxfer_bench_copy", suffix=suffix, delete=False) as f:
            f.write(cubin)
        with cupy.cuda.Device(dev):
            _copy_kernel = cupy.RawModule(path=f.name).get_function("bench_copy")
            _copy_kernel.attributes  # loads it now, so a bad build fails here
    return _copy_kernel


def ceiling(n: int, reps: int) -> dict:
    """The fastest device copy of ``n`` bytes, GB/s: ``copy_`` in a graph, ``copy_`` eager and
    the plain copy kernel at a few grid sizes (one to 16 CTAs of 256 threads per SM)."""
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 256)
    b = torch.empty_like(a)
    dev = torch.cuda.current_device()
    rt = device_runtime(dev)
    fn = copy_kernel()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    n16 = n // 16
    args = (np.uint64(a.data_ptr()), np.uint64(b.data_ptr()), np.int64(n16), np.uint64(a.data_ptr()),
            np.uint64(b.data_ptr()), np.int64(n))

    def kernel(grid):
        def launch():
            fn((grid,), (256,), args, stream=rt.stream(torch.cuda.current_stream().cuda_stream))
        return launch

    ways = {"copy_graph": gbps(n, cuda_ms(lambda: b.copy_(a), reps)),
            "copy_eager": gbps(n, cuda_ms_eager(lambda: b.copy_(a), reps))}
    grids = {}
    for per_sm in (1, 2, 4, 8, 16):
        grid = max(1, min(sms * per_sm, -(-n16 // 256)))
        if grid not in grids.values():
            grids[per_sm] = grid
    by_grid = {per_sm: gbps(n, cuda_ms(kernel(grid), reps)) for per_sm, grid in grids.items()}
    best_grid = max(by_grid, key=by_grid.get)
    b.zero_()
    kernel(grids[best_grid])()
    torch.cuda.synchronize()
    assert torch.equal(a, b), "the plain copy kernel copied the wrong bytes"
    ways["copy_kernel"] = by_grid[best_grid]
    best = max(ways, key=ways.get)
    del a, b
    return {**{f"{k}_GBps": v for k, v in ways.items()}, "copy_kernel_ctas_per_sm": best_grid,
            "copy_kernel_by_ctas_per_sm": by_grid, "best": best, "GBps": ways[best]}


def wall_ms(fn, n: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def gbps(nbytes: int, ms: float) -> float:
    return round(nbytes / (ms * 1e-3) / 1e9, 1)


def run_workload(wl, variants: dict[str, KernelSpec]) -> dict:
    src = []
    for _ in range(wl.layers):
        t = torch.empty(wl.shape, dtype=torch.bfloat16, device="cuda")
        t.view(torch.uint8).random_(0, 256)
        src.append(t)
    dst = [torch.empty_like(t) for t in src]
    layout = KVLayout.from_tensors(src, block_dim=wl.block_dim)
    dlayout = KVLayout.from_tensors(dst, block_dim=wl.block_dim)
    sb, db = wl.block_ids()
    t0 = time.perf_counter()
    plan = plan_transfer(layout.geometry, dlayout.geometry, sb, db)
    plan_ms = (time.perf_counter() - t0) * 1e3
    n = plan.nbytes
    assert n == wl.nbytes, (n, wl.nbytes)
    reps = max(1, min(100, (512 << 20) // n))
    out = torch.empty(n, dtype=torch.uint8, device="cuda")
    buf = torch.empty(n, dtype=torch.uint8, device="cuda")
    buf.random_(0, 256)
    res: dict = {"bytes": n, "jobs": int(plan.jobs.size), "reps_per_sample": reps, "plan_ms": round(plan_ms, 2)}

    res["ceiling"] = ceiling(n, reps)
    res["device_copy_GBps"] = res["ceiling"]["GBps"]  # the fastest device copy of the same bytes

    sel = torch.as_tensor(sb, device="cuda")
    isel = torch.empty((wl.layers,) + tuple(len(sb) if i == wl.block_dim else s for i, s in enumerate(wl.shape)),
                       dtype=torch.bfloat16, device="cuda")

    def index_select():
        for layer in range(wl.layers):
            torch.index_select(src[layer], wl.block_dim, sel, out=isel[layer])

    res["index_select_GBps"] = gbps(n, cuda_ms(index_select, reps))

    for vname, spec in variants.items():
        t0 = time.perf_counter()
        g = ops.prepare_gather(plan, layout, out, spec=spec)
        prep_ms = (time.perf_counter() - t0) * 1e3
        s = ops.prepare_scatter(plan, buf, dlayout, spec=spec)
        g_ms = cuda_ms(lambda: g.launch(torch.cuda.current_stream()), reps)
        s_ms = cuda_ms(lambda: s.launch(torch.cuda.current_stream()), reps)
        res[f"{vname}"] = {"gather_GBps": gbps(n, g_ms), "scatter_GBps": gbps(n, s_ms), "ctas": g.ctas,
                           "warps": g.warps, "prepare_ms": round(prep_ms, 2)}
        if vname == "default":
            # sanity: the gather equals index_select's bytes (stream order: per layer, block, K/V)
            out.zero_()
            g.launch(torch.cuda.current_stream())
            torch.cuda.synchronize()
            index_select()
            if len(wl.shape) == 5:
                want = isel.view(wl.layers, 2, len(sb), -1).transpose(1, 2).reshape(-1)
            else:
                want = isel.reshape(-1)
            res["gather_matches_index_select"] = bool(torch.equal(out.view(torch.int16), want.view(torch.int16)))
            res["oneshot_gather_wall_ms"] = round(wall_ms(lambda: ops.gather(plan, layout, out)), 3)
        g.close()
        s.close()
    # the block-pair kernel (addresses computed on the GPU from block ids; what ops.gather and
    # ops.scatter use for plans between layouts of one block structure)
    from kvxfer.ops.pairs import BUF_DST, BUF_SRC, prepare_pairs

    t0 = time.perf_counter()
    pg = prepare_pairs(plan.block_pairs, layout, out, buffer_side=BUF_DST)
    prep_ms = (time.perf_counter() - t0) * 1e3
    ps = prepare_pairs(plan.block_pairs, buf, dlayout, buffer_side=BUF_SRC)
    res["pairs"] = {"gather_GBps": gbps(n, cuda_ms(lambda: pg.launch(torch.cuda.current_stream()), reps)),
                    "scatter_GBps": gbps(n, cuda_ms(lambda: ps.launch(torch.cuda.current_stream()), reps)),
                    "prepare_ms": round(prep_ms, 2), "records_inline": pg.inline}
    if pg.inline:  # the same copy with its records uploaded to device memory, for comparison
        pu = prepare_pairs(plan.block_pairs, layout, out, buffer_side=BUF_DST, inline=False)
        su = prepare_pairs(plan.block_pairs, buf, dlayout, buffer_side=BUF_SRC, inline=False)
        res["pairs_uploaded"] = {"gather_GBps": gbps(n, cuda_ms(lambda: pu.launch(torch.cuda.current_stream()), reps)),
                                 "scatter_GBps": gbps(n, cuda_ms(lambda: su.launch(torch.cuda.current_stream()), reps))}
        del pu, su
    ref = out.clone()
    ref.zero_()
    ops.prepare_gather(plan, layout, ref).launch(torch.cuda.current_stream())
    out.fill_(7)
    pg.launch(torch.cuda.current_stream())
    torch.cuda.synchronize()
    res["pairs"]["gather_matches_jobs_kernel"] = bool(torch.equal(out, ref))
    res["pairs"]["oneshot_gather_wall_ms"] = round(wall_ms(lambda: ops.gather(plan, layout, out)), 3)
    pg2 = prepare_pairs(plan.block_pairs, layout, out, buffer_side=BUF_DST, rows_inner=False)
    ps2 = prepare_pairs(plan.block_pairs, buf, dlayout, buffer_side=BUF_SRC, rows_inner=False)
    res["pairs_rows_outer"] = {"gather_GBps": gbps(n, cuda_ms(lambda: pg2.launch(torch.cuda.current_stream()), reps)),
                               "scatter_GBps": gbps(n, cuda_ms(lambda: ps2.launch(torch.cuda.current_stream()), reps))}
    del ref, pg, ps, pg2, ps2
    d = res["default"]
    res["gather_vs_device_copy"] = round(d["gather_GBps"] / res["device_copy_GBps"], 3)
    res["scatter_vs_device_copy"] = round(d["scatter_GBps"] / res["device_copy_GBps"], 3)
    res["gather_vs_index_select"] = round(d["gather_GBps"] / res["index_select_GBps"], 2)
    # what ops.gather / ops.scatter run for these plans (same block structure on both sides)
    p = res["pairs"]
    res["pairs_gather_vs_device_copy"] = round(p["gather_GBps"] / res["device_copy_GBps"], 3)
    res["pairs_scatter_vs_device_copy"] = round(p["scatter_GBps"] / res["device_copy_GBps"], 3)
    res["pairs_gather_vs_index_select"] = round(p["gather_GBps"] / res["index_select_GBps"], 2)
    del src, dst, out, buf, isel
    torch.cuda.empty_cache()
    return res


def _commit(arg: str | None) -> str:
    if arg:
        return arg
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="JSON path (default $OUT/pack_<card>_<date>.json)")
    ap.add_argument("--commit")
    ap.add_argument("--workloads", default=",".join(w.name for w in STANDARD))
    ap.add_argument("--variants", action="store_true", help="also time kernel build variants")
    args = ap.parse_args(argv)
    card = torch.cuda.get_device_name()
    date = _dt.date.today().isoformat()
    variants = VARIANTS if args.variants else {"default": VARIANTS["default"]}
    results = {
        "card": card,
        "date": date,
        "commit": _commit(args.commit),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "cupy": __import__("cupy").__version__,
        "python": platform.python_version(),
        "samples": SAMPLES,
        "workloads": {},
    }
    names = args.workloads.split(",")
    for wl in STANDARD:
        if wl.name in names:
            results["workloads"][wl.name] = run_workload(wl, variants)
            print(wl.name, json.dumps(results["workloads"][wl.name]), flush=True)
    slug = card.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / f"pack_{slug}_{date}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\n{card}, {date}, GB/s of payload; dcopy = the fastest device copy of the same bytes")
    print("ceiling: copy_ in a graph / copy_ eager / plain copy kernel -> the best (its CTAs per SM)")
    for name, r in results["workloads"].items():
        c = r["ceiling"]
        print(f"{name:14} {c['copy_graph_GBps']:7.0f} {c['copy_eager_GBps']:7.0f} {c['copy_kernel_GBps']:7.0f}"
              f"  -> {c['best']} ({c['copy_kernel_ctas_per_sm']})")
    print("job-record kernel (default): gather / scatter, ratios to dcopy and index_select")
    print(f"{'workload':14} {'dcopy':>7} {'isel':>7} {'gather':>7} {'scatter':>7} {'g/dc':>6} {'s/dc':>6} {'g/isel':>6}")
    for name, r in results["workloads"].items():
        d = r["default"]
        print(f"{name:14} {r['device_copy_GBps']:7.0f} {r['index_select_GBps']:7.0f} {d['gather_GBps']:7.0f} "
              f"{d['scatter_GBps']:7.0f} {r['gather_vs_device_copy']:6.2f} {r['scatter_vs_device_copy']:6.2f} "
              f"{r['gather_vs_index_select']:6.1f}")
    print("block-pair kernel (pairs): gather / scatter GB/s, ratio to device copy")
    for name, r in results["workloads"].items():
        pr = r["pairs"]
        print(f"{name:14} {pr['gather_GBps']:7.0f} {pr['scatter_GBps']:7.0f} {pr['gather_GBps'] / r['device_copy_GBps']:6.2f} "
              f"{pr['scatter_GBps'] / r['device_copy_GBps']:6.2f}  matches jobs kernel: {pr['gather_matches_jobs_kernel']}"
              f"  (rows outer: {r['pairs_rows_outer']['gather_GBps']:.0f} / {r['pairs_rows_outer']['scatter_GBps']:.0f})"
              + (f"  inline; uploaded: {r['pairs_uploaded']['gather_GBps']:.0f} / {r['pairs_uploaded']['scatter_GBps']:.0f}"
                 if "pairs_uploaded" in r else ""))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
