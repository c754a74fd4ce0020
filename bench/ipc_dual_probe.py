"""Probe: one transfer GPU0 -> GPU1 copied by the SMs of both GPUs at once.

Every SM-issued copy measured on one GPU (our kernel, cache hints, TMA bulk-copy rings) stops
at 0.92-0.945 of a contiguous peer memcpy over NVLink. Is that a limit of one GPU's SMs issuing
remote accesses, or of SM-sized traffic on the link? Here GPU1 pulls a share of the blocks
(remote reads) while GPU0 pushes the rest (remote writes), both flows on the GPU0 -> GPU1
direction, started together by events; the time runs from the start on GPU1's stream until
both are done. If the sum beats one GPU alone, a transfer the producer helps with (it pushes
from one end while the consumer pulls from the other) would lift the ceiling.

One process, both GPUs, peer access both ways; llama8b and llama8b-tp8 geometry; CUDA-event
medians; every split's result checked. Prints a table, writes JSON to argv[1].
"""

from __future__ import annotations

import json
import os
import sys

import cupy as cp

sys.path.insert(0, os.path.dirname(__file__))
from _peer import cases, finish, gbps, peer_memcpy_gbps  # noqa: E402

from kvxfer import plan_transfer  # noqa: E402
from kvxfer.ops.pairs import prepare_pairs  # noqa: E402

SHARES = [0.0, 0.25, 0.375, 0.5, 1.0]  # of the blocks pushed by GPU0 (the rest pulled by GPU1)


def main() -> None:
    with cp.cuda.Device(0):
        try:
            cp.cuda.runtime.deviceEnablePeerAccess(1)
        except cp.cuda.runtime.CUDARuntimeError:
            pass  # already on
        s0 = cp.cuda.Stream(non_blocking=True)
        pushed = cp.cuda.Event(disable_timing=True)
    res: dict = {}
    for c in cases():
        s1 = c.stream
        start = cp.cuda.Event(disable_timing=True)  # on GPU1, current
        row: dict = {"peer_memcpy_GBps": peer_memcpy_gbps(c)}
        gs, gd = c.src_layout.geometry, c.dst_layout.geometry
        for share in SHARES:
            k = int(round(len(c.s) * (1 - share)))  # blocks [0, k) pulled by GPU1, [k, n) pushed by GPU0
            pull = prepare_pairs(plan_transfer(gs, gd, c.s[:k], c.d[:k]).block_pairs, c.src_layout, c.dst_layout,
                                 device=1) if k else None
            push = prepare_pairs(plan_transfer(gs, gd, c.s[k:], c.d[k:]).block_pairs, c.src_layout, c.dst_layout,
                                 device=0) if k < len(c.s) else None

            def both(pull=pull, push=push) -> None:
                start.record(s1)
                s0.wait_event(start)
                if pull is not None:
                    pull.launch(s1.ptr)
                if push is not None:
                    with cp.cuda.Device(0):
                        push.launch(s0.ptr)
                        pushed.record(s0)
                    s1.wait_event(pushed)

            c.clear()
            both()
            s1.synchronize()
            row[f"share{share}_correct"] = c.pull_matches()
            row[f"share{share}_GBps"] = gbps(c.nbytes, both, s1)
        m = row["peer_memcpy_GBps"]
        row["ratios"] = {f"pushed_by_gpu0_{s}": row[f"share{s}_GBps"] / m for s in SHARES}
        res[c.name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print(c.name, json.dumps(res[c.name]), flush=True)
    finish(res)


if __name__ == "__main__":
    main()
