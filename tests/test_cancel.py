"""TransferHandle.cancel with a fence: after cancel() returns True, no byte of the transfer lands.

Two real OS processes (tests/kvpeers.py) over TCP and over UCX host memory: a peer stalled
mid-transfer (SIGSTOP, cancel, SIGCONT so it tries to go on writing) and a fast one (cancel at
random moments right after starting, many times). Each test checksums the destination blocks
after the cancel and watches them for a while: they must never change again. Registry pulls
and expects are cancelled in tests/registry/test_agent.py's style at the end; the cuda_ipc
case is a GPU test.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import threading
import time

import numpy as np
import pytest

from kvxfer import KvxferError, Op, TransferCancelledError, TransferHandle, TransferStatus, TransferTimeoutError
from kvpeers import LayoutSpec, PeerProcess, block_bytes

try:
    import ucxx  # noqa: F401

    _UCXX_ERR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _UCXX_ERR = f"ucxx is not importable here ({exc!r})"

BIG = LayoutSpec("kv_first", 512, layers=4, block_size=16, heads=8, head_dim=128)  # 256 KiB a block
SMALL = LayoutSpec("kv_first", 320, layers=2, block_size=16, heads=2, head_dim=32)


def _digest(tensors, bd, ids) -> str:
    h = hashlib.sha256()
    for b in block_bytes(tensors, bd, ids):
        h.update(b)
    return h.hexdigest()


def _watch_unchanged(tensors, bd, ids, before: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while True:
        now = _digest(tensors, bd, ids)
        assert now == before, "destination blocks changed after cancel() returned True"
        if time.monotonic() >= end:
            return
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# the handle alone
# --------------------------------------------------------------------------------------------
def _handle() -> TransferHandle:
    return TransferHandle(Op.READ, "p", 10, "test", np.arange(3))


def test_cancel_ends_cancelled_once_and_wait_raises():
    h = _handle()
    calls = []
    h.set_canceller(lambda t: calls.append(t) or True)
    seen = []
    h.add_done_callback(lambda hh: seen.append(hh.status))
    assert h.cancel(1.0) is True
    assert h.cancel() is True  # idempotent
    assert calls == [1.0] and seen == [TransferStatus.CANCELLED]
    assert h.status is TransferStatus.CANCELLED and h.done()
    with pytest.raises(TransferCancelledError):
        h.wait(1)
    assert isinstance(h.exception(), KvxferError)
    assert not h.set_done() and h.status is TransferStatus.CANCELLED
    assert list(h.failed_blocks) == [0, 1, 2]


def test_cancel_after_completion_changes_nothing():
    for finish in ("done", "failed"):
        h = _handle()
        h.set_canceller(lambda t: pytest.fail("no fence for a finished transfer"))
        h.set_done() if finish == "done" else h.set_failed(KvxferError("x"))
        assert h.cancel() is False
        assert h.status is (TransferStatus.DONE if finish == "done" else TransferStatus.FAILED)


def test_a_failure_during_the_fence_is_overridden_and_a_failed_fence_applies_it():
    h = _handle()
    h.set_canceller(lambda t: (h.set_failed(KvxferError("link dropped")), True)[1])
    assert h.cancel() is True and h.status is TransferStatus.CANCELLED
    h2 = _handle()

    def fence(t):
        h2.set_failed(KvxferError("late"))
        raise TimeoutError("no fence")
    h2.set_canceller(fence)
    with pytest.raises(TimeoutError):
        h2.cancel()
    assert h2.status is TransferStatus.FAILED and str(h2.exception()) == "late"


def test_concurrent_cancels_and_completion_end_in_one_state():
    for i in range(200):
        h = _handle()
        gate = threading.Event()
        h.set_canceller(lambda t: gate.wait(0.01) or True)
        results: list = []
        ts = [threading.Thread(target=lambda: results.append(h.cancel(5))) for _ in range(3)]
        done = threading.Thread(target=lambda: results.append(("done", h.set_done())))
        for t in ts:
            t.start()
        if i % 2:
            done.start()
        gate.set()
        for t in ts:
            t.join()
        if i % 2:
            done.join()
        cancels = [r for r in results if not isinstance(r, tuple)]
        if h.status is TransferStatus.CANCELLED:
            assert all(cancels) and ("done", True) not in results
        else:
            assert h.status is TransferStatus.DONE and not any(cancels)


# --------------------------------------------------------------------------------------------
# over real peers
# --------------------------------------------------------------------------------------------
BACKENDS = ["tcp", "tcp-one-big-chunk",
            pytest.param("ucx-direct", marks=pytest.mark.skipif(_UCXX_ERR is not None, reason=_UCXX_ERR or "")),
            pytest.param("ucx-packed", marks=pytest.mark.skipif(_UCXX_ERR is not None, reason=_UCXX_ERR or ""))]


@pytest.fixture
def backend(request, monkeypatch):
    name = request.param
    if name.startswith("ucx"):
        # tcp: the peer's side needs its progress (a stall stalls it); sm: one-sided copies
        monkeypatch.setenv("UCX_TLS", "sm,self" if name.endswith("-sm") else "tcp")
        monkeypatch.setenv("UCX_WARN_UNUSED_ENV_VARS", "n")
        monkeypatch.setenv("KVXFER_UCX_MODE", name.split("-")[1])
        if name.startswith("ucx-packed"):
            monkeypatch.setenv("KVXFER_UCX_CHUNK_BYTES", str(1 << 20))
        return "ucx"
    if name == "tcp-one-big-chunk":  # a stalled peer leaves a chunk half received: the link is dropped
        monkeypatch.setenv("KVXFER_TCP_STREAMS", "1")
        monkeypatch.setenv("KVXFER_TCP_CHUNK_BYTES", str(64 << 20))
        monkeypatch.setenv("KVXFER_TCP_STAGING_BYTES", str(64 << 20))
        return "tcp"
    return name


def _first_landed(tensors, ids, before) -> bool:
    return not np.array_equal(tensors[0][:, ids[:2]].view(np.uint16), before)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_cancel_a_read_from_a_stalled_peer_fences_the_blocks(backend, make_connectors):
    peer = PeerProcess("remote", BIG, seed=1, backend=backend)
    stopped = False
    try:
        local, tensors, bd = make_connectors("local", BIG, 2, backend=backend)
        p = local.connect(peer.metadata)
        ids = np.arange(BIG.num_blocks)
        for attempt in range(20):
            before = np.array(tensors[0][:, ids[:2]]).view(np.uint16)
            h = local.read(p, ids, ids, timeout=60)
            t0 = time.monotonic()
            while not _first_landed(tensors, ids, before) and not h.done() and time.monotonic() - t0 < 10:
                time.sleep(0.0005)
            os.kill(peer.proc.pid, signal.SIGSTOP)
            stopped = True
            if h.done():  # it finished before we could stall it: try again
                os.kill(peer.proc.pid, signal.SIGCONT)
                stopped = False
                h.wait(30)
                if p.closed:
                    p = local.connect(peer.metadata)
                continue
            t1 = time.monotonic()
            if backend == "ucx" and os.environ["KVXFER_UCX_MODE"] == "direct":
                # RMA from a stalled peer: no fence until its flush completes (closing the
                # endpoint is none): the cancel times out, and the handle ends CANCELLED later
                with pytest.raises(TransferTimeoutError):
                    h.cancel(timeout=0.5)
                assert h.status is TransferStatus.PENDING
                os.kill(peer.proc.pid, signal.SIGCONT)
                stopped = False
                t2 = time.monotonic()
                while not h.done() and time.monotonic() - t2 < 30:
                    time.sleep(0.01)
                assert h.status is TransferStatus.CANCELLED
                after = _digest(tensors, bd, ids)
                _watch_unchanged(tensors, bd, ids, after, 1.0)
                break
            if not h.cancel(timeout=10):
                # it completed between the check above and the cancel (the peer had already
                # sent its last bytes): False must mean done, and nothing was fenced; try again
                assert h.status is TransferStatus.DONE
                os.kill(peer.proc.pid, signal.SIGCONT)
                stopped = False
                continue
            assert time.monotonic() - t1 < 8
            assert h.status is TransferStatus.CANCELLED
            with pytest.raises(TransferCancelledError):
                h.wait(1)
            after = _digest(tensors, bd, ids)
            _watch_unchanged(tensors, bd, ids, after, 0.5)
            os.kill(peer.proc.pid, signal.SIGCONT)  # let it go on sending
            stopped = False
            _watch_unchanged(tensors, bd, ids, after, 1.0)
            break
        else:
            pytest.skip("every read completed before the peer could be stalled")
        # the peer is still usable (a new link where the cancel dropped the old one)
        p = local.connect(peer.metadata)
        local.read(p, [3, 4], [5, 6]).wait(30)
        assert block_bytes(tensors, bd, [5, 6]) == peer.call("blocks", [3, 4])
    finally:
        if stopped:
            os.kill(peer.proc.pid, signal.SIGCONT)
        peer.close()


_UCX_SKIP = pytest.mark.skipif(_UCXX_ERR is not None, reason=_UCXX_ERR or "")


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("ucx-direct-sm", marks=_UCX_SKIP),
                                                pytest.param("ucx-packed-sm", marks=_UCX_SKIP)], indirect=True)
def test_cancel_right_after_starting_many_times(backend, make_connectors):
    peer = PeerProcess("remote", SMALL, seed=5, backend=backend)
    try:
        local, tensors, bd = make_connectors("local", SMALL, 6, backend=backend)
        p = local.connect(peer.metadata)
        rng = np.random.default_rng(7)
        per, half = 4, SMALL.num_blocks // 2
        cancelled: list[tuple[np.ndarray, str]] = []
        completed: list[tuple[np.ndarray, np.ndarray]] = []
        writes = 0
        for i in range(SMALL.num_blocks // per - 2):
            dst = np.arange(i * per, (i + 1) * per)
            src = rng.choice(half, per, replace=False)  # reads come from the peer's first half
            if i % 4 == 3:  # a write (into its second half): our blocks are only read
                h = local.write(p, dst, half + src, notify=b"w")
                time.sleep(float(rng.uniform(0, 0.002)))
                h.cancel(timeout=10)
                writes += 1
                continue
            h = local.read(p, src, dst, notify=b"r")
            time.sleep(float(rng.choice([0.0, rng.uniform(0, 0.003)])))
            if h.cancel(timeout=10):
                assert h.status is TransferStatus.CANCELLED
                cancelled.append((dst, _digest(tensors, bd, dst)))
            else:
                assert h.status is TransferStatus.DONE
                completed.append((src, dst))
            if p.closed:
                p = local.connect(peer.metadata)
        assert cancelled, "no cancel won the race"
        end = time.monotonic() + 0.75
        while time.monotonic() < end:
            for dst, d in cancelled:
                assert _digest(tensors, bd, dst) == d, f"blocks {dst.tolist()} changed after their cancel"
            time.sleep(0.05)
        for src, dst in completed:
            assert block_bytes(tensors, bd, dst) == peer.call("blocks", src)
        # a read's notification reaches the peer only when it completed, never for a cancelled one
        notes = [n for _, n in peer.call("notes")]
        assert notes.count(b"r") == len(completed)
        # the link (or a new one) still moves every byte
        if p.closed:
            p = local.connect(peer.metadata)
        last = np.arange(SMALL.num_blocks - per, SMALL.num_blocks)
        local.read(p, [1, 2, 3, 4], last).wait(30)
        assert block_bytes(tensors, bd, last) == peer.call("blocks", [1, 2, 3, 4])
    finally:
        peer.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_cancel_a_write_to_a_stalled_peer_returns_and_the_peer_gets_no_notification(backend, make_connectors):
    peer = PeerProcess("remote", BIG, seed=1, backend=backend)
    stopped = False
    try:
        local, tensors, bd = make_connectors("local", BIG, 2, backend=backend)
        p = local.connect(peer.metadata)
        os.kill(peer.proc.pid, signal.SIGSTOP)
        stopped = True
        ids = np.arange(BIG.num_blocks)
        h = local.write(p, ids, ids, notify=b"never", timeout=60)
        time.sleep(0.05)
        t0 = time.monotonic()
        assert h.cancel(timeout=10) is True
        assert time.monotonic() - t0 < 8
        os.kill(peer.proc.pid, signal.SIGCONT)
        stopped = False
        time.sleep(0.5)
        assert b"never" not in [n for _, n in peer.call("notes")]
    finally:
        if stopped:
            os.kill(peer.proc.pid, signal.SIGCONT)
        peer.close()


# --------------------------------------------------------------------------------------------
# cuda_ipc (GPU: run by the lead on the device machine)
# --------------------------------------------------------------------------------------------
def _cuda_ready() -> str | None:
    try:
        import cupy
        import torch

        if not torch.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:
        return f"needs torch with CUDA and cupy ({exc!r})"
    return None


_NO_CUDA = _cuda_ready()


@pytest.mark.gpu
@pytest.mark.skipif(_NO_CUDA is not None, reason=_NO_CUDA or "")
def test_cuda_ipc_cancel_waits_for_the_kernel_and_times_out_while_it_runs():
    import torch

    from kvpeers import torch_cache, torch_peer

    import kvxfer

    nb, layers = 1024, 4
    with torch_peer("cuda_ipc", nb, layers, "cuda:0") as (ask, meta):
        kv = torch_cache(nb, layers, 2, "cuda:0")
        with kvxfer.Connector("local", backend="cuda_ipc") as c:
            c.register(kv, block_dim=1)
            p = c.connect(meta)
            ids = np.arange(nb)

            def digest() -> str:
                torch.cuda.synchronize()
                return hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in kv)).hexdigest()

            # the kernel waits behind ~0.5 s of GPU sleep on the caller's stream: a short cancel times out
            torch.cuda._sleep(800_000_000)
            h = c.read(p, ids, ids, notify=b"never")
            with pytest.raises(TransferTimeoutError):
                h.cancel(timeout=0.02)
            t0 = time.monotonic()
            while not h.done() and time.monotonic() - t0 < 30:
                time.sleep(0.01)
            assert h.status is TransferStatus.CANCELLED
            d = digest()
            time.sleep(0.5)
            assert digest() == d
            # a cancel with time to wait returns True once the kernel is done; the blocks stay put
            torch.cuda._sleep(200_000_000)
            h = c.read(p, ids, ids)
            assert h.cancel(timeout=30) is True and h.status is TransferStatus.CANCELLED
            d = digest()
            time.sleep(0.5)
            assert digest() == d
            with pytest.raises(TransferCancelledError):
                h.wait(1)
            # many fast cancels: each ends in one state; completed reads hold the peer's bytes
            ask.send(("blocks", ids[:8]))
            remote = ask.recv()
            for i in range(50):
                h = c.read(p, ids[:8], ids[8:16])
                if i % 2:
                    time.sleep(0.0002 * (i % 5))
                ok = h.cancel(timeout=30)
                assert h.status is (TransferStatus.CANCELLED if ok else TransferStatus.DONE)
                if not ok:
                    for t, r in zip(kv, remote):
                        assert np.array_equal(t[:, 8:16].cpu().numpy(), r)
            # the link still moves every byte
            c.read(p, ids[:8], ids[16:24]).wait(30)
            for t, r in zip(kv, remote):
                assert np.array_equal(t[:, 16:24].cpu().numpy(), r)


# --------------------------------------------------------------------------------------------
# registry requests (an embedded kvxfer registry; two connectors of this process over TCP)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def reg_pair():
    from kvxfer import Connector
    from kvxfer.registry.agent import RequestAgent
    from kvxfer.registry.server import RegistryServer

    made = []
    with RegistryServer() as srv:
        def make(name: str, seed: int):
            tensors, bd = BIG.build(seed)
            c = Connector(name, registry=srv.url, backend="tcp")
            c.register(tensors, block_dim=bd)
            c._agent = RequestAgent(c, srv.url, lease_s=1.0)
            made.append(c)
            return c, tensors, bd
        yield make
        for c in made:
            c.close()


def _events(prod, seconds: float) -> list:
    end, out = time.monotonic() + seconds, []
    while time.monotonic() < end:
        out += prod.requests.finished()
        time.sleep(0.05)
    return out


def test_cancel_a_pull_before_and_during_its_read(reg_pair):
    from kvxfer.registry.messages import EventKind

    (prod, ptensors, bd), (cons, ctensors, _) = reg_pair("prod", 1), reg_pair("cons", 2)
    dst = np.arange(8)
    before = _digest(ctensors, bd, dst)
    h = cons.requests.pull("early", dst, timeout=5)
    assert h.cancel(timeout=5) is True and h.status is TransferStatus.CANCELLED
    with pytest.raises(TransferCancelledError):
        h.wait(1)
    prod.requests.publish("early", np.arange(8), ttl=2)
    events = _events(prod, 1.0)
    _watch_unchanged(ctensors, bd, dst, before, 0.1)
    assert [e.request_id for e in events] == ["early"]  # once: the late claim reports the pull failed
    # during the read: many requests, cancelled at random moments after the pull starts
    rng = np.random.default_rng(3)
    outcome = {}
    for i in range(14):
        rid = f"r{i}"
        d = np.arange(16 + i * 32, 16 + (i + 1) * 32)
        prod.requests.publish(rid, np.arange(32), ttl=10)
        h = cons.requests.pull(rid, d, timeout=10)
        time.sleep(float(rng.uniform(0, 0.03)))
        if i % 2:  # the handle's cancel
            ok = h.cancel(timeout=10)
            assert h.status is (TransferStatus.CANCELLED if ok else TransferStatus.DONE)
        else:  # the agent's (what the vLLM plugin calls): it fences the read as well
            try:
                cons.requests.cancel(rid, "aborted")
            except KvxferError:
                pass  # consumed already
            assert h.done()
            ok = h.status is TransferStatus.FAILED
            assert ok or h.status is TransferStatus.DONE
        outcome[rid] = (ok, d, _digest(ctensors, bd, d))
    events = _events(prod, 1.5)
    for rid, (ok, d, digest) in outcome.items():
        assert _digest(ctensors, bd, d) == digest, f"{rid}: blocks changed after the cancel"
        kinds = [e.kind for e in events if e.request_id == rid]
        assert len(kinds) == 1, f"{rid}: the producer got {kinds}"
        if ok:
            assert kinds[0] in (EventKind.CANCELLED, EventKind.FAILED)
        else:
            assert kinds[0] is EventKind.CONSUMED
            assert block_bytes(ctensors, bd, d) == block_bytes(ptensors, bd, np.arange(32))
    assert any(ok for ok, *_ in outcome.values()), "no cancel won the race"


def test_cancel_an_expect_tells_the_producer_once(reg_pair):
    from kvxfer.registry.errors import RequestFailedError

    (prod, _, bd), (cons, ctensors, _) = reg_pair("prod", 1), reg_pair("cons", 2)
    h = cons.requests.expect("e", np.arange(4), timeout=5)
    time.sleep(0.2)  # the expectation reaches the registry
    assert h.cancel(timeout=5) is True and h.status is TransferStatus.CANCELLED
    assert h.cancel() is True
    push = prod.requests.push("e", np.arange(4), timeout=2)
    with pytest.raises(RequestFailedError):
        push.wait(5)


# --------------------------------------------------------------------------------------------
# the message and the session rule
# --------------------------------------------------------------------------------------------
def test_cancel_message_and_session_rule():
    from kvxfer.errors import RemoteProtocolError
    from kvxfer.protocol.messages import Cancel, decode, encode
    from kvxfer.protocol.transfer import TransferSession

    assert decode(Cancel, encode(Cancel(7))) == Cancel(7)
    for bad in ({}, {"x": "7"}, {"x": 1.0}, {"x": True}):
        with pytest.raises(RemoteProtocolError):
            decode(Cancel, bad)
    s: TransferSession[str] = TransferSession("peer")
    s.serve(3, "theirs")
    assert s.on_cancel(Cancel(3)) == "theirs" and s.served(3) is None
    assert s.on_cancel(Cancel(3)) is None  # once; unknown ids are ignored
    assert s.await_served(3, timeout=0.01) is None  # data still on its way is discarded, not waited for
    s.serve(3, "again")  # the id may be used again afterwards
    assert s.served(3) == "again"
