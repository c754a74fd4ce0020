"""Test harness: KV layouts of every supported kind, and a peer connector in its own OS process.

The peer process is driven over a multiprocessing pipe (test plumbing only; the data path
between the connectors is kvxfer's own TCP protocol).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

KINDS = ("kv_first", "blocks_first", "mla", "vllm_shared", "torch_kv_first")


@dataclass(frozen=True)
class LayoutSpec:
    kind: str
    num_blocks: int
    layers: int = 2
    block_size: int = 16
    heads: int = 2
    head_dim: int = 32

    def build(self, seed: int):
        """(tensors, block_dim, block_getter) for this spec, filled from ``seed``."""
        rng = np.random.default_rng(seed)
        nb, L, bs, h, d = self.num_blocks, self.layers, self.block_size, self.heads, self.head_dim
        if self.kind == "kv_first":
            ts = [rng.integers(0, 2**16, (2, nb, bs, h, d), dtype=np.uint16).view(np.float16) for _ in range(L)]
            return ts, 1
        if self.kind == "blocks_first":
            ts = [rng.integers(0, 2**16, (nb, 2, bs, h, d), dtype=np.uint16).view(np.float16) for _ in range(L)]
            return ts, 0
        if self.kind == "mla":
            ts = [rng.integers(0, 2**16, (nb, bs, 576), dtype=np.uint16) for _ in range(L)]
            return ts, 0
        if self.kind == "vllm_shared":
            piece = bs * h * d * 2
            per_block = L * 2 * piece
            buf = rng.integers(0, 256, nb * per_block, dtype=np.uint8).view(np.int8)
            ts = [
                np.lib.stride_tricks.as_strided(buf[l * 2 * piece :], shape=(2, nb, piece), strides=(piece, per_block, 1))
                for l in range(L)
            ]
            return ts, 1
        if self.kind == "torch_kv_first":
            import torch

            g = torch.Generator().manual_seed(seed)
            ts = [torch.randn((2, nb, bs, h, d), generator=g, dtype=torch.float32).to(torch.bfloat16) for _ in range(L)]
            return ts, 1
        raise ValueError(self.kind)


def block_bytes(tensors, block_dim: int, ids, layers=None) -> list[bytes]:
    """The bytes of blocks ``ids`` of each selected tensor, in id order."""
    out = []
    for i, t in enumerate(tensors):
        if layers is not None and i not in layers:
            continue
        if type(t).__module__.startswith("torch"):
            import torch

            sel = t.index_select(block_dim, torch.as_tensor(np.asarray(ids, dtype=np.int64)))
            out.append(sel.contiguous().view(torch.uint8).numpy().tobytes())
        else:
            out.append(np.ascontiguousarray(np.take(t, np.asarray(ids, dtype=np.int64), axis=block_dim)).tobytes())
    return out


def _peer_main(conn, name: str, spec: LayoutSpec, seed: int, connector_kwargs: dict) -> None:
    import kvxfer

    tensors, bd = spec.build(seed)
    with kvxfer.Connector(name, **connector_kwargs) as c:
        c.register(tensors, block_dim=bd)
        conn.send(c.metadata())
        peers = {}
        while True:
            try:
                cmd, *args = conn.recv()
            except EOFError:
                return
            try:
                if cmd == "exit":
                    conn.send(("ok", None))
                    return
                if cmd == "blocks":
                    conn.send(("ok", block_bytes(tensors, bd, *args)))
                elif cmd == "connect":
                    p = c.connect(args[0])
                    peers[p.name] = p
                    conn.send(("ok", p.name))
                elif cmd in ("read", "write"):
                    peer, src, dst, kw = args
                    h = getattr(c, cmd)(peers[peer], src, dst, **kw)
                    h.wait(60)
                    conn.send(("ok", h.nbytes))
                elif cmd == "wait_note":
                    n = c.wait_notification(args[0])
                    conn.send(("ok", (n.peer, n.payload)))
                elif cmd == "notes":
                    conn.send(("ok", [(n.peer, n.payload) for n in c.notifications()]))
                else:
                    conn.send(("err", f"unknown command {cmd}"))
            except Exception as exc:  # report to the test, keep serving
                conn.send(("err", f"{type(exc).__name__}: {exc}"))


class PeerProcess:
    """A Connector in a child process, registered with ``spec`` filled from ``seed``."""

    def __init__(self, name: str, spec: LayoutSpec, seed: int, **connector_kwargs):
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, args=(child, name, spec, seed, connector_kwargs), daemon=True)
        self.proc.start()
        if not self._conn.poll(60):
            self.kill()
            raise RuntimeError("peer process did not start")
        self.metadata: bytes = self._conn.recv()

    def call(self, *cmd, timeout: float = 60):
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"peer did not answer {cmd[0]}")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=10)
            except Exception:
                pass
            self.proc.join(10)
        self.kill()


def torch_cache(nb: int, layers: int, seed: int, device: str) -> list:
    """``layers`` torch int16 tensors ``[2, nb, 16, 8, 128]`` (llama8b's block shape) on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2**15, (2, nb, 16, 8, 128), generator=g, dtype=torch.int16).to(device)
            for _ in range(layers)]


def _torch_block_server(conn, backend: str, nb: int, layers: int, device: str, env: dict) -> None:
    os.environ.update(env)
    import torch

    import kvxfer

    kv = torch_cache(nb, layers, 1, device)
    with kvxfer.Connector("torch-peer", backend=backend) as c:
        c.register(kv, block_dim=1)
        conn.send(c.metadata())
        while True:
            cmd = conn.recv()
            if cmd[0] == "exit":
                return
            if cmd[0] == "note":
                n = c.wait_notification(timeout=10)
                conn.send((n.peer, n.payload))
                continue
            ids = torch.as_tensor(cmd[1], device=device)
            conn.send([t.index_select(1, ids).cpu().numpy() for t in kv])


@contextlib.contextmanager
def torch_peer(backend: str, nb: int, layers: int, device: str, env: dict | None = None) -> Iterator[tuple]:
    """A peer process holding :func:`torch_cache` (seed 1) on ``device`` ("cpu": host memory).

    Yields (pipe, its metadata). Over the pipe it answers ``("blocks", ids)`` with its blocks
    ``ids`` of every layer as numpy arrays and ``("note",)`` with its next notification's
    (peer, payload); it is told to exit (then killed if it lingers) when the block ends.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_torch_block_server, args=(child, backend, nb, layers, device, env or {}), daemon=True)
    p.start()
    try:
        assert parent.poll(120), "peer did not start"
        yield parent, parent.recv()
    finally:
        with contextlib.suppress(OSError):
            parent.send(("exit",))
        p.join(30)
        if p.is_alive():
            p.kill()


def caller_stream_ordering_checks(c, peer, kv, ask, nb: int) -> None:
    """GPU transfers wait for the work the caller queued on its current stream: after a long
    GPU sleep the caller overwrites blocks on its stream, then at once reads into them (the
    read must land after the overwrite) and writes others out (the peer must get the new
    bytes). ``kv``: the local torch tensors on cuda:0; ``ask``: a pipe to a peer that answers
    ``("blocks", ids)`` with its blocks ``ids`` of every layer as numpy arrays."""
    import torch

    rng = np.random.default_rng(1)
    src, dst = rng.choice(nb, 100, replace=False), rng.choice(nb, 100, replace=False)
    d = torch.as_tensor(dst, device="cuda:0")
    side = torch.cuda.Stream("cuda:0")
    with torch.cuda.stream(side):
        torch.cuda._sleep(300_000_000)  # ~0.2 s of GPU time before the caller's overwrite
        for t in kv:
            t[:, d] = -1
        h = c.read(peer, src, dst)
    h.wait(60)
    side.synchronize()
    ask.send(("blocks", src))
    remote = ask.recv()
    for i, t in enumerate(kv):
        assert np.array_equal(t.index_select(1, d).cpu().numpy(), remote[i]), f"read landed before the caller's write, layer {i}"
    s2, d2 = rng.choice(nb, 100, replace=False), rng.choice(nb, 100, replace=False)
    with torch.cuda.stream(side):
        torch.cuda._sleep(300_000_000)
        for t in kv:
            t[:, torch.as_tensor(s2, device="cuda:0")] = 7
        h = c.write(peer, s2, d2)
    h.wait(60)
    ask.send(("blocks", d2))
    assert all((r == 7).all() for r in ask.recv()), "the write sent bytes from before the caller's update"
