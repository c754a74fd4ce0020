"""Producer, consumer and registry, each its own process, on the embedded server and on Redis.

Bytes arrive (every byte compared), the producer is told, entries disappear; and the failures:
producer dead before or during a pull, consumer dead, registry restarted, wrong token, bad
frames at the registry port.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvxfer.connector import Connector
from kvxfer.errors import PeerLostError
from kvxfer.registry.agent import RequestAgent
from kvxfer.registry.errors import UnknownRequestError
from mp_parties import (LEASE_S, TP_HEADS, claim_and_die, consumer, make_kv, producer, push_first_layer_then_hang,
                        tp_consumer, tp_producer)
from regutil import RedisProcess, free_port, need_redis

pytestmark = pytest.mark.timeout(120)
CTX = mp.get_context("spawn")


class RegistryProcess:
    """``kvxfer-registry`` (python -m kvxfer.registry.cli) on a fixed free port, restartable."""

    def __init__(self, token: str | None = None):
        self.port = free_port()
        self.token = token
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"kvxfer://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "kvxfer.registry.cli", "--port", str(self.port), "--log-level", "WARNING"]
        if self.token:
            args += ["--token", self.token]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "serving" in line, line

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(params=["kvxfer", "redis"])
def kind(request) -> str:
    if request.param == "redis":
        need_redis()
    return request.param


def _registry(kind: str, tmp_path: Path, token: str | None = None):
    reg = RegistryProcess(token) if kind == "kvxfer" else RedisProcess(tmp_path, password=token)
    reg.start()
    return reg


@pytest.fixture
def registry(kind, tmp_path) -> Iterator:
    reg = _registry(kind, tmp_path)
    yield reg
    reg.stop()


class Procs:
    def __init__(self) -> None:
        self.procs: list[mp.Process] = []

    def start(self, target, *args) -> tuple[mp.Process, mp.Queue]:
        q = CTX.Queue()
        p = CTX.Process(target=target, args=(*args, q), daemon=True)
        p.start()
        self.procs.append(p)
        return p, q

    def cleanup(self) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)


@pytest.fixture
def procs() -> Iterator[Procs]:
    ps = Procs()
    yield ps
    ps.cleanup()


def _get(q, timeout: float = 30.0):
    return q.get(timeout=timeout)


SRC = [3, 4, 5, 9, 17]
DST = [0, 1, 2, 20, 7]


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_transfer_bytes_arrive_producer_told_entry_gone(registry, procs, mode):
    _, pq = procs.start(producer, registry.url, None, "prod", "req-1", SRC, mode, 20.0)
    assert _get(pq)[0] == "published"
    _, cq = procs.start(consumer, registry.url, None, "cons", "req-1", SRC, DST, mode, 20.0)
    assert _get(cq)[0] == "started"
    result = _get(cq)
    assert result[:3] == ("ok", True, True), result   # every byte equal, other blocks untouched
    assert _get(pq)[:2] == ("finished", "consumed")
    assert _get(pq) == ("entry", "gone")


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_producer_dies_before_or_during_pull(registry, procs, how):
    pp, pq = procs.start(producer, registry.url, None, "prod", "req-2", SRC, "pull", 60.0)
    assert _get(pq)[0] == "published"
    # killed: the process is gone (its TCP endpoint refuses); frozen: it hangs mid-way (no
    # heartbeats, a connect to it never completes), as a host that died under a transfer
    os.kill(pp.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    _, cq = procs.start(consumer, registry.url, None, "cons", "req-2", SRC, DST, "pull", 60.0)
    assert _get(cq)[0] == "started"
    result = _get(cq)
    assert result[0] == "error", result
    assert result[3] < 2 * LEASE_S + 0.5, result      # within two lease periods, not the 60 s timeout
    assert "prod" in result[2] or "lease" in result[2], result


def test_push_producer_killed_expect_fails_before_its_lease(registry, procs):
    # a long lease: without watching the data link the consumer would wait 30 s for it
    lease = 30.0
    kv = make_kv(None)
    conn = Connector("cons", registry=registry.url)
    try:
        conn.register(kv)
        conn._agent = RequestAgent(conn, registry.url, lease_s=lease)
        h = conn.expect("req-8", DST, timeout=60)
        pp, pq = procs.start(push_first_layer_then_hang, registry.url, "prod", "req-8", SRC, lease)
        assert _get(pq) == ("pushed", "req-8")
        assert np.array_equal(kv[0][DST], make_kv(1)[0][SRC]) and not h.done()
        t0 = time.monotonic()
        os.kill(pp.pid, signal.SIGKILL)
        with pytest.raises(PeerLostError, match="'req-8'.*producer 'prod'"):
            h.wait(20)
        assert time.monotonic() - t0 < 10, "failed by the lease, not by the lost link"
        assert h.peer_name == "prod" and list(h.failed_blocks) == DST
        # the consumer reported it: the registry dropped the entry without waiting for the lease
        deadline = time.monotonic() + 5
        while True:
            try:
                conn.requests._client.query("req-8")
            except UnknownRequestError:
                break
            assert time.monotonic() < deadline, "the entry outlived the lost producer"
            time.sleep(0.05)
    finally:
        conn.close()


def test_consumer_dies_producer_told(registry, procs):
    _, pq = procs.start(producer, registry.url, None, "prod", "req-3", SRC, "pull", 60.0)
    assert _get(pq)[0] == "published"
    cp, cq = procs.start(claim_and_die, registry.url, None, "doomed", "req-3")
    assert _get(cq) == ("claimed", "prod")
    t0 = time.monotonic()
    fin = _get(pq)
    assert fin[:2] == ("finished", "failed") and "doomed" in fin[2], fin
    assert time.monotonic() - t0 < 2 * LEASE_S + 1.0
    assert _get(pq) == ("entry", "gone")


def test_unclaimed_entry_expires_producer_told(registry, procs):
    _, pq = procs.start(producer, registry.url, None, "prod", "req-4", SRC, "pull", 1.0)
    assert _get(pq)[0] == "published"
    assert _get(pq)[:2] == ("finished", "expired")
    assert _get(pq) == ("entry", "gone")


def test_registry_restart_clear_error_then_reconnect(kind, registry, procs):
    _, pq = procs.start(producer, registry.url, None, "prod", "req-5", SRC, "pull", 60.0)
    assert _get(pq)[0] == "published"
    _, early = procs.start(consumer, registry.url, None, "early", "never-published", SRC, DST, "pull", 60.0)
    assert _get(early)[0] == "started"
    time.sleep(0.3)
    registry.stop()
    result = _get(early)   # a pending pull fails at once with a clear error, not after 60 s
    assert result[:2] == ("error", "RegistryUnavailableError"), result
    registry.start()
    # the producer reconnects, re-registers and publishes req-5 again; a consumer then gets it
    _, cq = procs.start(consumer, registry.url, None, "cons", "req-5", SRC, DST, "pull", 20.0)
    assert _get(cq)[0] == "started"
    result = _get(cq, 40)
    assert result[:3] == ("ok", True, True), result
    assert _get(pq)[:2] == ("finished", "consumed")


def test_wrong_token_refused(kind, tmp_path, procs):
    reg = _registry(kind, tmp_path, token="sesame")
    try:
        _, q = procs.start(producer, reg.url, "wrong", "prod", "req-6", SRC, "pull", 5.0)
        result = _get(q)
        assert result[:2] == ("error", "RegistryAuthError"), result
        _, q = procs.start(producer, reg.url, None, "prod", "req-6", SRC, "pull", 5.0)
        assert _get(q)[:2] == ("error", "RegistryAuthError")
        _, pq = procs.start(producer, reg.url, "sesame", "prod", "req-6", SRC, "pull", 20.0)
        assert _get(pq)[0] == "published"
        _, cq = procs.start(consumer, reg.url, "sesame", "cons", "req-6", SRC, DST, "pull", 20.0)
        _get(cq)
        assert _get(cq)[:3] == ("ok", True, True)
    finally:
        reg.stop()


def test_malformed_and_oversized_frames_to_registry_port(procs, tmp_path):
    reg = _registry("kvxfer", tmp_path)
    try:
        bad = [b"\x00" * 64, b"KVXF" + bytes([1, 32, 0, 0]) + (1 << 30).to_bytes(4, "big") + bytes(8),
               b"KVXF" + bytes([1, 32, 0, 0]) + (4).to_bytes(4, "big") + (1 << 40).to_bytes(8, "big"),
               b"GET / HTTP/1.1\r\n\r\n"]
        for payload in bad:
            with socket.create_connection(("127.0.0.1", reg.port), timeout=5) as s:
                s.sendall(payload)
                s.settimeout(5)
                try:
                    assert s.recv(100) == b""        # the registry drops the connection
                except ConnectionResetError:
                    pass
        _, pq = procs.start(producer, reg.url, None, "prod", "req-7", SRC, "pull", 20.0)
        assert _get(pq)[0] == "published"
        _, cq = procs.start(consumer, reg.url, None, "cons", "req-7", SRC, DST, "pull", 20.0)
        _get(cq)
        assert _get(cq)[:3] == ("ok", True, True)    # and it keeps serving
        assert reg.proc.poll() is None
    finally:
        reg.stop()


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1), (2, 4)])
def test_unlike_tp_each_decode_rank_reads_its_heads(registry, procs, prefill_tp, decode_tp):
    # every process is its own party: prefill ranks publish one key each, for the decode ranks
    # that need their heads; each decode rank pulls from every prefill rank holding some
    srcs = [[3, 4, 5], [9, 17, 2], [1, 6, 8], [10, 11, 12]][:prefill_tp]
    dst = [0, 20, 7]
    readers = [sum(1 for d in range(decode_tp) if _overlap(p, prefill_tp, d, decode_tp)) for p in range(prefill_tp)]
    pqs = [procs.start(tp_producer, registry.url, f"prefill{p}", p, prefill_tp, "req", srcs[p], readers[p], 20.0)[1]
           for p in range(prefill_tp)]
    for q in pqs:
        assert _get(q)[0] == "published"
    cqs = [procs.start(tp_consumer, registry.url, f"decode{d}", d, decode_tp, prefill_tp, "req", srcs, dst, 20.0)[1]
           for d in range(decode_tp)]
    for d, q in enumerate(cqs):
        result = _get(q)
        assert result[:3] == ("ok", True, True), result
        assert result[3] == [f"prefill{p}" for p in range(prefill_tp) if _overlap(p, prefill_tp, d, decode_tp)]
    for p, q in enumerate(pqs):
        assert _get(q) == ("finished", f"req#tp{p}", "consumed")
        assert _get(q) == ("later", [])       # told once, after every reader confirmed


def _overlap(p: int, ptp: int, d: int, dtp: int) -> bool:
    hp, hd = TP_HEADS // ptp, TP_HEADS // dtp
    return max(p * hp, d * hd) < min((p + 1) * hp, (d + 1) * hd)


def test_one_of_two_decode_ranks_dies_producer_told_failed_once(registry, procs):
    _, pq = procs.start(tp_producer, registry.url, "prefill0", 0, 1, "req", [3, 4, 5], 2, 30.0)
    assert _get(pq)[0] == "published"
    _, okq = procs.start(tp_consumer, registry.url, "decode0", 0, 2, 1, "req", [[3, 4, 5]], [0, 20, 7], 30.0)
    assert _get(okq)[:3] == ("ok", True, True)
    _, dq = procs.start(claim_and_die, registry.url, None, "decode1", "req#tp0")
    assert _get(dq) == ("claimed", "prefill0")
    t0 = time.monotonic()
    assert _get(pq) == ("finished", "req#tp0", "failed")   # decode1's lease ran out: not the 30 s ttl
    assert time.monotonic() - t0 < 3 * LEASE_S + 1.0
    assert _get(pq) == ("later", [])
