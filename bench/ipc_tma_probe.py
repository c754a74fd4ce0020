"""Probe: peer copies of paged blocks through the Hopper bulk-copy engine (TMA), against the
SM load/store kernel kvxfer launches and a contiguous peer memcpy of the same bytes.

Every SM-issued copy measured so far (ours, the anchor kernel, cache-hint and unroll builds)
stops at 0.92-0.945 of the peer memcpy over NVLink (ipc_kernel_probe, ipc_kernel_hints).
``cp.async.bulk`` moves each chunk as one request of the TMA unit instead of 16-byte accesses
per lane; this measures whether that lifts the ceiling. One process, two GPUs (GPU1 pulls from
or pushes to GPU0), the llama8b and llama8b-tp8 geometries, CUDA-event medians, pulls checked.
Needs sm_90. Prints a table, writes JSON to argv[1].
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _peer import PeerCase, cases, finish, gbps, peer_memcpy_gbps  # noqa: E402

from kvxfer.ops._loader import compile_cubin  # noqa: E402
from kvxfer.ops.pairs import prepare_pairs  # noqa: E402

SOURCE = (Path(__file__).with_suffix(".cu")).read_text()
SMEM_PER_SM = 220 * 1024  # of the 227 KiB a CTA may have, leaving room for the static barriers

# (stages, lead): ring slots per CTA, loads in flight ahead of the stores
RINGS = [(4, 2), (8, 4), (8, 6)]
# chunk sizes per workload, CTAs per SM
CHUNKS = {"llama8b": [8192, 16384, 32768], "llama8b-tp8": [4096]}
CTAS = [1, 2, 4, 8]


def kernel(stages: int, lead: int):
    """The probe kernel built by kvxfer's NVRTC path for sm_90 with one ring shape."""
    cubin = compile_cubin(SOURCE, "ipc_tma_probe.cu",
                          ("--gpu-architecture=sm_90", "-std=c++17", f"-DKVX_STAGES={stages}", f"-DKVX_LEAD={lead}"))
    path = Path(tempfile.mkdtemp()) / f"tma_s{stages}_l{lead}.cubin"
    path.write_bytes(cubin)
    return cp.RawModule(path=str(path)).get_function("tma_copy")


def piece_addresses(c: PeerCase, push: bool) -> tuple[cp.ndarray, cp.ndarray, int]:
    """Source and destination address of every (layer, K/V, block) piece, on GPU1, and the count."""
    bb = c.block_bytes
    nb = c.src[0].shape[1]

    def addrs(tensors, blocks):
        base = np.array([t.data.ptr for t in tensors], dtype=np.uint64)[:, None, None]
        kv = np.arange(2, dtype=np.uint64)[None, :, None] * np.uint64(nb * bb)
        return (base + kv + blocks.astype(np.uint64)[None, None, :] * np.uint64(bb)).reshape(-1)

    s, d = addrs(c.src, c.s), addrs(c.dst, c.d)
    if push:
        s, d = d, s
    return cp.asarray(s), cp.asarray(d), s.size


def main() -> None:
    sms = cp.cuda.Device(1).attributes["MultiProcessorCount"]
    res: dict = {"sms": sms}
    with cp.cuda.Device(1):  # the copies run on GPU1: the module is loaded in its context
        kernels = {ring: kernel(*ring) for ring in RINGS}
    for c in cases():
        row: dict = {"peer_memcpy_GBps": peer_memcpy_gbps(c)}
        pull = prepare_pairs(c.plan.block_pairs, c.src_layout, c.dst_layout, device=1)
        push = prepare_pairs(c.push_plan.block_pairs, c.dst_layout, c.src_layout, device=1)
        row["ours_pull_GBps"] = gbps(c.nbytes, lambda: pull.launch(c.stream.ptr), c.stream)
        row["ours_push_GBps"] = gbps(c.nbytes, lambda: push.launch(c.stream.ptr), c.stream)
        addr = {False: piece_addresses(c, False), True: piece_addresses(c, True)}
        best = {False: (0.0, None), True: (0.0, None)}
        for (stages, lead), fn in kernels.items():
            for chunk in CHUNKS[c.name]:
                smem = stages * chunk
                if smem > 48 * 1024:  # beyond the default: opt in (reported where refused)
                    try:
                        fn.max_dynamic_shared_size_bytes = smem
                    except Exception as exc:
                        row[f"s{stages}l{lead}_c{chunk // 1024}k_error"] = (
                            f"{exc!r} static {fn.shared_size_bytes} optin "
                            f"{cp.cuda.Device(1).attributes['MaxSharedMemoryPerBlockOptin']}")
                        continue
                for ctas in CTAS:
                    if ctas * smem > SMEM_PER_SM:
                        continue
                    tag = f"s{stages}l{lead}_c{chunk // 1024}k_x{ctas}"
                    for is_push in (False, True):
                        src, dst, n = addr[is_push]

                        def launch(src=src, dst=dst, n=n):
                            with c.stream:
                                fn((sms * ctas,), (32,), (src, dst, np.int64(n), np.int32(c.block_bytes), np.int32(chunk)),
                                   shared_mem=smem)
                        try:
                            if not is_push:
                                c.clear()
                                launch()
                                c.stream.synchronize()
                                row[f"{tag}_correct"] = c.pull_matches()
                            g = gbps(c.nbytes, launch, c.stream)
                        except Exception as exc:  # a shape that does not launch is reported
                            row[f"{tag}_error"] = repr(exc)[:200]
                            break
                        row[f"{tag}_{'push' if is_push else 'pull'}_GBps"] = g
                        if g > best[is_push][0]:
                            best[is_push] = (g, tag)
        m = row["peer_memcpy_GBps"]
        row["summary"] = {
            "ours_pull_ratio": row["ours_pull_GBps"] / m, "ours_push_ratio": row["ours_push_GBps"] / m,
            "tma_best_pull": [best[False][1], best[False][0] / m], "tma_best_push": [best[True][1], best[True][0] / m],
        }
        res[c.name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print(c.name, json.dumps(res[c.name]["summary"]), flush=True)
    finish(res)


if __name__ == "__main__":
    main()
