"""Probe: do concurrent UCX RMA operations between two GPUs run concurrently, and does it
depend on how many remote keys (registrations) they target?

UCX's cuda_ipc transport queues each RMA as a cuMemcpyDtoDAsync on a stream it picks from the
unpacked remote key; operations on one stream run one after the other. This probe moves 1 GiB
from GPU0 to GPU1 (client on GPU1 gets, or puts back) as:

- one operation (one 1 GiB registration);
- k operations on one registration (same remote key, k offsets);
- k operations on k registrations (separate cudaMalloc allocations, k remote keys);

and times a contiguous peer cudaMemcpyAsync of the same bytes in the same run (CUDA IPC).
Prints and writes JSON (``$OUT/ucx_rkey_streams.json``).
"""

from __future__ import annotations

import asyncio
import ctypes as C
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import msgpack

TOTAL = int(os.environ.get("PROBE_BYTES", 1 << 30))
SPLITS = (1, 2, 4, 8)
PORT = 13399
REPS = 5


def _ucp():
    import libucx

    lib = libucx.load_library()[3]

    class MapParams(C.Structure):
        _fields_ = [("field_mask", C.c_uint64), ("address", C.c_void_p), ("length", C.c_size_t), ("flags", C.c_uint),
                    ("prot", C.c_uint), ("memory_type", C.c_int), ("exported_memh_buffer", C.c_void_p)]

    class Param(C.Structure):
        _fields_ = [("op_attr_mask", C.c_uint32), ("flags", C.c_uint32), ("request", C.c_void_p), ("cb", C.c_void_p),
                    ("datatype", C.c_uint64), ("user_data", C.c_void_p), ("reply_buffer", C.c_void_p),
                    ("memory_type", C.c_int), ("recv_info", C.c_void_p), ("memh", C.c_void_p)]

    lib.ucp_mem_map.argtypes = [C.c_void_p, C.POINTER(MapParams), C.POINTER(C.c_void_p)]
    lib.ucp_rkey_pack.argtypes = [C.c_void_p, C.c_void_p, C.POINTER(C.c_void_p), C.POINTER(C.c_size_t)]
    lib.ucp_rkey_buffer_release.argtypes = [C.c_void_p]
    lib.ucp_ep_rkey_unpack.argtypes = [C.c_void_p, C.c_void_p, C.POINTER(C.c_void_p)]
    for name in ("ucp_put_nbx", "ucp_get_nbx"):
        f = getattr(lib, name)
        f.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_uint64, C.c_void_p, C.POINTER(Param)]
        f.restype = C.c_void_p
    lib.ucp_request_check_status.argtypes = [C.c_void_p]
    lib.ucp_request_check_status.restype = C.c_int
    lib.ucp_request_free.argtypes = [C.c_void_p]
    return lib, MapParams, Param


def _register(lib, MapParams, ctx: int, addr: int, n: int) -> bytes:
    p = MapParams(field_mask=0b11, address=addr, length=n)
    memh = C.c_void_p()
    assert lib.ucp_mem_map(ctx, C.byref(p), C.byref(memh)) == 0
    kb, ks = C.c_void_p(), C.c_size_t()
    assert lib.ucp_rkey_pack(ctx, memh, C.byref(kb), C.byref(ks)) == 0
    key = C.string_at(kb, ks.value)
    lib.ucp_rkey_buffer_release(kb)
    return key


async def _wait_all(lib, reqs) -> None:
    for r in reqs:
        if r is None:
            continue
        v = C.c_int64(r).value
        if -100 <= v < 0:
            raise RuntimeError(f"RMA failed at post: status {v}")
        while (st := lib.ucp_request_check_status(r)) == 1:
            await asyncio.sleep(0)
        lib.ucp_request_free(r)
        if st != 0:
            raise RuntimeError(f"RMA status {st}")


def server(q) -> None:
    import cupy as cp

    cp.cuda.Device(0).use()
    import ucxx

    async def main():
        ucxx.init(progress_mode="thread")
        lib, MP, _ = _ucp()
        ctx = ucxx.core._get_ctx().context.handle
        big = cp.cuda.runtime.malloc(TOTAL)
        cp.cuda.runtime.memset(big, 1, TOTAL)
        parts = {k: [cp.cuda.runtime.malloc(TOTAL // k) for _ in range(k)] for k in SPLITS if k > 1}
        cp.cuda.runtime.deviceSynchronize()
        desc = {"big": (big, _register(lib, MP, ctx, big, TOTAL)),
                "parts": {k: [(a, _register(lib, MP, ctx, a, TOTAL // k)) for a in v] for k, v in parts.items()},
                "ipc": bytes(cp.cuda.runtime.ipcGetMemHandle(big))}
        done = asyncio.get_running_loop().create_future()

        async def handler(ep):
            await ep.send_obj(msgpack.packb(desc))
            await ep.recv_obj()
            done.set_result(True)

        lf = ucxx.create_listener(handler, port=PORT)
        await done
        await asyncio.sleep(0.3)
        lf.close()

    asyncio.run(main())


def client(q) -> None:
    import cupy as cp

    cp.cuda.Device(1).use()
    import ucxx

    res: dict = {"bytes": TOTAL}

    async def main():
        ucxx.init(progress_mode="thread")
        lib, MP, Param = _ucp()
        await asyncio.sleep(1.0)
        ep = await ucxx.create_endpoint("127.0.0.1", PORT)
        desc = msgpack.unpackb(bytes(await ep.recv_obj()), strict_map_key=False)
        ctx = ucxx.core._get_ctx().context.handle
        dst = cp.cuda.runtime.malloc(TOTAL)
        _register(lib, MP, ctx, dst, TOTAL)
        prm = Param()
        eph = ep.ucp_endpoint

        def unpack(key: bytes) -> C.c_void_p:
            rk = C.c_void_p()
            assert lib.ucp_ep_rkey_unpack(eph, key, C.byref(rk)) == 0
            return rk

        big_addr, big_key = desc["big"]
        big_rk = unpack(big_key)
        parts = {k: [(a, unpack(key)) for a, key in v] for k, v in desc["parts"].items()}

        async def timed(post) -> float:
            ts = []
            for _ in range(REPS + 1):
                t = time.perf_counter()
                await _wait_all(lib, post())
                ts.append(time.perf_counter() - t)
            return round(TOTAL / statistics.median(ts[1:]) / 1e9, 1)

        for op, fn in (("get", lib.ucp_get_nbx), ("put", lib.ucp_put_nbx)):
            rows = {}
            rows["1 op, 1 key"] = await timed(lambda: [fn(eph, dst, TOTAL, big_addr, big_rk, C.byref(prm))])
            for k in SPLITS[1:]:
                n = TOTAL // k
                rows[f"{k} ops, 1 key"] = await timed(
                    lambda: [fn(eph, dst + i * n, n, big_addr + i * n, big_rk, C.byref(prm)) for i in range(k)])
                rows[f"{k} ops, {k} keys"] = await timed(
                    lambda: [fn(eph, dst + i * n, n, a, rk, C.byref(prm)) for i, (a, rk) in enumerate(parts[k])])
            res[op] = rows
        # the baseline: contiguous peer copy of the same bytes, GPU1 <- GPU0 through CUDA IPC
        src = cp.cuda.runtime.ipcOpenMemHandle(desc["ipc"])
        s = cp.cuda.Stream(non_blocking=True)
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        ts = []
        for _ in range(REPS + 1):
            e0.record(s)
            cp.cuda.runtime.memcpyAsync(dst, src, TOTAL, 3, s.ptr)
            e1.record(s)
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
        res["peer_memcpy_GBps"] = round(TOTAL / statistics.median(ts[1:]) / 1e9, 1)
        res["transports"] = sorted(ucxx.get_active_transports())
        await ep.send_obj(b"done")
        await ep.close()

    try:
        asyncio.run(main())
    except Exception as ex:  # report, not hang
        res["error"] = repr(ex)
    q.put(res)


def main() -> int:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps, pc = ctx.Process(target=server, args=(q,)), ctx.Process(target=client, args=(q,))
    ps.start()
    pc.start()
    pc.join(240)
    ps.join(10)
    for p in (ps, pc):
        if p.is_alive():
            p.kill()
    res = q.get() if not q.empty() else {"error": "no result"}
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "ucx_rkey_streams.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
