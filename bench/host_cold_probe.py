"""Probe: the host steps of a packed UCX transfer, hot (back to back) against after an idle gap.

The UCX traces show the responder's decode/plan/record steps 2-4x slower inside a transfer
than in a loop on the same machine. This times, on GPU0, the responder's first steps (plan,
PairPieces records + upload, first gather launch, its sync) run back to back, after a 5 or
50 ms sleep or busy-wait, and on a thread woken through a queue (the work thread's shape;
blocking or spinning on the queue), alone and with a polling UCX connector in the process.
Medians in microseconds; JSON to $OUT/cold_<workload>.json.

    python3 bench/host_cold_probe.py [llama8b | llama8b-tp8]
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable

import cupy as cp
import numpy as np

import kvxfer
from kvxfer.layout import KVLayout
from kvxfer.ops.pairs import BUF_DST, PairPieces
from kvxfer.ops.workloads import by_name
from kvxfer.plan import plan_transfer

Steps = Callable[[], np.ndarray]


def make_steps(layout: KVLayout, buf: cp.ndarray, src: np.ndarray, dst: np.ndarray, stream: cp.cuda.Stream) -> Steps:
    """The responder's first steps of a packed read; returns their durations (us)."""

    def steps() -> np.ndarray:
        t = [time.perf_counter()]
        plan = plan_transfer(layout.geometry, layout.geometry, src, dst)
        t.append(time.perf_counter())
        pieces = PairPieces(plan.block_pairs, layout, int(buf.data.ptr), buffer_side=BUF_DST, bounds=[(0, 8), (8, 64)],
                            stream=stream, device=0)
        t.append(time.perf_counter())
        pieces.launch(0)
        t.append(time.perf_counter())
        stream.synchronize()
        t.append(time.perf_counter())
        return np.diff(t) * 1e6

    return steps


def _pause(gap: float, spin: bool) -> None:
    if not gap:
        return
    if not spin:
        time.sleep(gap)
        return
    end = time.perf_counter() + gap
    while time.perf_counter() < end:
        pass


def _median(rows: list) -> list[float]:
    return np.median(np.array(rows), axis=0).round(1).tolist()


def on_caller(steps: Steps, gap: float, n: int = 40, spin: bool = False) -> list[float]:
    """Medians of the steps on this thread, each after ``gap`` seconds of sleep (or busy-wait)."""
    rows = []
    for _ in range(n):
        _pause(gap, spin)
        rows.append(steps())
    return _median(rows)


def _take(q: queue.SimpleQueue, spin: bool) -> object:
    if not spin:
        return q.get()
    while True:
        try:
            return q.get_nowait()
        except queue.Empty:
            time.sleep(0)


def on_woken_thread(steps: Steps, gap: float, n: int = 40, spin: bool = False) -> list[float]:
    """Medians of [wake-up, steps...] on a thread woken through a queue every ``gap`` seconds
    (blocked on the queue, or spinning on it)."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    out: queue.SimpleQueue = queue.SimpleQueue()

    def loop() -> None:
        while (t0 := _take(q, spin)) is not None:
            wake = (time.perf_counter() - t0) * 1e6
            out.put([wake, *steps()])

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    rows = []
    for _ in range(n):
        time.sleep(gap)
        q.put(time.perf_counter())
        rows.append(out.get())
    q.put(None)
    th.join()
    return _median(rows)


def measure(steps: Steps) -> dict:
    return {"hot [plan, pieces, launch, sync]": on_caller(steps, 0), "gap 5ms sleep": on_caller(steps, 0.005),
            "gap 5ms spin": on_caller(steps, 0.005, spin=True), "gap 50ms spin": on_caller(steps, 0.05, spin=True),
            "woken thread gap 5ms [wake, plan, pieces, launch, sync]": on_woken_thread(steps, 0.005),
            "woken thread spinning on the queue, gap 5ms": on_woken_thread(steps, 0.005, spin=True),
            "woken thread spinning on the queue, gap 50ms": on_woken_thread(steps, 0.05, spin=True)}


def main() -> None:
    w = by_name(sys.argv[1] if len(sys.argv) > 1 else "llama8b")
    cp.cuda.Device(0).use()
    tensors = [cp.empty(w.shape, dtype=cp.uint16) for _ in range(w.layers)]
    layout = KVLayout.from_tensors(tensors, block_dim=w.block_dim)
    src, dst = w.block_ids()
    steps = make_steps(layout, cp.empty(1 << 30, dtype=cp.uint8), src, dst, cp.cuda.Stream(non_blocking=True))
    on_caller(steps, 0, 10)  # warm-up: kernels built, pools filled
    res = {"alone": measure(steps)}
    print("alone", json.dumps(res["alone"], indent=1), flush=True)
    with kvxfer.Connector("x", backend="ucx") as c:
        c.register(tensors, block_dim=1)
        time.sleep(0.3)
        res["with polling ucx connector"] = measure(steps)
    print("with polling ucx connector", json.dumps(res["with polling ucx connector"], indent=1), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"cold_{w.name}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
