"""Registry matching throughput and latency: publish + pull (+ complete), metadata only.

64 clients by default (32 producer/consumer pairs) spread over worker processes, on loopback,
against the embedded server (run in this process's background thread) and a throw-away
redis-server. Each pair loops: the consumer starts ``pull(rid)``, the producer publishes rid,
the consumer gets its claim (match latency = publish start -> claim), then completes it (the
producer is told). Prints one JSON line per backend; exits non-zero when the embedded server
misses the target (>= 5,000 matches/s, p99 < 5 ms) and ``--check`` is given.

    python bench/bench_registry.py [--clients 64] [--seconds 5] [--procs 2] [--backend both] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def _worker(url: str, wid: int, pairs: int, seconds: float, start_at: float, out: mp.Queue) -> None:
    from kvxfer.registry.client import connect_registry_async

    async def main() -> None:
        prods = [await connect_registry_async(url, name=f"p{wid}-{i}") for i in range(pairs)]
        cons = [await connect_registry_async(url, name=f"c{wid}-{i}") for i in range(pairs)]
        for c in prods + cons:
            await c.register(b"x" * 200, 10.0)
        lat: list[float] = []
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = time.perf_counter() + seconds
        blocks = list(range(16))

        async def pair(i: int) -> None:
            p, c = prods[i], cons[i]
            n = 0
            while time.perf_counter() < end:
                rid = f"{wid}-{i}-{n}"
                n += 1
                pull = asyncio.ensure_future(c.pull(rid, 5.0))
                t0 = time.perf_counter()
                await p.publish(rid, blocks, 30.0)
                await pull
                lat.append(time.perf_counter() - t0)
                await c.complete(rid)
        t0 = time.perf_counter()
        await asyncio.gather(*(pair(i) for i in range(pairs)))
        elapsed = time.perf_counter() - t0
        for c in prods + cons:
            await c.close()
        out.put((len(lat), elapsed, lat))

    asyncio.run(main())


def run(url: str, clients: int, seconds: float, procs: int) -> dict:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    pairs_total = clients // 2
    split = [pairs_total // procs + (1 if i < pairs_total % procs else 0) for i in range(procs)]
    start_at = time.time() + 3.0  # every worker connected and registered before the clock starts
    ps = [ctx.Process(target=_worker, args=(url, w, n, seconds, start_at, q)) for w, n in enumerate(split) if n]
    for p in ps:
        p.start()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    results = [q.get(timeout=seconds + 60) for _ in ps]
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    for p in ps:
        p.join(30)
    matches = sum(r[0] for r in results)
    elapsed = max(r[1] for r in results)
    lat = np.array([x for r in results for x in r[2]]) * 1e3
    return {
        "clients": clients, "procs": len(ps), "seconds": round(elapsed, 2), "matches": matches,
        "matches_per_s": round(matches / elapsed), "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3), "max_ms": round(float(lat.max()), 3),
        # CPU of this process while the workers ran (the embedded server's thread lives here)
        "this_process_cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    ap.add_argument("--backend", choices=["kvxfer", "redis", "both"], default="both")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting redis-server")
    ap.add_argument("--check", action="store_true", help="exit 1 if the embedded server misses the target")
    args = ap.parse_args()
    ok = True
    if args.backend in ("kvxfer", "both"):
        from kvxfer.registry.server import RegistryServer
        with RegistryServer() as srv:
            res = run(srv.url, args.clients, args.seconds, args.procs)
        res["backend"] = "kvxfer"
        print(json.dumps(res), flush=True)
        ok = res["matches_per_s"] >= 5000 and res["p99_ms"] < 5.0
    if args.backend in ("redis", "both"):
        url, proc = args.redis_url, None
        if url is None:
            binary = shutil.which("redis-server")
            if binary is None:
                print(json.dumps({"backend": "redis", "skipped": "redis-server not found"}))
                return 0 if ok or not args.check else 1
            port = _free_port()
            proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", tempfile.mkdtemp()], stdout=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
            time.sleep(0.5)
        try:
            res = run(url, args.clients, args.seconds, args.procs)
            res["backend"] = "redis"
            print(json.dumps(res), flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
