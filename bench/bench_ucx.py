"""UCX backend benchmark: GB/s of paged-KV reads between two OS processes.

Host mode (CPU, loopback): the same workload over the TCP backend and over UCX (direct RMA
per range, packed, auto) in one run, so the ratios are comparable; also sweeps piece size to
show the direct/packed crossover that ``KVXFER_UCX_PACK_BELOW`` encodes.

    UCX_TLS=tcp python bench/bench_ucx.py host [--layers 8 --blocks 512 --moved 256]

GPU mode (device machine, 2 GPUs, ucxx wheels installed; see ../shared/BENCHMARKS.md):
``llama8b`` and ``llama8b-tp8`` GPU1 <- GPU0 through UCX (cuda_ipc), every byte checked,
against a contiguous peer ``cudaMemcpyAsync`` of the same bytes measured in the same run
(target >= 70%). Writes JSON under ``$OUT`` when set.

    UCX_TLS=tcp,sm,cuda_copy,cuda_ipc python bench/bench_ucx.py gpu --workload llama8b
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

WORKLOADS = {  # name: (layers, num_blocks, block_size, heads, head_dim, moved)
    "llama8b": (32, 2048, 16, 8, 128, 512),
    "llama8b-tp8": (32, 8192, 16, 1, 128, 4096),
}


def _tensors(layers, nb, bs, h, d, seed, device=None):
    if device is None:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, 2**16, (2, nb, bs, h, d), dtype=np.uint16) for _ in range(layers)]
    import cupy as cp

    with cp.cuda.Device(device):
        cp.random.seed(seed)
        return [cp.random.randint(0, 2**16, (2, nb, bs, h, d), dtype=cp.uint16) for _ in range(layers)]


def _trace_setup():
    # BENCH_TRACE=1: the UCX link logs where a packed transfer's time goes (both processes)
    if os.environ.get("BENCH_TRACE"):
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(process)d %(message)s")
        logging.getLogger("kvxfer.backends.ucx.link").setLevel(logging.DEBUG)


def _serve(conn, env, geom, seed, device):
    os.environ.update(env)
    _trace_setup()
    import kvxfer

    if device is not None:
        import cupy as cp

        cp.cuda.Device(device).use()
    ts = _tensors(*geom, seed=seed, device=device)
    with kvxfer.Connector("server", backend=env["BENCH_BACKEND"]) as c:
        c.register(ts, block_dim=1)
        conn.send(c.metadata())
        while True:
            cmd = conn.recv()
            if cmd[0] == "exit":
                return
            if cmd[0] == "blocks":  # checksum of selected blocks for verification
                ids = np.asarray(cmd[1])
                xp = np if device is None else __import__("cupy")
                conn.send([bytes(xp.asnumpy(t[:, xp.asarray(ids)]).tobytes()) if device is not None
                           else t[:, ids].tobytes() for t in ts])


def _mismatch(c, got, want) -> dict:
    """What a wrong read left: layers right / wrong, and whether the staging buffer (back in
    the pool) holds the stream the server sent."""
    out = {"layers_right": sum(g == w for g, w in zip(got, want)), "layers": len(want)}
    try:
        be = next(x for x in c._backends.values() if type(x).__name__ == "UcxBackend")
        stream = b"".join(want)
        staged = []
        for st in (be.memory._pool._free if be.memory._pool is not None else []):
            arr = st.array[: len(stream)]
            data = (arr.get() if hasattr(arr, "get") else arr).tobytes()
            staged.append("stream" if data == stream else f"differs at {next(i for i in range(0, len(stream), 4096) if data[i:i + 4096] != stream[i:i + 4096])}")
        out["staging"] = staged
        first_bad = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        g, w = got[first_bad], want[first_bad]
        bad = [i for i in range(0, len(w), 32768) if g[i:i + 32768] != w[i:i + 32768]]
        out["first_bad_layer"] = first_bad
        out["bad_32k_blocks_in_it"] = [len(bad), bad[:4]]
    except Exception as exc:  # diagnostics must not hide the failure
        out["diag_error"] = repr(exc)
    return out


def run_pair(backend, mode, geom, moved, iters, device_pair=None, depth=1):
    """Median GB/s of `iters` reads of `moved` random blocks, client <- server. ``depth`` reads
    (into disjoint destination blocks) are in flight at once: the sustained rate of a server
    with several requests moving, where one transfer's host work overlaps another's bytes."""
    env = {"BENCH_BACKEND": backend, "KVXFER_UCX_MODE": mode}
    os.environ.update({k: v for k, v in env.items() if k.startswith("KVXFER")})
    reset = os.environ.get("BENCH_RESET", "")  # diagnostics: start each pair from cleared caches / pool
    if "caches" in reset:
        import kvxfer.ops.pairs as _op
        import kvxfer.ops.runtime as _rt
        import kvxfer.plan as _pl

        _op._TEMPLATES.clear()
        _pl._PAIRS_BY_ID.clear()
        _pl._segment_pairs.cache_clear()
        _rt.reset()
    if "pool" in reset and device_pair is not None:
        import cupy as _cp

        import gc

        gc.collect()
        _cp.get_default_memory_pool().free_all_blocks()
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    srv_dev = None if device_pair is None else device_pair[0]
    p = ctx.Process(target=_serve, args=(b, env, geom, 1, srv_dev), daemon=True)
    p.start()
    _trace_setup()
    import kvxfer

    try:
        if not a.poll(120):
            raise RuntimeError("server did not start")
        meta = a.recv()
        dev = None if device_pair is None else device_pair[1]
        if dev is not None:
            import cupy as cp

            cp.cuda.Device(dev).use()
        ts = _tensors(*geom, seed=2, device=dev)
        with kvxfer.Connector("client", backend=backend) as c:
            c.register(ts, block_dim=1)
            peer = c.connect(meta)
            rng = np.random.default_rng(0)
            nb = geom[1]
            src = rng.choice(nb, moved, replace=False)
            dsts = rng.permutation(nb)[: moved * depth].reshape(depth, moved)
            dst = dsts[0]
            xp = np if dev is None else __import__("cupy")

            def blocks(d):
                return [(xp.asnumpy(t[:, xp.asarray(d)]) if dev is not None else t[:, d]).tobytes() for t in ts]

            c.read(peer, src, dst).wait(300)  # warm-up (registration, staging, kernels)
            a.send(("blocks", src.tolist()))
            want = a.recv()
            got = blocks(dst)
            if got != want:
                raise AssertionError(f"{backend}/{mode}: bytes differ: {_mismatch(c, got, want)}")
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                hs = [c.read(peer, src, d) for d in dsts]
                for h in hs:
                    h.wait(300)
                times.append(time.perf_counter() - t0)
            nbytes = hs[0].nbytes
            if depth > 1:  # every concurrent read landed whole
                for d in dsts[1:]:
                    got = [(xp.asnumpy(t[:, xp.asarray(d)]) if dev is not None else t[:, d]).tobytes() for t in ts]
                    if got != want:
                        raise AssertionError(f"{backend}/{mode}: bytes differ at depth {depth}")
        return depth * nbytes / statistics.median(times) / 1e9, nbytes
    finally:
        a.send(("exit",))
        p.join(20)
        if p.is_alive():
            p.kill()


def host(args):
    rows = []
    for piece_heads in args.heads:
        geom = (args.layers, args.blocks, 16, piece_heads, 128)
        piece = 16 * piece_heads * 128 * 2
        for backend, mode in [("tcp", "auto"), ("ucx", "direct"), ("ucx", "packed"), ("ucx", "auto")]:
            gbps, nbytes = run_pair(backend, mode, geom, args.moved, args.iters)
            rows.append({"piece_bytes": piece, "backend": backend, "mode": mode, "GBps": round(gbps, 3), "bytes": nbytes})
            print(f"piece {piece // 1024:>3} KiB  {backend:>3}/{mode:<6} {gbps:7.3f} GB/s  ({nbytes / 2**20:.0f} MiB)", flush=True)
    base = {r["piece_bytes"]: r["GBps"] for r in rows if r["backend"] == "tcp"}
    print("\nratio vs TCP backend, same run:")
    for r in rows:
        if r["backend"] == "ucx":
            print(f"  piece {r['piece_bytes'] // 1024:>3} KiB {r['mode']:<6} {r['GBps'] / base[r['piece_bytes']]:.2f}x")
    return {"mode": "host", "UCX_TLS": os.environ.get("UCX_TLS"), "rows": rows}


def _peer_memcpy_gbps(nbytes, src_dev, dst_dev, iters=10):
    import cupy as cp

    with cp.cuda.Device(src_dev):
        a = cp.random.randint(0, 255, nbytes, dtype=cp.uint8)
    with cp.cuda.Device(dst_dev):
        b = cp.empty(nbytes, dtype=cp.uint8)
        cp.cuda.runtime.deviceEnablePeerAccess(src_dev) if cp.cuda.runtime.deviceCanAccessPeer(dst_dev, src_dev) else None
        s = cp.cuda.Stream(non_blocking=True)
        ts = []
        for i in range(iters + 2):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(s)
            cp.cuda.runtime.memcpyPeerAsync(b.data.ptr, dst_dev, a.data.ptr, src_dev, nbytes, s.ptr)
            e1.record(s)
            e1.synchronize()
            if i >= 2:
                ts.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
    return nbytes / statistics.median(ts) / 1e9


def gpu(args):
    layers, nb, bs, h, d, moved = WORKLOADS[args.workload]
    geom = (layers, nb, bs, h, d)
    rows = []
    for mode in ("packed", "direct", "auto") if args.all_modes else ("auto",):
        for chunk in args.chunks or [None]:
            if chunk:
                os.environ["KVXFER_UCX_CHUNK_BYTES"] = str(chunk << 20)
            for depth in args.depth:
                if depth * moved > nb:
                    continue
                gbps, nbytes = run_pair("ucx", mode, geom, moved, args.iters, device_pair=(0, 1), depth=depth)
                rows.append({"mode": mode, "chunk_MiB": chunk, "depth": depth, "GBps": round(gbps, 1), "bytes": nbytes})
                print(f"{args.workload} ucx/{mode:<6} chunk {chunk or 'default'} MiB, {depth} in flight: {gbps:8.1f} GB/s",
                      flush=True)
    ceiling = _peer_memcpy_gbps(nbytes, 0, 1)
    print(f"contiguous peer memcpy GPU1 <- GPU0, same bytes: {ceiling:.1f} GB/s")
    for r in rows:
        r["ratio_vs_peer_memcpy"] = round(r["GBps"] / ceiling, 3)
        print(f"  {r['mode']:<6} chunk {r['chunk_MiB'] or 'default'} MiB, {r['depth']} in flight: "
              f"{r['ratio_vs_peer_memcpy']:.2%} of peer memcpy (target >= 70%)")
    return {"mode": "gpu", "workload": args.workload, "rows": rows, "peer_memcpy_GBps": round(ceiling, 1),
            "UCX_TLS": os.environ.get("UCX_TLS")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("host")
    h.add_argument("--layers", type=int, default=8)
    h.add_argument("--blocks", type=int, default=512)
    h.add_argument("--moved", type=int, default=256)
    h.add_argument("--heads", type=int, nargs="+", default=[8, 1], help="8 -> 32 KiB pieces, 1 -> 4 KiB")
    h.add_argument("--iters", type=int, default=5)
    g = sub.add_parser("gpu")
    g.add_argument("--workload", choices=sorted(WORKLOADS), default="llama8b")
    g.add_argument("--iters", type=int, default=10)
    g.add_argument("--all-modes", action="store_true")
    g.add_argument("--chunks", type=int, nargs="*", help="pipeline piece sizes to compare, MiB (KVXFER_UCX_CHUNK_BYTES)")
    g.add_argument("--depth", type=int, nargs="*", default=[1], help="reads in flight at once (disjoint destinations)")
    args = ap.parse_args(argv)
    res = host(args) if args.cmd == "host" else gpu(args)
    res.update({"date": time.strftime("%Y-%m-%d"), "argv": sys.argv})
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"bench_ucx_{args.cmd}.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
