"""GPU tests of the cuda_ipc backend: connectors in separate processes (spawn) on one or two GPUs.

Each agent process holds one Connector and its KV tensors and is driven over a multiprocessing
pipe (test plumbing only; the transfers themselves go through CUDA IPC and kvxfer's control
link). Tensor contents are a deterministic pattern of (element index, layer, salt), so a
process can check blocks it received against blocks of a tensor it never saw. Destinations are
poisoned with another salt before every transfer.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback

import numpy as np
import pytest

gpu = [pytest.mark.gpu, pytest.mark.multigpu]


def _gpu_count() -> tuple[int, str]:
    try:
        import cupy
    except ImportError as exc:
        return 0, f"cupy is not installed ({exc})"
    try:
        return int(cupy.cuda.runtime.getDeviceCount()), ""
    except Exception as exc:  # no driver / no GPU
        return 0, f"no CUDA device ({exc})"


_NGPU, _WHY = _gpu_count()
_skip_two = pytest.mark.skipif(_NGPU < 2, reason=f"needs 2 CUDA GPUs and cupy; found {_NGPU} {_WHY}")
_skip_one = pytest.mark.skipif(_NGPU < 1, reason=f"needs a CUDA GPU and cupy; {_WHY}")



def needs_two(f):
    return pytest.mark.gpu(pytest.mark.multigpu(_skip_two(f)))


def needs_one(f):
    return pytest.mark.gpu(_skip_one(f))


PRODUCER_SALT = 11
POISON_SALT = 97


# ------------------------------------------------------------------------------------------
# agent process
# ------------------------------------------------------------------------------------------
def _pattern(cp, shape, layer: int, salt: int):
    n = int(np.prod(shape))
    i = cp.arange(n, dtype=cp.uint32)
    v = (i * cp.uint32(40503) + cp.uint32(layer * 977 + salt * 7919)) ^ (i >> cp.uint32(7))
    return v.astype(cp.uint16).reshape(shape)


class _State:
    def __init__(self, device: int):
        import cupy as cp

        self.cp = cp
        self.device = device
        cp.cuda.Device(device).use()
        self.conn = None
        self.tensors: list = []
        self.views: list = []  # cupy uint16 views of the tensors
        self.block_dim = 1
        self.peers: list = []
        self.pending: list = []

    def u16(self, t):
        cp = self.cp
        if type(t).__module__.startswith("torch"):
            import torch

            assert t.is_contiguous()
            mem = cp.cuda.UnownedMemory(int(t.data_ptr()), t.numel() * t.element_size(), t, self.device)
            return cp.ndarray(tuple(t.shape), dtype=cp.uint16, memptr=cp.cuda.MemoryPointer(mem, 0))
        return t.view(cp.uint16)  # int16 on both libraries: same dtype, same fingerprint

    def setup(self, name: str, shape, block_dim: int, layers: int, lib: str, salt: int, backend: str,
              one_alloc: bool = False):
        import kvxfer

        self.close_conn()
        cp = self.cp
        shape = tuple(shape)
        if lib == "torch":
            import torch

            dev = torch.device("cuda", self.device)
            torch.cuda.set_device(dev)
            if one_alloc:  # every layer inside one allocation: exercises base + offset
                per = int(np.prod(shape))
                big = torch.empty(per * layers + 4096, dtype=torch.int16, device=dev)
                self.tensors = [big[1024 + l * per: 1024 + (l + 1) * per].view(shape) for l in range(layers)]
            else:
                self.tensors = [torch.empty(shape, dtype=torch.int16, device=dev) for _ in range(layers)]
        else:
            self.tensors = [cp.empty(shape, dtype=cp.int16) for _ in range(layers)]
        self.views = [self.u16(t) for t in self.tensors]
        for l, v in enumerate(self.views):
            v[...] = _pattern(cp, shape, l, salt)
        cp.cuda.Device(self.device).synchronize()
        self.block_dim = block_dim
        self.conn = kvxfer.Connector(name, backend=backend)
        self.conn.register(self.tensors, block_dim=block_dim)
        return self.conn.metadata()

    def close_conn(self):
        self.peers, self.pending = [], []
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.tensors, self.views = [], []
        self.cp.get_default_memory_pool().free_all_blocks()
        try:
            import torch

            torch.cuda.empty_cache()
        except ImportError:
            pass

    def poison(self):
        for l, v in enumerate(self.views):
            v[...] = _pattern(self.cp, v.shape, l, POISON_SALT)
        self.cp.cuda.Device(self.device).synchronize()

    def verify(self, src_shape, salt: int, src_ids, dst_ids, layers=None, heads=None):
        """Destination blocks hold the source pattern; everything else keeps the poison."""
        cp, bd = self.cp, self.block_dim
        src_ids = cp.asarray(np.asarray(src_ids, dtype=np.int64))
        dst_np = np.asarray(dst_ids, dtype=np.int64)
        dst_ids_c = cp.asarray(dst_np)
        nb = self.views[0].shape[bd]
        others = np.setdiff1d(np.arange(nb), dst_np)[:16]
        bad = []
        for l, v in enumerate(self.views):
            got = cp.take(v, dst_ids_c, axis=bd)
            if layers is None or l in layers:
                exp = cp.take(_pattern(cp, tuple(src_shape), l, salt), src_ids, axis=bd)
                if heads is not None:
                    exp = exp[..., heads[0]:heads[1], :]
            else:
                exp = cp.take(_pattern(cp, v.shape, l, POISON_SALT), dst_ids_c, axis=bd)
            if exp.shape != got.shape or not bool((exp == got).all()):
                bad.append(f"layer {l}: destination blocks differ")
            if others.size:
                o = cp.asarray(others)
                if not bool((cp.take(v, o, axis=bd) == cp.take(_pattern(cp, v.shape, l, POISON_SALT), o, axis=bd)).all()):
                    bad.append(f"layer {l}: a block outside the destination changed")
        return bad


_SPIN = r"""
extern "C" __global__ void spin(long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while ((long long)(t - t0) < ns);
}"""


def _spin(cp, stream_ptr: int, seconds: float) -> None:
    """Keep ``stream`` busy for ``seconds`` (wall clock, independent of SM clocks)."""
    k = cp.RawKernel(_SPIN, "spin")
    k((1,), (1,), (np.int64(seconds * 1e9),), stream=cp.cuda.ExternalStream(stream_ptr))


def _agent_main(conn, device: int, env: dict) -> None:
    os.environ.update(env)
    st = _State(device)
    from kvxfer.backends.cuda_ipc import handles as ipc
    from kvxfer.metadata import PeerMetadata

    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "exit":
                st.close_conn()
                conn.send(("ok", None))
                return
            if cmd == "setup":
                out = st.setup(*args)
            elif cmd == "poison":
                out = st.poison()
            elif cmd == "connect":
                p = st.conn.connect(args[0])
                st.peers.append(p)
                out = (len(st.peers) - 1, p.backend)
            elif cmd in ("read", "write"):
                peer, src, dst, kw = args
                fn = st.conn.read if cmd == "read" else st.conn.write
                h = fn(st.peers[peer], src, dst, **kw)
                out = h.wait(30).nbytes
            elif cmd == "verify":
                out = st.verify(*args)
            elif cmd == "note":
                out = st.conn.wait_notification(args[0]).payload
            elif cmd == "stalled_reads":  # reads queued behind a long kernel on the caller's stream
                import torch

                peer, n, timeout, explicit = args
                torch.cuda.set_device(device)
                # one read first: the first launch of a kernel in a process loads it, and CUDA's
                # lazy loading may wait for the device meanwhile (here: for the stall below)
                st.conn.read(st.peers[peer], [n], [n], timeout=timeout).wait(timeout)
                stream = torch.cuda.Stream(device) if explicit else torch.cuda.current_stream(device)
                with torch.cuda.stream(stream):
                    if explicit:
                        _spin(st.cp, int(stream.cuda_stream), 2.0)
                    else:  # torch's own kernel, so it surely lands on torch's default stream of this device
                        khz = st.cp.cuda.runtime.deviceGetAttribute(13, device)  # cudaDevAttrClockRate
                        torch.cuda._sleep(int(2.0 * khz * 1000))
                    t0 = time.monotonic()
                    st.pending = [(st.conn.read(st.peers[peer], [i], [i], timeout=timeout), t0) for i in range(n)]
                out = ([h.status.value for h, _ in st.pending], int(stream.cuda_stream), not stream.query())
            elif cmd == "wait_pending":
                res = []
                for h, t0 in st.pending:
                    try:
                        h.wait(args[0])
                        res.append(("done", time.monotonic() - t0))
                    except Exception as exc:
                        res.append((type(exc).__name__, time.monotonic() - t0))
                out = res
            elif cmd == "mappings":
                st.cp.cuda.Device(device).synchronize()
                time.sleep(0.2)
                out = ipc.open_handle_count()
            elif cmd == "reshard_read":
                from kvxfer.reshard import BlockFormat, HeadOrder, HeadReshard

                md, src, dst, heads, H = args
                peer = st.conn.connect(md, allow_layout_change=True)
                st.peers.append(peer)
                shp = st.views[0].shape  # [2, NB, BS, h, D]
                sf = BlockFormat(HeadOrder.NHD, shp[2], H, shp[4], 2)
                df = BlockFormat(HeadOrder.NHD, shp[2], shp[3], shp[4], 2)
                h = st.conn.read(peer, src, dst, reshard=HeadReshard(sf, df, heads), notify=b"heads", timeout=60)
                out = (h.wait(30).nbytes, peer.backend)
            elif cmd == "endpoint_error":
                out = PeerMetadata.from_bytes(st.conn.metadata()).backends.get("cuda_ipc", {}).get("err")
            elif cmd == "try_setup":
                try:
                    st.setup(*args)
                    out = ("ok", st.conn.backends)
                except Exception as exc:
                    out = (type(exc).__name__, str(exc))
            else:
                raise ValueError(cmd)
            conn.send(("ok", out))
        except Exception as exc:
            conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class Agent:
    def __init__(self, device: int, env: dict | None = None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_agent_main, args=(child, device, env or {}), daemon=True)
        self.proc.start()

    def __call__(self, cmd: str, *args, timeout: float = 120.0):
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"agent did not answer {cmd!r} within {timeout} s")
        status, out = self.conn.recv()
        if status != "ok":
            raise AssertionError(f"agent command {cmd!r} failed: {out}")
        return out

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self):
        if self.proc.is_alive():
            try:
                self("exit", timeout=30)
            except Exception:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()


def _workloads():
    from kvxfer.ops.workloads import STANDARD

    return STANDARD


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------
@needs_two
def test_every_standard_workload_pull_push_and_layer_subsets():
    prod, cons = Agent(0), Agent(1)
    try:
        for i, wl in enumerate(_workloads()):
            lib_p = "torch" if i % 2 == 0 else "cupy"
            lib_c = "cupy" if i % 2 == 0 else "torch"
            md_p = prod("setup", "prod", wl.shape, wl.block_dim, wl.layers, lib_p, PRODUCER_SALT, "cuda_ipc", i == 2)
            md_c = cons("setup", "cons", wl.shape, wl.block_dim, wl.layers, lib_c, POISON_SALT, "cuda_ipc", i == 3)
            src, dst = wl.block_ids()
            pi, backend = cons("connect", md_p)
            assert backend == "cuda_ipc"
            # pull: the consumer reads the producer's blocks; the producer hears after the copy
            nbytes = cons("read", pi, src, dst, {"notify": b"pulled"})
            assert nbytes == wl.nbytes
            assert prod("note", 10.0) == b"pulled"
            assert cons("verify", wl.shape, PRODUCER_SALT, src, dst) == [], wl.name
            # push: the producer writes into the consumer and notifies it
            cons("poison")
            qi, backend = prod("connect", md_c)
            assert backend == "cuda_ipc"
            prod("write", qi, src, dst, {"notify": b"pushed"})
            assert cons("note", 10.0) == b"pushed"
            assert cons("verify", wl.shape, PRODUCER_SALT, src, dst) == [], wl.name
            # layer subset, pull
            if wl.layers > 2:
                layers = [0, wl.layers // 2, wl.layers - 1]
                cons("poison")
                cons("read", pi, src, dst, {"layers": layers})
                assert cons("verify", wl.shape, PRODUCER_SALT, src, dst, layers) == [], wl.name
    finally:
        cons.close()
        prod.close()


@needs_one
def test_same_gpu_two_processes():
    from kvxfer.ops.workloads import by_name

    wl = by_name("small")
    prod, cons = Agent(0), Agent(0)
    try:
        md_p = prod("setup", "prod", wl.shape, wl.block_dim, wl.layers, "torch", PRODUCER_SALT, "cuda_ipc")
        md_c = cons("setup", "cons", wl.shape, wl.block_dim, wl.layers, "cupy", POISON_SALT, "cuda_ipc")
        src, dst = np.array([5, 6, 7, 100]), np.array([9, 10, 11, 3])
        pi, backend = cons("connect", md_p)
        assert backend == "cuda_ipc"
        cons("read", pi, src, dst, {})
        assert cons("verify", wl.shape, PRODUCER_SALT, src, dst) == []
        cons("poison")
        qi, _ = prod("connect", md_c)
        prod("write", qi, src, dst, {"notify": b"n"})
        assert cons("note", 10.0) == b"n"
        assert cons("verify", wl.shape, PRODUCER_SALT, src, dst) == []
    finally:
        cons.close()
        prod.close()


@needs_two
def test_heterogeneous_tp_two_consumers_each_pull_half_the_heads():
    L, NB, BS, H, D = 4, 256, 16, 8, 128
    prod, c0, c1 = Agent(0), Agent(1), Agent(0)
    try:
        md_p = prod("setup", "prod", (2, NB, BS, H, D), 1, L, "torch", PRODUCER_SALT, "cuda_ipc")
        rng = np.random.default_rng(3)
        src = rng.permutation(NB)[:64]
        for rank, c in enumerate((c0, c1)):
            c("setup", f"cons{rank}", (2, NB, BS, H // 2, D), 1, L, "torch", POISON_SALT, "cuda_ipc")
            dst = rng.permutation(NB)[:64]
            heads = (rank * H // 2, (rank + 1) * H // 2)
            _, via = c("reshard_read", md_p, src, dst, heads, H)
            assert via == "cuda_ipc"
            assert prod("note", 10.0) == b"heads"
            assert c("verify", (2, NB, BS, H, D), PRODUCER_SALT, src, dst, None, heads) == []
    finally:
        for a in (c0, c1, prod):
            a.close()


@needs_two
def test_reads_wait_for_work_on_the_default_stream():
    from kvxfer.ops.workloads import by_name

    wl = by_name("small")
    prod, cons = Agent(0), Agent(1)
    try:
        md = prod("setup", "p", wl.shape, wl.block_dim, wl.layers, "torch", PRODUCER_SALT, "cuda_ipc")
        cons("setup", "cons", wl.shape, wl.block_dim, wl.layers, "torch", POISON_SALT, "cuda_ipc")
        i, _ = cons("connect", md)
        states, sptr, busy = cons("stalled_reads", i, 2, 8.0, False)
        assert busy, f"the default stream {sptr} was not busy after queueing the sleep"
        assert states == ["pending"] * 2, f"copies did not wait for the default stream: {states}"
        assert [k for k, _ in cons("wait_pending", 10.0)] == ["done", "done"]
    finally:
        for a in (cons, prod):
            a.close()


@needs_two
def test_producer_killed_mid_run_fails_pending_and_consumer_goes_on():
    from kvxfer.ops.workloads import by_name

    wl = by_name("small")
    p1, p2, cons = Agent(0), Agent(0), Agent(1)
    try:
        md1 = p1("setup", "p1", wl.shape, wl.block_dim, wl.layers, "torch", PRODUCER_SALT, "cuda_ipc")
        md2 = p2("setup", "p2", wl.shape, wl.block_dim, wl.layers, "torch", PRODUCER_SALT, "cuda_ipc")
        cons("setup", "cons", wl.shape, wl.block_dim, wl.layers, "torch", POISON_SALT, "cuda_ipc")
        i1, _ = cons("connect", md1)
        i2, _ = cons("connect", md2)
        mapped_both = cons("mappings")
        problems = []
        # producer killed while reads are pending (queued behind a busy explicit stream)
        timeout = 8.0
        states, sptr, busy = cons("stalled_reads", i1, 4, timeout, True)
        if states != ["pending"] * 4:
            problems.append(f"explicit stream {sptr} (busy={busy}): copies did not wait for it: {states}")
        p1.kill()
        res = cons("wait_pending", timeout + 5)
        for kind, elapsed in res:
            if kind != "PeerLostError" or elapsed >= timeout:
                problems.append(f"pending read on the killed producer ended {kind} after {elapsed:.2f} s")
        # the consumer keeps working with the other producer
        cons("poison")
        cons("read", i2, [1, 2], [3, 4], {})
        assert cons("verify", wl.shape, PRODUCER_SALT, [1, 2], [3, 4]) == []
        # the dead producer's mappings are closed once the stalled kernel finished
        deadline = time.monotonic() + 10
        while cons("mappings") >= mapped_both and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cons("mappings") < mapped_both
        assert not problems, problems
    finally:
        for a in (cons, p2, p1):
            a.close()


@needs_one
def test_expandable_segments_error_names_cause_and_fix():
    from kvxfer.ops.workloads import by_name

    wl = by_name("small")
    a = Agent(0, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    try:
        kind, msg = a("try_setup", "vmm", wl.shape, wl.block_dim, 2, "torch", PRODUCER_SALT, "cuda_ipc")
        assert kind == "BackendUnavailableError", (kind, msg)
        assert "expandable_segments" in msg and "PYTORCH_CUDA_ALLOC_CONF" in msg, msg
        # auto: registration works, the endpoint says why peers cannot map us
        kind, backends = a("try_setup", "vmm2", wl.shape, wl.block_dim, 2, "torch", PRODUCER_SALT, "auto")
        assert kind == "ok", backends
        err = a("endpoint_error")
        assert err and "expandable_segments" in err, err
    finally:
        a.close()


# ------------------------------------------------------------------------------------------
# CPU: endpoint validation and range checks (no GPU needed)
# ------------------------------------------------------------------------------------------
def _peer_with_endpoint(ep: dict):
    from kvxfer._tensors import MemoryKind
    from kvxfer.layout import KVLayout
    from kvxfer.metadata import PeerMetadata
    from dataclasses import replace

    lay = KVLayout.from_tensors([np.zeros((2, 8, 64), dtype=np.uint16)] * 1, block_dim=1)
    geom = replace(lay.geometry, memory=MemoryKind.CUDA)
    return PeerMetadata("p", "s", "boot", 1, geom, 0, {"cuda_ipc": ep}), geom


def test_endpoint_validation_refuses_malformed_and_out_of_allocation_tensors():
    from kvxfer.backends.cuda_ipc.endpoint import ENDPOINT_VERSION, parse_endpoint as _parse_endpoint
    from kvxfer.errors import BackendUnavailableError, TransportError

    good = {"v": ENDPOINT_VERSION, "bus": "0000:01:00.0", "dev": 0, "h": [b"x" * 64], "z": [1 << 20],
            "t": [[0, 128]], "err": None}
    peer, geom = _peer_with_endpoint(good)
    ep = _parse_endpoint(peer)
    assert ep.tensors == ((0, 128),)
    for bad in ({"h": [b"x" * 63]}, {"t": [[1, 0]]}, {"t": [[0, (1 << 20) - 16]]}, {"z": [-1]}, {"t": []}):
        with pytest.raises(TransportError):
            _parse_endpoint(_peer_with_endpoint({**good, **bad})[0])
    with pytest.raises(BackendUnavailableError, match="expandable"):
        _parse_endpoint(_peer_with_endpoint({**good, "err": "expandable_segments"})[0])


def test_jobs_are_checked_against_registered_spans():
    from kvxfer.backends.cuda_ipc.endpoint import check_jobs_within as _check_within
    from kvxfer.errors import BlockIdError
    from kvxfer.plan import JOB_DTYPE

    jobs = np.zeros(2, dtype=JOB_DTYPE)
    jobs["src_run"] = jobs["dst_run"] = 64
    jobs["src_count"] = jobs["dst_count"] = 2
    jobs["src_stride"] = jobs["dst_stride"] = 128
    jobs["src_off"] = [0, 1000]
    spans = np.array([1000 + 128 + 64], dtype=np.int64)
    _check_within(jobs, "src", spans, "peer")
    jobs["src_off"][1] = 1001
    with pytest.raises(BlockIdError, match="outside"):
        _check_within(jobs, "src", spans, "peer")
    jobs["src_t"][0] = 1
    with pytest.raises(BlockIdError):
        _check_within(jobs, "src", spans, "peer")
