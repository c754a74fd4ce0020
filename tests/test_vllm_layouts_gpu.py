"""GPU tests of the vLLM worker side without vLLM: CUDA tensors in vLLM's layouts (FlashAttention
NHD, FlashInfer HND, MLA, and vLLM 0.33's LBNHC / LBHNC / block-major BLNHC), one Connector per tensor-parallel rank, each rank its own process on
one GPU, reads planned by :mod:`kvxfer.integrations.vllm.transfer_plan` (one read per remote
rank, heads and tokens mapped by the reshard), over cuda_ipc and over tcp.

Every case is a :class:`vllm_layouts.Case`: each process builds its rank's cache from it (the
destination poisoned, its cached prefix filled), and the destination compares every byte of
its cache after the reads with the numpy oracle (tokens moved, everything else untouched).
The processes are driven over a multiprocessing pipe (test plumbing only).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any

import numpy as np
import pytest

import vllm_layouts as vl


def _gpus() -> tuple[int, str]:
    try:
        import torch
    except ImportError as exc:
        return 0, f"torch is not installed ({exc})"
    try:
        return torch.cuda.device_count(), "no CUDA device"
    except Exception as exc:
        return 0, f"no CUDA device ({exc})"


_NGPU, _WHY = _gpus()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_NGPU < 1, reason=f"needs a CUDA GPU and torch: {_WHY}")]


# ------------------------------------------------------------------------------------------
# rank process
# ------------------------------------------------------------------------------------------
class _Rank:
    def __init__(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        self.torch = torch
        self.conn = None
        self.tensors: list = []
        self.peers: list = []
        self.case: vl.Case | None = None
        self.rank = 0

    def setup(self, case: vl.Case, side: str, rank: int, backend: str, device: str = "cuda:0") -> bytes:
        import kvxfer

        torch = self.torch
        self.close()
        self.case, self.rank = case, rank
        arrs = case.source(rank) if side == "src" else case.before(rank)
        dt = np.int16 if case.itemsize == 2 else np.uint8
        # each allocation once, each layer a view of it with the numpy array's strides
        # (block-major layouts keep every layer inside one allocation)
        uploaded: dict[int, Any] = {}
        self.tensors = []
        for a in arrs:
            root, off = vl.root_of(a)
            if id(root) not in uploaded:
                uploaded[id(root)] = torch.from_numpy(root.view(dt)).to(device)
            big = uploaded[id(root)]
            self.tensors.append(big.as_strided(a.shape, [x // a.itemsize for x in a.strides], off // a.itemsize))
        if device != "cpu":
            torch.cuda.synchronize()
        self.conn = kvxfer.Connector(f"{side}{rank}", backend=backend)
        self.conn.register(self.tensors, block_dim=vl.block_dim(case.layout))
        return self.conn.metadata()

    def connect(self, metadata: list[bytes]) -> list[str]:
        self.peers = [self.conn.connect(md, allow_layout_change=True) for md in metadata]
        return [p.backend for p in self.peers]

    def pull(self) -> tuple[list[str], int, int]:
        """Plan this rank's reads, run them all at once, compare every byte with the oracle.
        Returns (problems, bytes moved, reads)."""
        case = self.case
        reads = case.reads(self.rank)
        handles = [self.conn.read(self.peers[r.src_rank], list(r.src_blocks), list(r.dst_blocks), reshard=r.reshard)
                   for r in reads]
        moved = sum(h.wait(60).nbytes for h in handles)
        return self.check()[0], moved, len(reads)

    def push(self) -> int:
        """Source rank, push mode: write what every destination rank (``self.peers[c]``) needs
        from this rank. Returns the bytes written."""
        from kvxfer.integrations.vllm.transfer_plan import plan_writes

        case = self.case
        handles = []
        for c, peer in enumerate(self.peers):
            for w in plan_writes(case.spec("src", self.rank), case.spec("dst", c), [case.blocks("src")],
                                 [case.blocks("dst")], case.tokens, case.cached):
                handles.append(self.conn.write(peer, list(w.src_blocks), list(w.dst_blocks), reshard=w.reshard))
        return sum(h.wait(60).nbytes for h in handles)

    def check(self) -> tuple[list[str], None]:
        """Compare every byte of this destination rank's cache with the oracle."""
        case = self.case
        reads = case.reads(self.rank)
        if self.tensors and self.tensors[0].is_cuda:
            self.torch.cuda.synchronize()
        bad = []
        for layer, (t, want) in enumerate(zip(self.tensors, case.expected(self.rank, reads))):
            got = t.cpu().numpy().view(want.dtype)
            if not np.array_equal(got, want):
                diff = np.argwhere(got != want)
                bad.append(f"layer {layer}: {diff.shape[0]} elements differ, first at {diff[0].tolist()}")
        return bad, None

    def close(self) -> None:
        self.peers = []
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.tensors = []
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()


def _rank_main(conn) -> None:
    st = _Rank()
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


class RankProcess:
    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_rank_main, args=(child,), daemon=True)
        self.proc.start()

    def __call__(self, cmd: str, *args, timeout: float = 120.0):
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"rank process did not answer {cmd!r} within {timeout} s")
        status, out = self.conn.recv()
        if status != "ok":
            raise AssertionError(f"rank command {cmd!r} failed: {out}")
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
                self.proc.join(10)


@pytest.fixture(scope="module")
def ranks():
    """Four rank processes on GPU 0, reused by every case (two per side at most)."""
    procs = [RankProcess() for _ in range(4)]
    yield procs
    for p in procs:
        p.close()


def _run(ranks, case: vl.Case, backend: str, device: str = "cuda:0") -> list[int]:
    """Set up every rank of both engines, let each destination rank pull; returns bytes per rank."""
    src, dst = ranks[: case.src_tp], ranks[2: 2 + case.dst_tp]
    assert case.src_tp <= 2 and case.dst_tp <= 2
    try:
        mds = [p("setup", case, "src", r, backend, device) for r, p in enumerate(src)]
        for r, p in enumerate(dst):
            p("setup", case, "dst", r, backend, device)
        moved = []
        for r, p in enumerate(dst):
            assert p("connect", mds) == [backend] * len(mds)
            bad, nbytes, nreads = p("pull")
            assert bad == [], f"{case} rank {r}: {bad}"
            assert nreads == len({x.src_rank for x in case.reads(r)})  # one read per remote rank
            moved.append(nbytes)
        return moved
    finally:
        for p in dst + src:
            p("close")


def _push(ranks, case: vl.Case, backend: str, device: str = "cuda:0") -> None:
    """Every source rank writes what each destination rank needs from it; each destination
    rank then holds exactly the oracle's bytes."""
    src, dst = ranks[: case.src_tp], ranks[2: 2 + case.dst_tp]
    try:
        for r, p in enumerate(src):
            p("setup", case, "src", r, backend, device)
        mds = [p("setup", case, "dst", r, backend, device) for r, p in enumerate(dst)]
        for p in src:
            assert p("connect", mds) == [backend] * len(mds)
        from kvxfer.integrations.vllm.transfer_plan import consumer_ranks

        pushed = [p("push") for p in src]  # a source no consumer reads from (MLA 2 -> 1) writes nothing
        assert [n > 0 for n in pushed] == [bool(consumer_ranks(case.spec("src", r), case.spec("dst", 0)))
                                           for r in range(case.src_tp)]
        for r, p in enumerate(dst):
            bad, _ = p("check")
            assert bad == [], f"{case} rank {r}: {bad}"
    finally:
        for p in dst + src:
            p("close")


def _case(layout: str, src_tp: int, dst_tp: int, bs_src: int, bs_dst: int, cached: int = 0) -> vl.Case:
    heads, dim = (1, 576) if layout == "mla" else (8, 128)
    return vl.Case(layout, heads, src_tp, dst_tp, bs_src, bs_dst, tokens=300, cached=cached, dim=dim, layers=3,
                   seed=src_tp * 7 + dst_tp + bs_src + bs_dst)


CASES = [  # (src_tp, dst_tp, bs_src, bs_dst, cached)
    (2, 1, 16, 16, 0),
    (1, 2, 16, 16, 0),
    (1, 1, 16, 64, 0),
    (1, 1, 64, 16, 0),
    (2, 1, 16, 64, 0),
    (1, 2, 64, 16, 32),
]


@pytest.mark.parametrize("layout", vl.LAYOUTS + vl.LAYOUTS_V33)
@pytest.mark.parametrize("src_tp,dst_tp,bs_src,bs_dst,cached", CASES)
def test_cuda_ipc_reads_byte_exact(ranks, layout, src_tp, dst_tp, bs_src, bs_dst, cached):
    case = _case(layout, src_tp, dst_tp, bs_src, bs_dst, cached)
    moved = _run(ranks, case, "cuda_ipc")
    assert all(m > 0 for m in moved)


@pytest.mark.parametrize("layout", vl.LAYOUTS + vl.LAYOUTS_V33)
@pytest.mark.parametrize("src_tp,dst_tp,bs_src,bs_dst,cached", [(2, 1, 16, 64, 0), (1, 2, 64, 16, 32)])
def test_cuda_ipc_push_byte_exact(ranks, layout, src_tp, dst_tp, bs_src, bs_dst, cached):
    _push(ranks, _case(layout, src_tp, dst_tp, bs_src, bs_dst, cached), "cuda_ipc")


@pytest.mark.parametrize("layout", ["fa", "fi", "blnhc"])
@pytest.mark.parametrize("src_tp,dst_tp,bs_src,bs_dst,cached", [(2, 1, 16, 64, 0), (1, 2, 64, 16, 32)])
def test_tcp_reads_byte_exact(ranks, layout, src_tp, dst_tp, bs_src, bs_dst, cached):
    _run(ranks, _case(layout, src_tp, dst_tp, bs_src, bs_dst, cached), "tcp")


def test_flashattention_prefill_to_flashinfer_decode(ranks):
    """NHD on the producer, HND on the consumer, TP 2 -> 1 and 16 -> 64 at once: the orders
    are a property of each side's spec, so a Case of one layout cannot express it; checked here
    on the tensors directly."""
    _fa_to_fi(ranks, "cuda_ipc", "cuda:0")


def _fa_to_fi(ranks, backend: str, device: str) -> None:
    import torch

    import kvxfer
    from kvxfer.integrations.vllm.transfer_plan import plan_reads

    nhd, hnd = (vl.Case(lay, 8, 2, 1, 16, 64, 200, dim=128, layers=2, seed=3) for lay in ("fa", "fi"))
    G = nhd.G()
    # the consumer's tensors live in this (test) process; the producers' in two rank processes
    mds = [ranks[r]("setup", nhd, "src", r, backend, device) for r in range(2)]
    try:
        before = hnd.before(0, G)
        dst = [torch.from_numpy(a.view(np.int16)).to(device) for a in before]
        with kvxfer.Connector("decode", backend=backend) as c:
            c.register(dst, block_dim=0)
            peers = [c.connect(md, allow_layout_change=True) for md in mds]
            reads = plan_reads(nhd.spec("src", 0), hnd.spec("dst", 0), [nhd.blocks("src")], [hnd.blocks("dst")],
                               200)
            assert [r.src_rank for r in reads] == [0, 1]
            for h in [c.read(peers[r.src_rank], list(r.src_blocks), list(r.dst_blocks), reshard=r.reshard)
                      for r in reads]:
                h.wait(60)
            if device != "cpu":
                torch.cuda.synchronize()
            got = [t.cpu().numpy().view(np.uint16) for t in dst]
        # oracle: NHD source blocks, HND destination blocks; ids as each Case gives them
        want = [a.copy() for a in before]
        t = np.arange(200)
        db = np.asarray(hnd.blocks("dst"))
        for layer, w in enumerate(want):
            vl.token_view(w, "fi")[:, db[t // 64], t % 64] = G[layer, :, t].transpose(1, 0, 2, 3)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    finally:
        for r in range(2):
            ranks[r]("close")



@pytest.mark.parametrize("bs_src,bs_dst", [(16, 64), (64, 16), (16, 48), (48, 16)])
@pytest.mark.parametrize("src_order,dst_order", [("nhd", "nhd"), ("hnd", "hnd"), ("nhd", "hnd")])
def test_token_reshard_kernel_in_one_process(bs_src, bs_dst, src_order, dst_order):
    """The copy kernel on a token-mapped plan (block-to-block, and gather + scatter through a
    buffer as TCP does) against the numpy reference; every destination byte compared."""
    pytest.importorskip("cupy", reason="the CUDA copy kernels need cupy (NVRTC)")
    import torch

    from kvxfer.layout import KVLayout
    from kvxfer.ops import cuda as ops
    from kvxfer.ops import reference
    from kvxfer.reshard import BlockFormat, HeadOrder, HeadReshard

    H, D, layers, n, s0, d0 = 8, 128, 3, 300, 5, 7  # starts mid-block on both sides
    so, do = HeadOrder(src_order), HeadOrder(dst_order)

    def shape(order, nb, bs, h):
        return (2, nb, bs, h, D) if order is HeadOrder.NHD else (2, nb, h, bs, D)

    ns, nd = -(-(s0 + n) // bs_src), -(-(d0 + n) // bs_dst)
    src = [torch.randint(-32768, 32767, shape(so, ns + 6, bs_src, H), dtype=torch.int16, device="cuda")
           for _ in range(layers)]
    dst = [torch.full(shape(do, nd + 3, bs_dst, 4), 0x5A5A, dtype=torch.int16, device="cuda") for _ in range(layers)]
    sl, dl = KVLayout.from_tensors(src, block_dim=1), KVLayout.from_tensors(dst, block_dim=1)
    rng = np.random.default_rng(bs_src + bs_dst)
    sb, db = rng.permutation(ns + 6)[:ns], rng.permutation(nd + 3)[:nd]
    rs = HeadReshard(BlockFormat(so, bs_src, H, D, 2), BlockFormat(do, bs_dst, 4, D, 2), (4, 8), 0,
                     num_tokens=n, src_start=s0, dst_start=d0)
    plan = rs.plan(sl.geometry, dl.geometry, sb, db, None)
    host = lambda ts: [t.reshape(-1).view(torch.uint8).cpu().numpy() for t in ts]  # noqa: E731
    want = host(dst)
    reference.copy_blocks(plan, host(src), want)
    ops.copy_blocks(plan, sl, dl)
    torch.cuda.synchronize()
    for g, w in zip(host(dst), want):
        np.testing.assert_array_equal(g, w)
    for t in dst:
        t.fill_(0x5A5A)
    buf = torch.empty(plan.nbytes, dtype=torch.uint8, device="cuda")
    ops.gather(plan, sl, buf)
    ops.scatter(plan, buf, dl)
    torch.cuda.synchronize()
    for g, w in zip(host(dst), want):
        np.testing.assert_array_equal(g, w)
