"""Metrics: counts and byte totals of real transfers (TCP, UCX host memory) match what the test
did, per backend, peer and op; failures by kind; thread safety; the Prometheus exposition."""

import json
import os
import signal
import subprocess
import sys
import threading

import msgpack
import numpy as np
import pytest

import kvxfer
from kvxfer import (DURATION_BUCKETS, BlockIdError, Op, PeerLostError, TransferTimeoutError)
from kvpeers import LayoutSpec, PeerProcess, block_bytes

SPEC = LayoutSpec("kv_first", 16)  # 2 layers x (K, V) x 16 tokens x 2 heads x 32 dims x fp16
BLOCK = SPEC.layers * 2 * SPEC.block_size * SPEC.heads * SPEC.head_dim * 2  # 8192 B


def _lying_metadata(meta: bytes) -> bytes:
    """The peer's metadata claiming a million blocks: our planner lets ids through, the peer refuses."""
    m = msgpack.unpackb(meta, raw=False)
    for t in m["geom"]["t"]:
        t[3] = 1 << 20
    m["fp"] = kvxfer.LayoutGeometry.from_wire(m["geom"]).fingerprint
    return msgpack.packb(m, use_bin_type=True)


def _check_series(s, *, transfers, nbytes, failures, handles=()):
    assert s is not None
    assert (s.transfers, s.bytes, dict(s.failures), s.cancels) == (transfers, nbytes, failures, 0)
    assert s.failed == sum(failures.values()) and s.integrity_failures == 0
    assert len(s.buckets) == len(DURATION_BUCKETS) + 1 and sum(s.buckets) == transfers
    done = [h.stats.seconds for h in handles if h.status is kvxfer.TransferStatus.DONE]
    assert len(done) == transfers
    assert s.seconds == pytest.approx(sum(done), rel=1e-9, abs=1e-12)
    for sec in done:  # each duration sits in its bucket: the bucket's count covers it
        i = next((k for k, b in enumerate(DURATION_BUCKETS) if sec <= b), len(DURATION_BUCKETS))
        assert s.buckets[i] >= 1


def test_tcp_counts_per_peer_and_op_with_refusals_timeouts_and_a_lost_peer(make_connectors):
    a = PeerProcess("remote-a", SPEC, seed=1, backend="tcp")
    b = PeerProcess("remote-b", SPEC, seed=2, backend="tcp")
    try:
        local, tensors, bd = make_connectors("local", SPEC, 3, backend="tcp")
        assert local.metrics().series == ()
        pa = local.connect(a.metadata)
        pb = local.connect(_lying_metadata(b.metadata))
        ha, hb = [], []
        for src, dst in [([0, 1], [0, 1]), ([2], [2]), ([3, 4, 5], [13, 14, 15])]:
            ha.append(local.write(pa, src, dst))
            ha[-1].wait(10)
        assert a.call("blocks", [13, 14, 15], None) == block_bytes(tensors, bd, [3, 4, 5])
        for src, dst in [([7], [7]), ([8, 9], [10, 11])]:
            ha.append(local.read(pa, src, dst))
            ha[-1].wait(10)
        for src, dst in [([0], [4]), ([1], [5])]:
            hb.append(local.write(pb, src, dst))
            hb[-1].wait(10)
        refused = [local.write(pb, [0, 1], [6, 500000]), local.read(pb, [123456], [0])]
        for h in refused:
            with pytest.raises(BlockIdError, match="refused"):
                h.wait(10)
        hb += refused
        with pytest.raises(BlockIdError):  # refused here: no handle, not counted
            local.write(pa, [16], [0])
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            hb.append(local.read(pb, [2], [3], timeout=0.5))
            with pytest.raises(TransferTimeoutError):
                hb[-1].wait(10)
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        # a read pending on a stopped peer, then the peer dies: the link drops, PeerLostError
        os.kill(a.proc.pid, signal.SIGSTOP)
        ha.append(local.read(pa, [12], [12], timeout=30))
        a.kill()
        with pytest.raises(PeerLostError):
            ha[-1].wait(20)
        with pytest.raises(PeerLostError):  # disconnected: no handle, not counted
            local.read(pa, [0], [0])

        snap = local.metrics()
        assert [(s.backend, s.peer, s.op) for s in snap.series] == [
            ("tcp", "remote-a", Op.READ), ("tcp", "remote-a", Op.WRITE),
            ("tcp", "remote-b", Op.READ), ("tcp", "remote-b", Op.WRITE)]
        _check_series(snap.get("tcp", "remote-a", Op.WRITE), transfers=3, nbytes=6 * BLOCK, failures={},
                      handles=[h for h in ha if h.op is Op.WRITE])
        _check_series(snap.get("tcp", "remote-a", Op.READ), transfers=2, nbytes=3 * BLOCK,
                      failures={"PeerLostError": 1}, handles=[h for h in ha if h.op is Op.READ])
        _check_series(snap.get("tcp", "remote-b", Op.WRITE), transfers=2, nbytes=2 * BLOCK,
                      failures={"BlockIdError": 1}, handles=[h for h in hb if h.op is Op.WRITE])
        _check_series(snap.get("tcp", "remote-b", Op.READ), transfers=0, nbytes=0,
                      failures={"BlockIdError": 1, "TransferTimeoutError": 1}, handles=[h for h in hb if h.op is Op.READ])
        assert snap.get("ucx", "remote-a", Op.READ) is None
        assert sum(s.transfers for s in snap.select(peer="remote-a")) == 5
        assert sum(s.bytes for s in snap.select(op=Op.WRITE)) == 8 * BLOCK
        # snapshots are copies and cumulative: a later one is unchanged without new transfers
        assert local.metrics() == snap
        d = json.loads(json.dumps(snap.to_dict()))
        assert d["bucket_bounds"] == list(DURATION_BUCKETS)
        assert d["series"][2] == {"backend": "tcp", "peer": "remote-b", "op": "read", "transfers": 0, "bytes": 0,
                                  "seconds": 0.0, "buckets": [0] * (len(DURATION_BUCKETS) + 1),
                                  "failures": {"BlockIdError": 1, "TransferTimeoutError": 1}, "cancels": 0}
    finally:
        a.close()
        b.close()


def _pair(make_connectors, backend="tcp", seeds=(1, 2)):
    src, st, bd = make_connectors("src", SPEC, seeds[0], backend=backend)
    dst, dt, _ = make_connectors("dst", SPEC, seeds[1], backend=backend)
    return src, src.connect(dst.metadata()), dst, st, bd


def test_concurrent_transfers_from_many_threads_are_counted_exactly(make_connectors):
    src, p, dst, st, bd = _pair(make_connectors)
    threads, per = 4, 25
    errors = []

    def work(k):
        try:
            for i in range(per):
                blk = (k * per + i) % 16
                h = (src.write if i % 2 else src.read)(p, [blk], [blk])
                h.wait(10)
        except Exception as exc:  # reported below
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    snap = src.metrics()
    w, r = snap.get("tcp", "dst", Op.WRITE), snap.get("tcp", "dst", Op.READ)
    n_w = sum(1 for _ in range(threads) for i in range(per) if i % 2)
    assert (w.transfers, w.bytes, sum(w.buckets)) == (n_w, n_w * BLOCK, n_w)
    n_r = threads * per - n_w
    assert (r.transfers, r.bytes, sum(r.buckets)) == (n_r, n_r * BLOCK, n_r)
    assert dst.metrics().series == ()  # the serving side initiated nothing: it counts nothing
    assert dst.peers == []


def test_prometheus_exposition_holds_the_snapshot(make_connectors):
    prometheus_client = pytest.importorskip("prometheus_client", reason="pip install kvxfer[metrics]")
    from prometheus_client.parser import text_string_to_metric_families

    src, p, dst, st, bd = _pair(make_connectors)
    for ids in ([0], [1, 2], [3, 4, 5]):
        src.write(p, ids, ids).wait(10)
    src.read(p, [6], [6]).wait(10)
    with pytest.raises(BlockIdError):
        src.write(p, [0], [99])  # local refusal: not counted
    registry = prometheus_client.CollectorRegistry()
    kvxfer.register_prometheus(src, registry=registry, prefix="kvx")
    with pytest.raises(ValueError):  # the same names twice on one registry
        kvxfer.register_prometheus(src, registry=registry, prefix="kvx")
    text = prometheus_client.generate_latest(registry).decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    w = (("backend", "tcp"), ("op", "write"), ("peer", "dst"))
    r = (("backend", "tcp"), ("op", "read"), ("peer", "dst"))
    assert samples[("kvx_transfers_total", w)] == 3
    assert samples[("kvx_transfers_total", r)] == 1
    assert samples[("kvx_transfer_bytes_total", w)] == 6 * BLOCK
    assert samples[("kvx_transfer_bytes_total", r)] == BLOCK
    assert samples[("kvx_transfer_cancels_total", w)] == 0
    assert samples[("kvx_transfer_seconds_count", w)] == 3
    assert samples[("kvx_transfer_seconds_bucket", tuple(sorted((*w, ("le", "+Inf")))))] == 3
    snap = src.metrics().get("tcp", "dst", Op.WRITE)
    assert samples[("kvx_transfer_seconds_sum", w)] == pytest.approx(snap.seconds)
    cum = np.cumsum(snap.buckets)
    for bound, n in zip(DURATION_BUCKETS, cum):
        key = ("kvx_transfer_seconds_bucket", tuple(sorted((*w, ("le", prometheus_client.utils.floatToGoString(bound))))))
        assert samples[key] == n
    assert not any(k[0] == "kvx_transfer_failures_total" for k in samples)
    # a failure appears with its kind
    h = src.read(_pair_lying(src, p), [123456], [0])
    with pytest.raises(BlockIdError):
        h.wait(10)
    text = prometheus_client.generate_latest(registry).decode()
    assert 'kvx_transfer_failures_total{backend="tcp",kind="BlockIdError",op="read",peer="dst"} 1.0' in text
    with pytest.raises(kvxfer.ConfigError, match="prefix"):
        kvxfer.register_prometheus(src, registry=registry, prefix="bad prefix")


def _pair_lying(src, p):
    """A second link to ``p``'s connector (same peer name) through metadata that lies about its size."""
    return src.connect(_lying_metadata(p.metadata.to_bytes()))


try:
    import ucxx  # noqa: F401

    _UCXX_ERR = None
except Exception as exc:  # pragma: no cover - environment dependent
    _UCXX_ERR = f"ucxx is not importable here ({exc!r}); pip install kvxfer[cuda13] (or [cuda12])"


@pytest.mark.skipif(_UCXX_ERR is not None, reason=_UCXX_ERR or "")
def test_ucx_host_memory_counts_under_its_backend(make_connectors, monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")  # the child inherits it at spawn
    monkeypatch.setenv("UCX_WARN_UNUSED_ENV_VARS", "n")
    peer = PeerProcess("remote-u", SPEC, seed=1, backend="ucx")
    try:
        local, tensors, bd = make_connectors("local", SPEC, 2, backend="ucx")
        p = local.connect(peer.metadata)
        assert p.backend == "ucx"
        hs = [local.write(p, [0, 1, 2], [3, 4, 5]), local.read(p, [9], [9]), local.read(p, [10, 11], [12, 13])]
        for h in hs:
            h.wait(10)
        assert peer.call("blocks", [3, 4, 5], None) == block_bytes(tensors, bd, [0, 1, 2])
        os.kill(peer.proc.pid, signal.SIGSTOP)
        try:
            hs.append(local.read(p, list(range(16)), list(range(16)), timeout=0.5))
            with pytest.raises(TransferTimeoutError):
                hs[-1].wait(10)
        finally:
            os.kill(peer.proc.pid, signal.SIGCONT)
        snap = local.metrics()
        assert [(s.backend, s.peer, s.op) for s in snap.series] == [("ucx", "remote-u", Op.READ), ("ucx", "remote-u", Op.WRITE)]
        _check_series(snap.get("ucx", "remote-u", Op.WRITE), transfers=1, nbytes=3 * BLOCK, failures={},
                      handles=[h for h in hs if h.op is Op.WRITE])
        _check_series(snap.get("ucx", "remote-u", Op.READ), transfers=2, nbytes=3 * BLOCK,
                      failures={"TransferTimeoutError": 1}, handles=[h for h in hs if h.op is Op.READ])
    finally:
        peer.close()


def test_importing_kvxfer_does_not_import_prometheus_client():
    code = "import sys, kvxfer, kvxfer.metrics; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not hasattr(kvxfer.TransferStatus, "CANCELLED"), reason="TransferHandle.cancel is not in this tree")
def test_a_cancelled_transfer_counts_as_a_cancel(make_connectors):
    peer = PeerProcess("remote-c", SPEC, seed=1, backend="tcp")
    try:
        local, *_ = make_connectors("local", SPEC, 2, backend="tcp")
        p = local.connect(peer.metadata)
        local.read(p, [1], [1]).wait(10)
        os.kill(peer.proc.pid, signal.SIGSTOP)
        try:
            h = local.read(p, list(range(16)), list(range(16)), timeout=30)
            assert h.cancel(10)
        finally:
            os.kill(peer.proc.pid, signal.SIGCONT)
        assert h.status is kvxfer.TransferStatus.CANCELLED
        s = local.metrics().get("tcp", "remote-c", Op.READ)
        assert (s.transfers, s.bytes, dict(s.failures), s.cancels) == (1, BLOCK, {}, 1)
    finally:
        peer.close()
