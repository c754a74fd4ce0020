"""TCP backend vs raw sockets on the ``llama8b`` geometry in host memory (issue: foundation).

Both sides run in their own OS process. In the same run, on the same loopback, this measures:
  * baseline: the same number of bytes over the same number of TCP connections with plain
    ``sendall`` of 4 MiB slices of one contiguous buffer and ``recv_into`` a contiguous buffer,
    finished when the receiver has every byte and says so;
  * kvxfer: ``Connector.write`` and ``Connector.read`` of 512 random paged blocks (32 layers,
    K and V pieces of 32 KiB), finished when the handle completes.
Prints a table and writes JSON (``--json``). Usage:
    python bench/bench_tcp.py [--num-blocks 2048] [--blocks 512] [--layers 32] [--iters 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import threading
import time

import numpy as np


def kv_tensors(layers: int, num_blocks: int, fill: bool, device: str = "host") -> list:
    """The llama8b cache in host memory, or (device 'cuda:N') as torch tensors on that GPU."""
    if device != "host":
        import torch

        host = kv_tensors(layers, num_blocks, fill)
        return [torch.from_numpy(t).to(device) for t in host]
    ts = [np.empty((2, num_blocks, 16, 8, 128), np.uint16) for _ in range(layers)]
    if fill:
        rng = np.random.default_rng(0)
        for t in ts:
            t[...] = rng.integers(0, 2**16, t.shape, dtype=np.uint16)
    else:
        for t in ts:
            t.fill(0)
    return ts


def _recv_all(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("closed")
        view = view[n:]


def _peer(conn, args, device: str) -> None:
    import kvxfer
    from kvxfer.config import from_env

    tensors = kv_tensors(args.layers, args.num_blocks, fill=True, device=device)
    with kvxfer.Connector("peer", backend="tcp", tcp=from_env(kvxfer.TcpConfig, "KVXFER_TCP_", streams=args.streams)) as c:
        c.register(tensors, block_dim=1)
        lsock = socket.create_server(("127.0.0.1", 0))
        conn.send((c.metadata(), lsock.getsockname()[1]))
        sink = bytearray(args.blocks * args.layers * 2 * 32768)
        per = len(sink) // args.streams
        while True:
            cmd = conn.recv()
            if cmd == "exit":
                return
            if cmd == "raw":
                socks = [lsock.accept()[0] for _ in range(args.streams)]
                mv = memoryview(sink)
                threads = [threading.Thread(target=_recv_all, args=(s, mv[i * per : (i + 1) * per])) for i, s in enumerate(socks)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                socks[0].sendall(b"k")
                for s in socks:
                    s.close()


def _raw_send(port: int, buf: np.ndarray, streams: int) -> float:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mv = memoryview(buf).cast("B")
    per = mv.nbytes // streams
    chunk = 4 << 20

    def send(s, v):
        for o in range(0, v.nbytes, chunk):
            s.sendall(v[o : o + chunk])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=send, args=(s, mv[i * per : (i + 1) * per])) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert socks[0].recv(1) == b"k"
    dt = time.perf_counter() - t0
    for s in socks:
        s.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--memory", choices=("host", "cuda", "both"), default="host")
    ap.add_argument("--local-device", default="cuda:0")
    ap.add_argument("--peer-device", default="cuda:0")
    ap.add_argument("--contiguous", action="store_true", help="consecutive block ids (diagnostic: no scattered pieces)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import kvxfer
    from kvxfer.config import from_env

    memories = ["host", "cuda"] if args.memory == "both" else [args.memory]
    nbytes = args.blocks * args.layers * 2 * 32768
    raw_buf = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)
    results: dict[str, list[float]] = {"raw_socket": []}
    ctx = mp.get_context("spawn")
    for mem in memories:
        local_dev = "host" if mem == "host" else args.local_device
        peer_dev = "host" if mem == "host" else args.peer_device
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_peer, args=(child, args, peer_dev), daemon=True)
        proc.start()
        meta, raw_port = parent.recv()
        tensors = kv_tensors(args.layers, args.num_blocks, fill=False, device=local_dev)
        rng = np.random.default_rng(42)
        rd, wr = results.setdefault(f"{mem}_read", []), results.setdefault(f"{mem}_write", [])
        with kvxfer.Connector("bench", backend="tcp", tcp=from_env(kvxfer.TcpConfig, "KVXFER_TCP_", streams=args.streams)) as c:
            c.register(tensors, block_dim=1)
            peer = c.connect(meta)
            for it in range(args.iters + 1):  # first round is warm-up
                if args.contiguous:  # diagnostic: one run per layer and K/V, no scattered pieces
                    src = np.arange(args.blocks) + int(rng.integers(0, args.num_blocks - args.blocks + 1))
                    dst = np.arange(args.blocks) + int(rng.integers(0, args.num_blocks - args.blocks + 1))
                else:
                    src = rng.choice(args.num_blocks, args.blocks, replace=False)
                    dst = rng.choice(args.num_blocks, args.blocks, replace=False)
                parent.send("raw")
                t_raw = _raw_send(raw_port, raw_buf, args.streams)
                t_read = c.read(peer, src, dst).wait(120).seconds
                t_write = c.write(peer, dst, src).wait(120).seconds
                if it:
                    results["raw_socket"].append(nbytes / t_raw / 1e9)
                    rd.append(nbytes / t_read / 1e9)
                    wr.append(nbytes / t_write / 1e9)
            # correctness of the last read (every byte)
            ref = kv_tensors(args.layers, args.num_blocks, fill=True)
            got = [np.asarray(t.cpu()) if mem == "cuda" else t for t in tensors]
            assert all(np.array_equal(g[:, dst], r[:, src]) for g, r in zip(got, ref)), f"{mem} read corrupted data"
        parent.send("exit")
        proc.join(30)

    med = {k: statistics.median(v) for k, v in results.items()}
    out = {
        "benchmark": "bench_tcp",
        "workload": f"llama8b geometry, host memory, {args.blocks} random of {args.num_blocks} blocks, {args.layers} layers",
        "bytes": nbytes,
        "streams": args.streams,
        "iters": args.iters,
        "gbps_median": med,
        "gbps_all": results,
        "ratios_vs_raw": {k: v / med["raw_socket"] for k, v in med.items()},
        "ratios_cuda_vs_host": {op: med[f"cuda_{op}"] / med[f"host_{op}"] for op in ("read", "write")}
        if args.memory == "both" else None,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    print(f"{'path':<16}{'GB/s (median)':>15}{'vs raw':>9}")
    for k, v in med.items():
        print(f"{k:<16}{v:>15.2f}{v / med['raw_socket']:>9.1%}")
    if out["ratios_cuda_vs_host"]:
        print("GPU memory vs host memory over TCP:", {k: f"{v:.1%}" for k, v in out["ratios_cuda_vs_host"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
