"""Two real OS processes over loopback TCP: every byte compared, bad input, dead peers."""

import functools
import logging
import os
import signal
import socket
import time

import msgpack
import numpy as np
import pytest

import kvxfer
from kvxfer import BlockIdError, Connector, LayoutMismatchError, PeerLostError, TransferTimeoutError
from kvpeers import KINDS, LayoutSpec, PeerProcess, block_bytes


def _kinds():
    out = []
    for k in KINDS:
        if k.startswith("torch"):
            try:
                import torch  # noqa: F401
            except ImportError:
                out.append(pytest.param(k, marks=pytest.mark.skip(reason="torch not installed")))
                continue
        out.append(k)
    return out


@pytest.fixture
def local_factory(make_connectors):
    return functools.partial(make_connectors, backend="tcp")


@pytest.mark.parametrize("kind", _kinds())
def test_random_layouts_read_write_layers_notify(kind, local_factory):
    rng = np.random.default_rng(abs(hash(kind)) % 1000)
    layers = int(rng.integers(1, 4))
    spec_remote = LayoutSpec(kind, int(rng.integers(24, 64)), layers=layers, block_size=int(rng.choice([1, 8, 16])))
    spec_local = LayoutSpec(kind, int(rng.integers(24, 64)), layers=layers, block_size=spec_remote.block_size)
    peer = PeerProcess("remote", spec_remote, seed=11, backend="tcp")
    try:
        local, tensors, bd = local_factory("local", spec_local, 22)
        p = local.connect(peer.metadata)
        for trial in range(3):
            n = int(rng.integers(1, 20))
            src = rng.choice(spec_local.num_blocks, n, replace=False)
            dst = rng.choice(spec_remote.num_blocks, n, replace=False)
            sel = None if trial == 0 else sorted(rng.choice(layers, int(rng.integers(1, layers + 1)), replace=False).tolist())
            note = f"w{trial}".encode()
            local.write(p, src, dst, layers=sel, notify=note).wait(30)
            assert peer.call("blocks", dst, sel) == block_bytes(tensors, bd, src, sel)
            assert tuple(peer.call("wait_note", 10)) == ("local", note)
            # read back different blocks the other way
            src2 = rng.choice(spec_remote.num_blocks, n, replace=False)
            dst2 = rng.choice(spec_local.num_blocks, n, replace=False)
            h = local.read(p, src2, dst2, layers=sel, notify=b"r")
            st = h.wait(30)
            assert st.nbytes == h.nbytes and st.backend == "tcp"
            assert block_bytes(tensors, bd, dst2, sel) == peer.call("blocks", src2, sel)
            assert tuple(peer.call("wait_note", 10)) == ("local", b"r")
    finally:
        peer.close()


def test_256mib_transfer_every_byte(local_factory):
    spec = LayoutSpec("kv_first", 1024, layers=4, block_size=16, heads=8, head_dim=128)  # 256 KiB a block
    peer = PeerProcess("remote", spec, seed=3, backend="tcp")
    try:
        local, tensors, bd = local_factory("local", spec, 4)
        p = local.connect(peer.metadata)
        rng = np.random.default_rng(0)
        src, dst = rng.permutation(1024), rng.permutation(1024)
        h = local.read(p, src, dst)
        st = h.wait(120)
        assert st.nbytes == 1024 * 256 * 1024
        # compare in slices to keep pipe messages small
        for k in range(0, 1024, 128):
            assert block_bytes(tensors, bd, dst[k : k + 128]) == peer.call("blocks", src[k : k + 128], None)
    finally:
        peer.close()


def test_bad_ids_local_and_mismatch(local_factory):
    spec = LayoutSpec("kv_first", 16)
    peer = PeerProcess("remote", spec, seed=1, backend="tcp")
    try:
        local, *_ = local_factory("local", spec, 2)
        p = local.connect(peer.metadata)
        with pytest.raises(BlockIdError, match="source block ids out of range"):
            local.write(p, [16], [0])
        with pytest.raises(BlockIdError, match="destination block ids out of range"):
            local.write(p, [0], [99])
        with pytest.raises(BlockIdError, match="equal length"):
            local.read(p, [0, 1], [0])
        with pytest.raises(BlockIdError, match="duplicates"):
            local.read(p, [0, 1], [2, 2])
        with pytest.raises(kvxfer.LayoutError, match="unknown layer"):
            local.read(p, [0], [0], layers=[7])
        other, *_ = local_factory("other", LayoutSpec("kv_first", 16, head_dim=64), 3)
        with pytest.raises(LayoutMismatchError, match="fingerprint"):
            other.connect(peer.metadata)
    finally:
        peer.close()


def test_remote_checks_its_own_bounds_before_touching_memory(local_factory):
    """A peer that lies about our geometry still cannot make us write outside our blocks."""
    spec = LayoutSpec("kv_first", 16)
    peer = PeerProcess("remote", spec, seed=1, backend="tcp")
    try:
        local, tensors, bd = local_factory("local", spec, 2)
        meta = msgpack.unpackb(peer.metadata, raw=False)
        for t in meta["geom"]["t"]:
            t[3] = 1 << 20  # claim a million blocks
        meta["fp"] = kvxfer.LayoutGeometry.from_wire(meta["geom"]).fingerprint
        p = local.connect(msgpack.packb(meta, use_bin_type=True))
        before = peer.call("blocks", list(range(16)), None)
        h = local.write(p, [0, 1], [5, 500000])
        with pytest.raises(BlockIdError, match="refused.*out of range"):
            h.wait(10)
        h = local.read(p, [123456], [0])
        with pytest.raises(BlockIdError, match="refused"):
            h.wait(10)
        assert peer.call("blocks", list(range(16)), None) == before
        # the link still works after refusals
        local.write(p, [3], [4]).wait(10)
        assert peer.call("blocks", [4], None) == block_bytes(tensors, bd, [3])
    finally:
        peer.close()


def test_peer_killed_mid_transfer_fails_pending_handles(local_factory):
    spec = LayoutSpec("kv_first", 2048, layers=4, block_size=16, heads=8, head_dim=128)  # 512 MiB
    peer = PeerProcess("remote", spec, seed=1, backend="tcp")
    local, *_ = local_factory("local", spec, 2, timeout=20)
    p = local.connect(peer.metadata)
    ids = np.arange(2048)
    h = local.read(p, ids, ids)
    time.sleep(0.02)
    peer.kill()
    t0 = time.monotonic()
    with pytest.raises(PeerLostError):
        h.wait(20)
    assert time.monotonic() - t0 < 20
    assert h.status is kvxfer.TransferStatus.FAILED
    assert h.failed_blocks.size == 2048
    with pytest.raises(PeerLostError):
        local.read(p, [0], [0])


def test_stalled_peer_times_out(local_factory):
    spec = LayoutSpec("kv_first", 512, layers=4, block_size=16, heads=8, head_dim=128)
    peer = PeerProcess("remote", spec, seed=1, backend="tcp")
    try:
        local, *_ = local_factory("local", spec, 2)
        p = local.connect(peer.metadata)
        os.kill(peer.proc.pid, signal.SIGSTOP)
        h = local.read(p, np.arange(512), np.arange(512), timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            h.wait(10)
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)
        peer.close()


def _tcp_port(c: Connector) -> tuple[str, int]:
    ep = msgpack.unpackb(c.metadata(), raw=False)["be"]["tcp"]
    return ep["host"], ep["port"]


@pytest.mark.parametrize("garbage", [
    os.urandom(4096),
    b"KVXF",  # truncated prefix
    b"KVXF\x01\x01\x00\x00\x00\x00\x00\x10" + b"\x00" * 8 + b"\x81",  # truncated header
    b"KVXF\x07\x01\x00\x00\x00\x00\x00\x01" + b"\x00" * 8 + b"\x80",  # unknown version
    b"KVXF\x01\x04\x00\x00\x00\x00\x00\x01" + b"\xff" * 8 + b"\x80",  # DATA before HELLO, huge payload
], ids=["random", "truncated-prefix", "truncated-header", "bad-version", "data-before-hello"])
def test_garbage_to_data_port_drops_connection_and_keeps_serving(garbage, local_factory, caplog):
    spec = LayoutSpec("kv_first", 16)
    server, s_tensors, bd = local_factory("server", spec, 1)
    peer = PeerProcess("client", spec, seed=5, backend="tcp")
    try:
        with caplog.at_level(logging.INFO, logger="kvxfer"):
            bad = socket.create_connection(_tcp_port(server))
            bad.settimeout(15)
            try:
                bad.sendall(garbage)
                bad.shutdown(socket.SHUT_WR)
                got = bad.recv(1)
            except (ConnectionResetError, BrokenPipeError, OSError) as exc:
                assert not isinstance(exc, TimeoutError)
                got = b""
            assert got == b""  # the server dropped us
            bad.close()
        assert any("dropping connection" in r.getMessage() for r in caplog.records)
        # another peer is still served
        peer.call("connect", server.metadata())
        peer.call("write", "server", [1, 2], [3, 4], {})
        assert block_bytes(s_tensors, bd, [3, 4]) == peer.call("blocks", [1, 2], None)
    finally:
        peer.close()


def test_garbage_on_established_link_drops_only_that_peer(local_factory, caplog):
    spec = LayoutSpec("kv_first", 16)
    server, s_tensors, bd = local_factory("server", spec, 1)
    evil, *_ = local_factory("evil", spec, 2)
    good = PeerProcess("good", spec, seed=3, backend="tcp")
    try:
        pe = evil.connect(server.metadata())
        pe.link._ctrl.sendall(b"\x00" * 64)  # corrupt the control stream
        with pytest.raises(PeerLostError):
            evil.write(pe, [0], [0]).wait(10)
        good.call("connect", server.metadata())
        good.call("write", "server", [5], [6], {})
        assert block_bytes(s_tensors, bd, [6]) == good.call("blocks", [5], None)
    finally:
        good.close()


def test_notify_alone_and_close_is_idempotent(local_factory):
    spec = LayoutSpec("mla", 8)
    a, *_ = local_factory("a", spec, 1)
    b, *_ = local_factory("b", spec, 2)
    p = a.connect(b.metadata())
    a.notify(p, b"free 1 2 3")
    n = b.wait_notification(5)
    assert (n.peer, n.payload) == ("a", b"free 1 2 3")
    assert b.notifications() == []
    with pytest.raises(TransferTimeoutError):
        b.wait_notification(0.05)
    a.close()
    a.close()
    with pytest.raises(kvxfer.KvxferError, match="closed"):
        a.metadata()


def test_zero_blocks_completes():
    spec = LayoutSpec("kv_first", 8)
    ta, bd = spec.build(0)
    with Connector("a", backend="tcp") as a, Connector("b", backend="tcp") as b:
        a.register(ta, block_dim=bd)
        b.register(spec.build(1)[0], block_dim=bd)
        p = a.connect(b.metadata())
        assert a.write(p, [], [], notify=b"empty").wait(5).nbytes == 0
        assert a.read(p, [], []).wait(5).nbytes == 0
        assert b.wait_notification(5).payload == b"empty"


def test_concurrent_connects_to_one_peer_keep_their_connections_apart(local_factory):
    import threading

    spec = LayoutSpec("kv_first", 32)
    server, s_tensors, bd = local_factory("server", spec, 1)
    client, c_tensors, _ = local_factory("client", spec, 2)
    peers, errors = [], []

    def connect():
        try:
            peers.append(client.connect(server.metadata()))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(peers) == 4
    handles = [client.write(p, [i], [10 + i]) for i, p in enumerate(peers)]
    for h in handles:
        h.wait(10)
    assert block_bytes(s_tensors, bd, [10, 11, 12, 13]) == block_bytes(c_tensors, bd, [0, 1, 2, 3])
