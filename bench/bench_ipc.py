"""Benchmark of the cuda_ipc backend: GB/s against a contiguous peer cudaMemcpyAsync, and latency.

Two processes (spawn): a producer on GPU ``--src`` and a consumer on GPU ``--dst`` (default 0
and 1), each with a kvxfer Connector forced to cuda_ipc. For each workload of BENCHMARKS.md the
consumer pulls (``read``: reads peer memory) and pushes (``write``: writes peer memory) the
same blocks; kernel time comes from CUDA events around the launch on the backend's stream,
end-to-end time from ``read()``/``write()`` to the handle being done. In the same run the
consumer times a contiguous ``cudaMemcpyAsync`` of the same number of bytes from / to a peer
buffer mapped through CUDA IPC. ``small``: p50/p99 of host time from ``write()`` (and
``read()``) to handle done, with the planner's share measured alone.

    python bench/bench_ipc.py [--workloads llama8b,llama8b-tp8,small] [--iters 10]

Writes ``$OUT/ipc_bench.json`` (or ``--out``) with card, date, git commit and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np


def _med(xs):
    return float(np.median(np.asarray(xs)))


def _producer(conn, device: int) -> None:
    import cupy as cp

    import kvxfer
    from kvxfer.ops.workloads import by_name

    cp.cuda.Device(device).use()
    state: dict = {}
    while True:
        cmd, arg = conn.recv()
        if cmd == "exit":
            break
        _release(state, cp)
        wl = by_name(arg)
        n = int(np.prod(wl.shape))
        ts = []
        for l in range(wl.layers):  # arbitrary non-zero contents (never time on zeros)
            i = cp.arange(n, dtype=cp.uint32)
            ts.append(((i * cp.uint32(2654435761)) ^ cp.uint32(l * 7919 + 1)).astype(cp.int16).reshape(wl.shape))
        big = cp.cuda.runtime.malloc(wl.nbytes)  # its own allocation: the contiguous peer-copy baseline
        cp.cuda.runtime.memset(big, 1, wl.nbytes)
        cp.cuda.Device(device).synchronize()
        c = kvxfer.Connector("producer", backend="cuda_ipc")
        c.register(ts, block_dim=wl.block_dim)
        state.update(conn=c, ts=ts, big=big)
        conn.send((c.metadata(), bytes(cp.cuda.runtime.ipcGetMemHandle(big))))
    _release(state, cp)


def _release(state: dict, cp) -> None:
    if state.get("conn") is not None:
        state["conn"].close()
    if state.get("big"):
        cp.cuda.runtime.free(state["big"])
    state.clear()
    cp.get_default_memory_pool().free_all_blocks()


def connect_consumer(conn, name: str):
    """Consumer side of one workload: ask the producer (over ``conn``) to set it up, register
    zeroed tensors and connect through cuda_ipc. Returns (workload, connector, peer, tensors,
    the producer's contiguous buffer's IPC handle)."""
    import cupy as cp

    import kvxfer
    from kvxfer.ops.workloads import by_name

    wl = by_name(name)
    conn.send(("setup", name))
    md, big_handle = conn.recv()
    ts = [cp.zeros(wl.shape, dtype=cp.int16) for _ in range(wl.layers)]
    c = kvxfer.Connector("consumer", backend="cuda_ipc")
    c.register(ts, block_dim=wl.block_dim)
    return wl, c, c.connect(md), ts, big_handle


def _consumer(conn, device: int, names: list[str], iters: int, res: dict) -> None:
    import cupy as cp

    from kvxfer.backends.cuda_ipc import handles as ipc
    from kvxfer.backends.base import TransferRequest, plan_for_initiator
    from kvxfer.handle import Op
    from kvxfer.plan import as_block_ids

    cp.cuda.Device(device).use()
    rt = cp.cuda.runtime
    out: dict = {}
    for name in names:
        wl, c, peer, ts, big_handle = connect_consumer(conn, name)
        be = c.backend("cuda_ipc")
        src, dst = wl.block_ids()
        r: dict = {"bytes": wl.nbytes, "pieces": int(wl.layers * wl.moved * (2 if wl.block_dim == 1 else 1))}
        if name == "small":
            lat: dict = {}
            for op in ("write", "read"):
                fn = c.write if op == "write" else c.read
                ts_ = []
                for i in range(iters * 30 + 20):
                    t0 = time.perf_counter()
                    fn(peer, src, dst).wait(10)
                    if i >= 20:
                        ts_.append(time.perf_counter() - t0)
                a = np.asarray(ts_) * 1e6
                lat[f"{op}_p50_us"] = round(float(np.percentile(a, 50)), 1)
                lat[f"{op}_p99_us"] = round(float(np.percentile(a, 99)), 1)
            req = TransferRequest(0, Op.WRITE, as_block_ids(src, "s"), as_block_ids(dst, "d"), None, None)
            pt = []
            for _ in range(200):
                t0 = time.perf_counter()
                plan_for_initiator(c.layout, peer.metadata, req)
                pt.append(time.perf_counter() - t0)
            lat["plan_only_p50_us"] = round(_med(pt) * 1e6, 1)
            r.update(lat)
        else:
            be.record_device_time = True
            for op in ("pull", "push"):
                fn = c.read if op == "pull" else c.write
                wall = []
                be.device_times.clear()
                for i in range(iters + 2):
                    t0 = time.perf_counter()
                    fn(peer, src, dst).wait(60)
                    if i >= 2:
                        wall.append(time.perf_counter() - t0)
                dev = list(be.device_times)[2:]
                r[f"{op}_kernel_GBps"] = round(wl.nbytes / _med(dev) / 1e9, 1)
                r[f"{op}_end_to_end_GBps"] = round(wl.nbytes / _med(wall) / 1e9, 1)
                r[f"{op}_end_to_end_ms"] = round(_med(wall) * 1e3, 2)
            be.record_device_time = False
            # contiguous baseline: the same bytes in one cudaMemcpyAsync from / to a mapped peer buffer
            rptr, _ = ipc.open_handle(big_handle, device)
            local = cp.cuda.alloc(wl.nbytes)
            s = cp.cuda.Stream(non_blocking=True)
            for op in ("pull", "push"):
                d_, s_ = (int(local.ptr), rptr) if op == "pull" else (rptr, int(local.ptr))
                times = []
                for i in range(iters + 2):
                    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                    e0.record(s)
                    rt.memcpyAsync(d_, s_, wl.nbytes, 3, s.ptr)
                    e1.record(s)
                    e1.synchronize()
                    if i >= 2:
                        times.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
                r[f"{op}_contig_memcpy_GBps"] = round(wl.nbytes / _med(times) / 1e9, 1)
                r[f"{op}_ratio_vs_memcpy"] = round(r[f"{op}_kernel_GBps"] / r[f"{op}_contig_memcpy_GBps"], 3)
            del local
            ipc.release_handle(big_handle)
            # host-side planning share of the end-to-end time
            req = TransferRequest(0, Op.READ, as_block_ids(src, "s"), as_block_ids(dst, "d"), None, None)
            t0 = time.perf_counter()
            plan_for_initiator(c.layout, peer.metadata, req)
            r["plan_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        out[name] = r
        print(name, json.dumps(r), flush=True)
        c.close()
        del ts
        cp.get_default_memory_pool().free_all_blocks()
    conn.send(("exit", None))
    res.update(out)


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _card(device: int) -> str:
    import cupy as cp

    p = cp.cuda.runtime.getDeviceProperties(device)
    return p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="llama8b,llama8b-tp8,llama70b-tp8,mla,small")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--src", type=int, default=0)
    ap.add_argument("--dst", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None, help="git commit to record (when the tree has no .git)")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    pc, cc = ctx.Pipe()
    res = ctx.Manager().dict()
    prod = ctx.Process(target=_producer, args=(pc, a.src))
    cons = ctx.Process(target=_consumer, args=(cc, a.dst, a.workloads.split(","), a.iters, res))
    prod.start()
    cons.start()
    cons.join(400)
    prod.join(20)
    for p in (cons, prod):
        if p.is_alive():
            p.kill()
    out = {
        "bench": "bench_ipc",
        "card": _card(a.dst),
        "gpus": f"producer cuda:{a.src}, consumer cuda:{a.dst}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": a.commit or _git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "results": dict(res),
    }
    text = json.dumps(out, indent=1)
    print(text)
    path = a.out or (os.path.join(os.environ["OUT"], "ipc_bench.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            f.write(text)
    print("\nworkload       pull GB/s (ratio)   push GB/s (ratio)   e2e pull/push ms")
    for k, r in out["results"].items():
        if "pull_kernel_GBps" in r:
            print(f"{k:14s} {r['pull_kernel_GBps']:7.1f} ({r['pull_ratio_vs_memcpy']:.3f})   "
                  f"{r['push_kernel_GBps']:7.1f} ({r['push_ratio_vs_memcpy']:.3f})   "
                  f"{r['pull_end_to_end_ms']:.1f}/{r['push_end_to_end_ms']:.1f}")
        else:
            print(f"{k:14s} write p50/p99 {r.get('write_p50_us')}/{r.get('write_p99_us')} us, "
                  f"read p50/p99 {r.get('read_p50_us')}/{r.get('read_p99_us')} us, plan alone {r.get('plan_only_p50_us')} us")
    return 0 if res else 1


if __name__ == "__main__":
    sys.exit(main())
