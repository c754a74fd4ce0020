"""Probe: where the host time of a ``small`` cuda_ipc transfer goes (GPU1 writes to GPU0).

Same two-process setup as ``bench/bench_ipc.py``. The consumer measures, for the ``small``
workload (1 block x 32 layers, 2 MiB): ``write().wait()`` end to end; the time until
``write()`` returns; the block-pair launch plus a stream sync alone on the calling thread
(the floor of one transfer); an empty event round trip; then a cProfile of 300 writes (top
functions by own time). Prints JSON and the profile; writes JSON to argv[1] when given.
"""

from __future__ import annotations

import cProfile
import io
import json
import multiprocessing as mp
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
from bench_ipc import _producer, connect_consumer  # noqa: E402


def _pct(xs, q):
    return round(float(np.percentile(np.asarray(xs) * 1e6, q)), 1)


def _timed(fn, n: int = 400) -> float:
    """p50 in us of ``fn()`` over ``n`` calls after 50 warm-up calls."""
    ts = []
    for i in range(n + 50):
        t0 = time.perf_counter()
        fn()
        if i >= 50:
            ts.append(time.perf_counter() - t0)
    return _pct(ts, 50)


def _breakdown(c, be, peer, src, dst, device: int) -> dict:
    """The stages of one ``write()`` on the calling thread, each timed alone (p50, us)."""
    import cupy as cp

    from kvxfer.backends.base import TransferRequest, plan_for_initiator
    from kvxfer.backends.cuda_ipc.endpoint import check_pairs_within as _check_pairs_within
    from kvxfer.handle import Op, TransferHandle
    from kvxfer.ops.pairs import resolve_block_pairs
    from kvxfer.plan import as_block_ids

    link = next(iter(be.links))
    req = TransferRequest(1, Op.WRITE, as_block_ids(src, "s"), as_block_ids(dst, "d"), c.layout.resolve_layers(None), None)
    plan = plan_for_initiator(c.layout, peer.metadata, req)
    bp = plan.block_pairs
    s = cp.cuda.Stream(non_blocking=True)
    out = {
        "request": _timed(lambda: TransferRequest(1, Op.WRITE, as_block_ids(src, "s"), as_block_ids(dst, "d"),
                                                  c.layout.resolve_layers(None), None)),
        "plan": _timed(lambda: plan_for_initiator(c.layout, peer.metadata, req)),
        "handle": _timed(lambda: TransferHandle(Op.WRITE, peer.name, plan.nbytes, "cuda_ipc", req.dst_blocks)),
        "bounds_checks": _timed(lambda: (_check_pairs_within(bp, "dst", link.remote_spans, "peer"),
                                         _check_pairs_within(bp, "src", be._local_spans, "local"))),
        "resolve": _timed(lambda: resolve_block_pairs(bp, be._local_addrs, link.remote_addrs, stream=s.ptr, device=device)),
    }
    launch = resolve_block_pairs(bp, be._local_addrs, link.remote_addrs, stream=s.ptr, device=device)
    out["launch"] = _timed(launch.enqueue)
    s.synchronize()
    ev = []
    out["wait_for_caller"] = _timed(lambda: be._wait_for_caller(ev))
    be._recycle(ev, [])
    e = cp.cuda.Event(disable_timing=True)
    out["event_record"] = _timed(lambda: e.record(s))
    out["write_returns_unwaited"] = _timed(lambda: c.write(peer, src, dst))  # completion thread finishes them
    c.write(peer, src, dst).wait(10)
    return out


def _in_situ(c, be, peer, src, dst, waited: bool, n: int = 400) -> dict:
    """Each stage of ``write()`` timed where it runs, inside real writes (completion thread
    and all), by wrapping the functions it calls; p50 in us, plus the whole ``write()``."""
    import kvxfer.backends.cuda_ipc.backend as ipc_mod
    import kvxfer.connector as conn_mod
    import kvxfer.ops.pairs as pairs_mod

    spans: dict[str, list[float]] = {}

    def wrap(owner, name, label):
        orig = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                spans.setdefault(label, []).append(time.perf_counter() - t0)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, orig)

    undo = [wrap(conn_mod, "plan_for_initiator", "plan"), wrap(conn_mod, "TransferHandle", "handle"),
            wrap(c._watchdog, "add", "watchdog"), wrap(be, "submit", "submit"),
            wrap(ipc_mod, "check_pairs_within", "bounds_check_each"), wrap(be, "_launch", "launch_total"),
            wrap(pairs_mod, "resolve_block_pairs", "resolve"), wrap(be, "_wait_for_caller", "wait_for_caller"),
            wrap(pairs_mod.PairsLaunch, "enqueue", "enqueue"), wrap(be._order, "add", "order_add")]
    total = []
    try:
        for i in range(n + 50):
            if i == 50:
                spans.clear()
            t0 = time.perf_counter()
            h = c.write(peer, src, dst)
            t1 = time.perf_counter()
            if waited:
                h.wait(10)
            if i >= 50:
                total.append(t1 - t0)
        h.wait(10)
    finally:
        for u in reversed(undo):
            u()
    out = {k: _pct(v, 50) for k, v in spans.items()}
    out["write_returns"] = _pct(total, 50)
    return out


def _consumer(conn, device: int, res: dict) -> None:
    import cupy as cp

    from kvxfer.ops.pairs import copy_block_pairs
    from kvxfer.plan import plan_transfer

    cp.cuda.Device(device).use()
    wl, c, peer, ts, _ = connect_consumer(conn, "small")
    be = c.backend("cuda_ipc")
    src, dst = wl.block_ids()
    out: dict = {}
    for _ in range(50):
        c.write(peer, src, dst).wait(10)
    e2e, submit = [], []
    for _ in range(500):
        t0 = time.perf_counter()
        h = c.write(peer, src, dst)
        t1 = time.perf_counter()
        h.wait(10)
        t2 = time.perf_counter()
        submit.append(t1 - t0)
        e2e.append(t2 - t0)
    out["write_e2e_p50_us"], out["write_e2e_p99_us"] = _pct(e2e, 50), _pct(e2e, 99)
    out["write_returns_p50_us"] = _pct(submit, 50)
    # the floor: plan + pair launch + sync on this thread, no connector, no completion thread
    link = next(iter(be.links))
    s = cp.cuda.Stream(non_blocking=True)
    lay = c.layout
    floor, launch_only = [], []
    for i in range(550):
        t0 = time.perf_counter()
        plan = plan_transfer(lay.geometry, link.peer.geometry, src, dst)
        copy_block_pairs(plan.block_pairs, lay.addrs, link.remote_addrs, stream=s, device=device)
        t1 = time.perf_counter()
        s.synchronize()
        t2 = time.perf_counter()
        if i >= 50:
            floor.append(t2 - t0)
            launch_only.append(t1 - t0)
    out["plan_launch_sync_p50_us"], out["plan_launch_p50_us"] = _pct(floor, 50), _pct(launch_only, 50)
    ev = []
    for i in range(550):
        e = cp.cuda.Event(disable_timing=True)
        t0 = time.perf_counter()
        e.record(s)
        e.synchronize()
        if i >= 50:
            ev.append(time.perf_counter() - t0)
    out["event_roundtrip_p50_us"] = _pct(ev, 50)
    out["breakdown_p50_us"] = _breakdown(c, be, peer, src, dst, device)
    out["in_situ_waited_p50_us"] = _in_situ(c, be, peer, src, dst, True)
    out["in_situ_unwaited_p50_us"] = _in_situ(c, be, peer, src, dst, False)
    # the same with blocking-sync completion events (the completion thread sleeps in the driver
    # instead of spinning while this thread launches)
    import kvxfer.backends.cuda_ipc.backend as ipc_mod

    ipc_mod._EVENT_DISABLE_TIMING = 0x03
    be._free_events.clear()
    e2e_b = []
    for i in range(550):
        t0 = time.perf_counter()
        c.write(peer, src, dst).wait(10)
        if i >= 50:
            e2e_b.append(time.perf_counter() - t0)
    out["blocking_sync_events_write_e2e_p50_us"] = _pct(e2e_b, 50)
    out["blocking_sync_in_situ_waited_p50_us"] = _in_situ(c, be, peer, src, dst, True)
    ipc_mod._EVENT_DISABLE_TIMING = 0x02
    be._free_events.clear()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        c.write(peer, src, dst).wait(10)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    out["profile_top"] = buf.getvalue()[-6000:]
    c.close()
    conn.send(("exit", None))
    res.update(out)


def main() -> int:
    ctx = mp.get_context("spawn")
    pc, cc = ctx.Pipe()
    res = ctx.Manager().dict()
    prod = ctx.Process(target=_producer, args=(pc, 0))
    cons = ctx.Process(target=_consumer, args=(cc, 1, res))
    prod.start()
    cons.start()
    cons.join(240)
    prod.join(20)
    for p in (cons, prod):
        if p.is_alive():
            p.kill()
    out = dict(res)
    prof = out.pop("profile_top", "")
    print(json.dumps(out, indent=1))
    print(prof)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({**out, "profile_top": prof}, f, indent=1)
    return 0 if out else 1


if __name__ == "__main__":
    sys.exit(main())
