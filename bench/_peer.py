"""Set-up shared by the in-process peer probes (ipc_kernel_probe.py, ipc_batch_memcpy_probe.py).

One process, two GPUs: per workload, KV tensors of the ``llama8b`` or ``llama8b-tp8`` geometry
with random contents on GPU0 and zeros on GPU1, peer access from GPU1 on, the same random
distinct blocks on each side (seed 0), a stream on GPU1, and the contiguous peer memcpy of the
transfer's bytes that every ratio divides by.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cupy as cp
import numpy as np

from kvxfer import KVLayout, plan_transfer
from kvxfer.plan import TransferPlan

# name: (layers, blocks per tensor, KV heads, blocks moved); [2, blocks, 16, heads, 128] bf16 as int16
WORKLOADS = {"llama8b": (32, 2048, 8, 512), "llama8b-tp8": (32, 8192, 1, 4096)}


@dataclass
class PeerCase:
    """One workload's tensors and blocks: GPU1 pulls ``src[:, s]`` into ``dst[:, d]``."""

    name: str
    src: list[Any]  # on GPU0
    dst: list[Any]  # on GPU1
    s: np.ndarray
    d: np.ndarray
    stream: Any  # on GPU1
    src_layout: KVLayout
    dst_layout: KVLayout
    plan: TransferPlan  # the pull
    push_plan: TransferPlan

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    @property
    def block_bytes(self) -> int:
        return self.src[0][0, 0].nbytes

    def pull_matches(self, layers: int = 2) -> bool:
        """Whether the first ``layers`` destination tensors hold the source blocks (a pull ran)."""
        return all(bool((cp.asnumpy(b[:, self.d]) == cp.asnumpy(a[:, self.s])).all())
                   for a, b in zip(self.src[:layers], self.dst[:layers]))

    def clear(self, layers: int = 2) -> None:
        """Zero the first ``layers`` destination tensors, on the case's stream: the copies run
        there, and it does not wait for CuPy's default stream."""
        with self.stream:
            for x in self.dst[:layers]:
                x.fill(0)


def cases() -> Iterator[PeerCase]:
    """Each workload in turn (GPU1 current); its memory is freed before the next one."""
    for name, (L, NB, H, NSEL) in WORKLOADS.items():
        shape = (2, NB, 16, H, 128)
        with cp.cuda.Device(0):
            src = [cp.random.randint(0, 2**15, shape, dtype=cp.int16) for _ in range(L)]
        cp.cuda.Device(1).use()
        try:
            cp.cuda.runtime.deviceEnablePeerAccess(0)
        except cp.cuda.runtime.CUDARuntimeError:
            pass  # already enabled by the previous workload
        dst = [cp.zeros(shape, dtype=cp.int16) for _ in range(L)]
        rng = np.random.default_rng(0)
        s, d = rng.choice(NB, NSEL, replace=False), rng.choice(NB, NSEL, replace=False)
        ls, ld = KVLayout.from_tensors(src, block_dim=1), KVLayout.from_tensors(dst, block_dim=1)
        yield PeerCase(name, src, dst, s, d, cp.cuda.Stream(non_blocking=True), ls, ld,
                       plan_transfer(ls.geometry, ld.geometry, s, d), plan_transfer(ld.geometry, ls.geometry, d, s))
        del src, dst, ls, ld
        cp.get_default_memory_pool().free_all_blocks()


def timeit(fn: Callable[[], Any], stream: Any, n: int = 10) -> tuple[float, float]:
    """Medians over ``n`` calls after one warm-up: (device seconds between CUDA events around
    the call on ``stream``, host seconds the call itself took)."""
    fn()
    stream.synchronize()
    dev, host = [], []
    for _ in range(n):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        b.record(stream)
        b.synchronize()
        dev.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    return statistics.median(dev), statistics.median(host)


def gbps(nbytes: int, fn: Callable[[], Any], stream: Any) -> float:
    """GB/s of ``fn`` moving ``nbytes``, by device time."""
    return nbytes / timeit(fn, stream)[0] / 1e9


def peer_memcpy_gbps(case: PeerCase) -> float:
    """One contiguous cudaMemcpyPeerAsync GPU0 -> GPU1 of the case's bytes."""
    n = case.nbytes
    with cp.cuda.Device(0):
        c0 = cp.empty(n, dtype=cp.uint8)
    c1 = cp.empty(n, dtype=cp.uint8)
    return gbps(n, lambda: cp.cuda.runtime.memcpyPeerAsync(c1.data.ptr, 1, c0.data.ptr, 0, n, case.stream.ptr), case.stream)


def finish(res: dict) -> None:
    """Write ``res`` as JSON to argv[1] when given."""
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)
