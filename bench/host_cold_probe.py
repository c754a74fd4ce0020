"""Probe: the host steps of a packed UCX transfer, hot (back to back) against after an idle gap.

The UCX traces show the responder's decode/plan/record steps 2-4x slower inside a transfer
than in a loop on the same machine. This times, on GPU0, the responder's first steps (plan,
PairPieces records + upload, first gather launch, its sync) run back to back, after a 5 or
50 ms sleep or busy-wait, and on a thread woken through a queue (the work thread's shape;
blocking or spinning on the queue), alone and with a polling UCX connector in the process.
Medians in microseconds; JSON to $OUT/cold_<workload>.json.

    python3 bench/host_cold_probe.py [llama8b | llama8b-tp8]
"""
import os, sys, time, threading, queue, statistics as st, json
sys.path.insert(0, ".")
import numpy as np, cupy as cp
cp.cuda.Device(0).use()
from kvxfer.layout import KVLayout
from kvxfer.plan import plan_transfer
from kvxfer.ops.workloads import by_name
from kvxfer.ops.pairs import PairPieces, BUF_DST
w = by_name(sys.argv[1] if len(sys.argv) > 1 else "llama8b")
ts_ = [cp.empty(w.shape, dtype=cp.uint16) for _ in range(w.layers)]
lay = KVLayout.from_tensors(ts_, block_dim=w.block_dim)
buf = cp.empty(1 << 30, dtype=cp.uint8)
s, d = w.block_ids()
stream = cp.cuda.Stream(non_blocking=True)

def steps():
    t = [time.perf_counter()]
    plan = plan_transfer(lay.geometry, lay.geometry, s, d); t.append(time.perf_counter())
    pp = PairPieces(plan.block_pairs, lay, int(buf.data.ptr), buffer_side=BUF_DST, bounds=[(0, 8), (8, 64)], stream=stream, device=0)
    t.append(time.perf_counter())
    pp.launch(0); t.append(time.perf_counter())
    stream.synchronize(); t.append(time.perf_counter())
    return np.diff(t) * 1e6

def caller(gap, n=40, spin=False):
    r = []
    for _ in range(n):
        if gap and spin:
            end = time.perf_counter() + gap
            while time.perf_counter() < end:
                pass
        elif gap: time.sleep(gap)
        r.append(steps())
    return np.median(np.array(r), axis=0).round(1).tolist()

def woken(gap, n=40, spin=False):
    q, out = queue.SimpleQueue(), queue.SimpleQueue()
    def loop():
        while True:
            if spin:
                while True:
                    try:
                        t0 = q.get_nowait(); break
                    except queue.Empty:
                        time.sleep(0)
            else:
                t0 = q.get()
            if t0 is None: return
            wake = (time.perf_counter() - t0) * 1e6
            out.put([wake, *steps()])
    th = threading.Thread(target=loop, daemon=True); th.start()
    r = []
    for _ in range(n):
        time.sleep(gap)
        q.put(time.perf_counter()); r.append(out.get())
    q.put(None); th.join()
    return np.median(np.array(r), axis=0).round(1).tolist()

res = {}
def run(tag):
    res[tag] = {"hot [plan, pieces, launch, sync]": caller(0), "gap 5ms sleep": caller(0.005),
                "gap 5ms spin": caller(0.005, spin=True), "gap 50ms spin": caller(0.05, spin=True),
                "woken thread gap 5ms [wake, plan, pieces, launch, sync]": woken(0.005),
                "woken thread spinning on the queue, gap 5ms": woken(0.005, spin=True),
                "woken thread spinning on the queue, gap 50ms": woken(0.05, spin=True)}
    print(tag, json.dumps(res[tag], indent=1), flush=True)
caller(0, 10)
run("alone")
import kvxfer
c = kvxfer.Connector("x", backend="ucx"); c.register(ts_, block_dim=1)
time.sleep(0.3)
run("with polling ucx connector")
c.close()
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), f"cold_{w.name}.json"), "w"), indent=1)
