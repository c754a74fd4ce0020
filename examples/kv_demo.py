"""Demo: a prefill process hands a request's paged KV cache to a decode process over kvxfer.

The prefill process fills the blocks of one request (scattered in its cache) with bytes that
depend only on (layer, K/V, token position); the decode process, with its own cache and its own
scattered block ids, reads them over TCP and checks every byte against what it expects. Exits
non-zero on any difference. Usage: python examples/kv_demo.py [--tokens 16384] [--layers 16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import numpy as np

BLOCK, HEADS, DIM = 16, 8, 128


def expected_block_bytes(layer: int, first_token: int) -> np.ndarray:
    """K and V of one block: a deterministic function of layer and token positions."""
    tok = np.arange(first_token, first_token + BLOCK, dtype=np.uint32)[:, None, None]
    h = np.arange(HEADS, dtype=np.uint32)[None, :, None]
    d = np.arange(DIM, dtype=np.uint32)[None, None, :]
    base = (tok * 2654435761 + h * 40503 + d * 977 + layer * 7919) & 0xFFFF
    return np.stack([base, base ^ 0x5A5A]).astype(np.uint16)  # [2, BLOCK, HEADS, DIM]


def cache(layers: int, num_blocks: int) -> list[np.ndarray]:
    """An engine's KV cache: allocated once and touched (as engines do when they warm up)."""
    out = []
    for _ in range(layers):
        t = np.empty((2, num_blocks, BLOCK, HEADS, DIM), np.uint16)
        t.fill(0)
        out.append(t)
    return out


def prefill(conn, layers: int, num_blocks: int, n_blocks: int) -> None:
    import kvxfer

    kv = cache(layers, num_blocks)
    blocks = np.random.default_rng(1).choice(num_blocks, n_blocks, replace=False)
    t0 = time.perf_counter()
    for layer in range(layers):
        for i, b in enumerate(blocks):
            kv[layer][:, b] = expected_block_bytes(layer, i * BLOCK)
    fill_s = time.perf_counter() - t0
    with kvxfer.Connector("prefill", backend="tcp") as c:
        c.register(kv, block_dim=1)
        conn.send((c.metadata(), blocks.tolist(), fill_s))
        note = c.wait_notification(timeout=120)  # the decode side confirms it has the blocks
        conn.send(note.payload.decode())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    import kvxfer

    n_blocks = args.tokens // BLOCK
    num_blocks = n_blocks * 2
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=prefill, args=(child, args.layers, num_blocks, n_blocks))
    proc.start()
    if not parent.poll(300):
        print("prefill process did not start", file=sys.stderr)
        return 1
    meta, src_blocks, fill_s = parent.recv()

    kv = cache(args.layers, num_blocks)
    dst_blocks = np.random.default_rng(2).choice(num_blocks, n_blocks, replace=False)
    with kvxfer.Connector("decode", backend="tcp") as c:
        layout = c.register(kv, block_dim=1)
        print(f"decode cache: {layout}")
        peer = c.connect(meta)
        handle = c.read(peer, src_blocks, dst_blocks, notify=b"request 0 received")
        stats = handle.wait(timeout=120)
    bad = 0
    for layer in range(args.layers):
        for i, b in enumerate(dst_blocks):
            if not np.array_equal(kv[layer][:, b], expected_block_bytes(layer, i * BLOCK)):
                bad += 1
    confirmation = parent.recv() if parent.poll(30) else None
    proc.join(30)
    mib = stats.nbytes / 2**20
    print(f"request of {args.tokens} tokens: {n_blocks} blocks x {args.layers} layers = {mib:.0f} MiB "
          f"over {stats.backend} in {stats.seconds * 1e3:.1f} ms = {stats.gbps:.2f} GB/s "
          f"(prefill wrote its cache in {fill_s * 1e3:.0f} ms)")
    print(f"prefill side was told: {confirmation!r}")
    if bad or confirmation != "request 0 received" or proc.exitcode != 0:
        print(f"FAILED: {bad} blocks differ, confirmation={confirmation!r}, prefill exit={proc.exitcode}", file=sys.stderr)
        return 1
    print("OK: every byte of every block matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
