"""Benchmark: a vLLM decode rank reading one request from prefill ranks in vLLM's layouts, GB/s
against a device copy of the same bytes measured in the same run.

Three processes on one GPU (spawn): prefill ranks 0 and 1 and one decode rank, each with a
kvxfer Connector (cuda_ipc by default) over CUDA tensors in a vLLM layout: FlashAttention NHD
``[2, blocks, block_size, heads, head_dim]`` (``fa``), FlashInfer HND ``[blocks, 2, heads,
block_size, head_dim]`` (``fi``), MLA ``[blocks, block_size, 576]`` (``mla``), or vLLM 0.33's
K-then-V layouts ``[blocks, block_size, heads, 2 * head_dim]`` (``nhc``, LBNHC), ``[blocks,
heads, block_size, 2 * head_dim]`` (``hnc``, LBHNC) and block-major BLNHC (``blnhc``: every
layer a strided view of one allocation); bf16 items, 32 layers, 8 KV heads of 128 (MLA:
the 576-wide latent), a prompt of ``--tokens`` tokens in random distinct blocks. The decode rank
plans its reads with :func:`kvxfer.integrations.vllm.transfer_plan.plan_reads` (one read per
prefill rank it needs: TP 2 -> 1 reads two, TP 1 -> 2 reads its half of the heads from one) and
times them end to end (submit every read, wait for every handle), median of ``--iters``. In the
same process it times ``copy_`` of the same number of bytes between two device buffers (the
baseline). After timing, every token's heads at the decode rank are checked against the values
the prefill ranks wrote (a formula of layer, K/V, token, head and element). The host time of
planning the reads' copy jobs is reported alone too (``reshard_plan_us``).

    python bench/bench_vllm_layouts.py --out results.json [--tokens 4096] [--iters 10]
        [--layouts fa,fi,mla,nhc,hnc,blnhc] [--backend cuda_ipc]

Writes JSON (card, date, git commit, command, one entry per case) to ``--out`` (or
``$OUT/vllm_layouts.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback

import numpy as np

LAYERS, HEADS, HEAD_DIM, MLA_DIM = 32, 8, 128, 576
# (name, prefill TP, decode TP, prefill block size, decode block size)
CASES = [
    ("same", 1, 1, 16, 16),
    ("tp2->1", 2, 1, 16, 16),
    ("tp1->2", 1, 2, 16, 16),
    ("bs16->64", 1, 1, 16, 64),
    ("bs64->16", 1, 1, 64, 16),
    ("tp2->1 bs16->64", 2, 1, 16, 64),
    ("tp1->2 bs64->16", 1, 2, 64, 16),
]


def _spec(layout: str, tp: int, rank: int, bs: int):
    from kvxfer.integrations.vllm.transfer_plan import GroupKind, KVGroupSpec, KVSpec
    from kvxfer.reshard import HeadOrder

    mla = layout == "mla"
    width = MLA_DIM if mla else 2 * HEAD_DIM if layout in ("nhc", "hnc", "blnhc") else HEAD_DIM  # K then V
    return KVSpec("bench", "bfloat16", "auto", tp, rank, bs, 1 if mla else HEADS, width,
                  HeadOrder.HND if layout in ("fi", "hnc") else HeadOrder.NHD, mla, 2,
                  (KVGroupSpec(GroupKind.FULL, tuple(f"layer{i}" for i in range(LAYERS))),))


def _blocks(tokens: int, bs: int, seed: int) -> tuple[int, list[int]]:
    """(blocks per tensor, the request's distinct random ids, none of them 0)."""
    n = -(-tokens // bs)
    nb = n + n // 4 + 8
    return nb, (np.random.default_rng(seed).permutation(nb - 1)[:n] + 1).tolist()


class _Rank:
    """One rank's tensors and connector."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.dev = torch.device(device)
        if self.dev.type == "cuda":
            torch.cuda.set_device(self.dev)
        self.conn = None
        self.tensors: list = []
        self.peers: list = []

    def _view(self, t, layout: str):
        """[kv, blocks, block_size, heads, dim] view of one layer."""
        if layout == "fa":
            return t
        if layout == "fi":
            return t.permute(1, 0, 3, 2, 4)
        if layout in ("nhc", "blnhc"):  # [blocks, block_size, heads, K then V]
            return t.unflatten(-1, (2, HEAD_DIM)).permute(3, 0, 1, 2, 4)
        if layout == "hnc":  # [blocks, heads, block_size, K then V]
            return t.unflatten(-1, (2, HEAD_DIM)).permute(3, 0, 2, 1, 4)
        return t.unsqueeze(0).unsqueeze(3)

    def _values(self, layer: int, layout: str, tokens, h0: int, h1: int):
        """int16 [kv, tokens, heads, dim]: the formula every rank agrees on."""
        torch = self.torch
        kv = 1 if layout == "mla" else 2
        dim = MLA_DIM if layout == "mla" else HEAD_DIM
        k = torch.arange(kv, device=self.dev).view(kv, 1, 1, 1)
        t = tokens.view(1, -1, 1, 1)
        g = torch.arange(h0, h1, device=self.dev).view(1, 1, -1, 1)
        d = torch.arange(dim, device=self.dev).view(1, 1, 1, -1)
        v = (t * 8191 + g * 131 + d * 7 + layer * 65537 + k * 977) * 2654435761
        return (((v >> 7) & 0xFFFF) - 32768).to(torch.int16)

    def setup(self, layout: str, side: str, tp: int, rank: int, bs: int, tokens: int, backend: str) -> bytes:
        import kvxfer
        from kvxfer.reshard import tp_kv_heads

        torch = self.torch
        self.close()
        self.layout, self.side, self.tokens = layout, side, tokens
        self.spec = _spec(layout, tp, rank, bs)
        h0, h1 = (0, 1) if self.spec.mla else tp_kv_heads(HEADS, tp, rank)
        self.heads = (h0, h1)
        nb, ids = _blocks(tokens, bs, 1 if side == "src" else 2)
        self.ids = ids
        dim = MLA_DIM if layout == "mla" else HEAD_DIM
        h = h1 - h0
        shape = {"fa": (2, nb, bs, h, dim), "fi": (nb, 2, h, bs, dim), "mla": (nb, bs, dim),
                 "nhc": (nb, bs, h, 2 * dim), "hnc": (nb, h, bs, 2 * dim), "blnhc": (nb, LAYERS, bs, h, 2 * dim)}[layout]
        tok = torch.arange(tokens, device=self.dev)
        blk = torch.tensor(ids, device=self.dev)[tok // bs]
        off = tok % bs

        def alloc(shp):
            if side == "src":
                return torch.randint(-32768, 32767, shp, dtype=torch.int16, device=self.dev)
            return torch.full(shp, 0x5A5A, dtype=torch.int16, device=self.dev)

        big = alloc(shape) if layout == "blnhc" else None  # block-major: every layer in one allocation
        for layer in range(LAYERS):
            t = big[:, layer] if big is not None else alloc(shape)
            if side == "src":
                self._view(t, layout)[:, blk, off] = self._values(layer, layout, tok, h0, h1)
            self.tensors.append(t)
        self._sync()
        self.conn = kvxfer.Connector(f"{side}{rank}", backend=backend)
        bd = 1 if layout == "fa" else 0
        self.conn.register(self.tensors, block_dim=bd)
        return self.conn.metadata()

    def connect(self, mds: list[bytes], remote_bs: int, remote_tp: int) -> None:
        self.peers = [self.conn.connect(md, allow_layout_change=True) for md in mds]
        self.remote = _spec(self.layout, remote_tp, 0, remote_bs)
        _, self.remote_ids = _blocks(self.tokens, remote_bs, 1)

    def bench(self, iters: int) -> dict:
        from kvxfer.integrations.vllm.transfer_plan import plan_reads

        torch = self.torch
        t0 = time.perf_counter()
        reads = plan_reads(self.remote, self.spec, [self.remote_ids], [self.ids], self.tokens)
        plan_us = (time.perf_counter() - t0) * 1e6
        # the host's share: planning the copy jobs of every read (what each read() does first)
        t0 = time.perf_counter()
        njobs = 0
        for r in reads:
            if r.reshard is not None:
                src_geom = self.peers[r.src_rank].metadata.geometry
                njobs += r.reshard.plan(src_geom, self.conn.layout.geometry, np.asarray(r.src_blocks),
                                        np.asarray(r.dst_blocks), None).jobs.size
        jobs_us = (time.perf_counter() - t0) * 1e6
        times, nbytes = [], 0
        for i in range(iters + 2):
            t0 = time.perf_counter()
            hs = [self.conn.read(self.peers[r.src_rank], list(r.src_blocks), list(r.dst_blocks), reshard=r.reshard)
                  for r in reads]
            nbytes = sum(h.wait(120).nbytes for h in hs)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        # verify: every token's heads, every layer
        bs = self.spec.block_size
        tok = torch.arange(self.tokens, device=self.dev)
        blk = torch.tensor(self.ids, device=self.dev)[tok // bs]
        off = tok % bs
        bad = [layer for layer, t in enumerate(self.tensors)
               if not torch.equal(self._view(t, self.layout)[:, blk, off], self._values(layer, self.layout, tok,
                                                                                          *self.heads))]
        # baseline: a device copy of the same bytes, same process, same GPU
        a = torch.empty(nbytes, dtype=torch.uint8, device=self.dev).fill_(1)
        b = torch.empty_like(a)
        copies = []
        for i in range(iters + 2):
            self._sync()
            t0 = time.perf_counter()
            b.copy_(a)
            self._sync()
            if i >= 2:
                copies.append(time.perf_counter() - t0)
        del a, b
        med, cmed = float(np.median(times)), float(np.median(copies))
        return {"bytes": nbytes, "reads": len(reads), "reshard": [r.reshard is not None for r in reads],
                "median_s": med, "min_s": float(min(times)), "GBps": nbytes / med / 1e9,
                "copy_median_s": cmed, "copy_GBps": nbytes / cmed / 1e9, "ratio_vs_copy": cmed / med,
                "plan_reads_us": plan_us, "reshard_plan_us": jobs_us, "reshard_jobs": njobs, "verified": not bad, "bad_layers": bad}

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def close(self) -> None:
        self.peers = []
        if self.conn is not None:
            self.conn.close()
        self.conn, self.tensors = None, []
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()


def _main(conn, device: str) -> None:
    st = _Rank(device)
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "exit":
                st.close()
                conn.send(("ok", None))
                return
            conn.send(("ok", getattr(st, cmd)(*args)))
        except Exception as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class _Proc:
    def __init__(self, device: str):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_main, args=(child, device), daemon=True)
        self.proc.start()

    def __call__(self, cmd: str, *args, timeout: float = 300.0):
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{cmd!r} took over {timeout} s")
        status, out = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{cmd!r} failed: {out}")
        return out

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self("exit", timeout=30)
            except Exception:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layouts", default="fa,fi,mla,nhc,hnc,blnhc")
    ap.add_argument("--backend", default="cuda_ipc")
    ap.add_argument("--device", default="cuda:0", help="torch device of all three processes (cpu: a smoke run, tcp)")
    ap.add_argument("--commit", default=None, help="git commit to record (when the tree has no .git)")
    a = ap.parse_args()
    import torch

    card = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    srcs, dst = [_Proc(a.device), _Proc(a.device)], _Proc(a.device)
    results = []
    try:
        for layout in a.layouts.split(","):
            for name, stp, dtp, sbs, dbs in CASES:
                try:
                    mds = [srcs[r]("setup", layout, "src", stp, r, sbs, a.tokens, a.backend) for r in range(stp)]
                    dst("setup", layout, "dst", dtp, 0, dbs, a.tokens, a.backend)
                    dst("connect", mds, sbs, stp)
                    r = dst("bench", a.iters)
                except Exception as exc:  # one failed case does not hide the others
                    r = {"error": str(exc)[:2000]}
                finally:
                    for p in [dst] + srcs[:stp]:
                        try:
                            p("close")
                        except Exception:
                            pass
                r.update(layout=layout, case=name, prefill_tp=stp, decode_tp=dtp, prefill_block_size=sbs,
                         decode_block_size=dbs, tokens=a.tokens, decode_rank=0)
                results.append(r)
                if "error" in r:
                    print(f"{layout:4s} {name:16s} ERROR {r['error'][:300]}", flush=True)
                else:
                    print(f"{layout:4s} {name:16s} {r['bytes'] / 2**20:8.1f} MiB  {r['reads']} read(s)  "
                          f"{r['GBps']:7.1f} GB/s  copy {r['copy_GBps']:7.1f} GB/s  ratio {r['ratio_vs_copy']:.3f}  "
                          f"verified {r['verified']}", flush=True)
    finally:
        for p in [dst] + srcs:
            p.close()
    out = {
        "bench": "bench_vllm_layouts",
        "card": card,
        "gpus": f"three processes on {a.device}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": a.commit or _git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "model": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "mla_dim": MLA_DIM, "dtype": "bf16"},
        "backend": a.backend,
        "results": results,
    }
    text = json.dumps(out, indent=1)
    path = a.out or (os.path.join(os.environ["OUT"], "vllm_layouts.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            f.write(text)
    ok = all(r.get("verified") for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
