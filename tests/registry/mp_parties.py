"""Producer and consumer processes for the multi-process registry tests (spawn targets)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

NUM_BLOCKS = 24
LAYERS = 4
LEASE_S = 1.0


def make_kv(seed: int | None) -> list[np.ndarray]:
    """4 layers of [blocks, K/V, 16 tokens, 64] bytes: random for a producer, zeros for a consumer."""
    shape = (NUM_BLOCKS, 2, 16, 64)
    if seed is None:
        return [np.zeros(shape, dtype=np.uint8) for _ in range(LAYERS)]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(LAYERS)]


def _connector(name: str, url: str, token: str | None, kv: list[np.ndarray]) -> Any:
    from kvxfer.connector import Connector
    from kvxfer.registry.agent import RequestAgent

    conn = Connector(name, registry=url, registry_token=token)
    conn.register(kv)
    # a short lease so that failures show within seconds (the Connector's own agent uses the default)
    conn._agent = RequestAgent(conn, url, token, lease_s=LEASE_S)
    return conn


def producer(url: str, token: str | None, name: str, rid: str, blocks: list[int], mode: str, ttl: float,
             out: Any) -> None:
    """Publish (pull mode) or push every layer (push mode); report how the request finished."""
    from kvxfer.errors import KvxferError
    from kvxfer.registry.errors import UnknownRequestError

    try:
        conn = _connector(name, url, token, make_kv(1))
    except KvxferError as exc:
        out.put(("error", type(exc).__name__, str(exc)))
        return
    agent = conn.requests
    if mode == "pull":
        conn.publish(rid, blocks, ttl=ttl)
        out.put(("published", rid))
    else:
        out.put(("published", rid))
        handles = [conn.push(rid, blocks, layers=[i], last=i == LAYERS - 1, timeout=ttl) for i in range(LAYERS)]
        try:
            for h in handles:
                h.wait(ttl + 5)
        except KvxferError as exc:
            out.put(("push_error", type(exc).__name__, str(exc)))
    try:
        fin = agent.wait_finished(timeout=ttl + 10)
        out.put(("finished", fin.kind.value, fin.reason))
    except KvxferError as exc:
        out.put(("error", type(exc).__name__, str(exc)))
    try:
        agent._client.query(rid)
        out.put(("entry", "present"))
    except UnknownRequestError:
        out.put(("entry", "gone"))
    conn.close()


def consumer(url: str, token: str | None, name: str, rid: str, src: list[int], dst: list[int], mode: str,
             timeout: float, out: Any) -> None:
    """Pull or expect ``rid`` into ``dst``; check every byte against the producer's ``src`` blocks."""
    from kvxfer.errors import KvxferError

    kv = make_kv(None)
    try:
        conn = _connector(name, url, token, kv)
    except KvxferError as exc:
        out.put(("error", type(exc).__name__, str(exc), 0.0))
        return
    t0 = time.monotonic()
    try:
        h = conn.pull(rid, dst, timeout=timeout) if mode == "pull" else conn.expect(rid, dst, timeout=timeout)
        out.put(("started", time.monotonic() - t0))
        h.wait(timeout + 10)
    except KvxferError as exc:
        out.put(("error", type(exc).__name__, str(exc), time.monotonic() - t0))
        conn.close()
        return
    want = make_kv(1)
    mask = np.zeros(NUM_BLOCKS, dtype=bool)
    mask[dst] = True
    same = all(np.array_equal(kv[i][dst], want[i][src]) for i in range(LAYERS))
    untouched = all(not kv[i][~mask].any() for i in range(LAYERS))
    out.put(("ok", same, untouched, time.monotonic() - t0))
    conn.close()


def claim_and_die(url: str, token: str | None, name: str, rid: str, out: Any) -> None:
    """A consumer that claims a request and dies before reading it (no unregister, no complete)."""
    from kvxfer.registry.client import connect_registry

    c = connect_registry(url, name=name, token=token)
    c.register(b"doomed", LEASE_S)
    claim = c.pull(rid, 10)
    out.put(("claimed", claim.producer))
    out.close()
    out.join_thread()  # the message must leave before the hard exit
    os._exit(0)


def push_first_layer_then_hang(url: str, name: str, rid: str, blocks: list[int], lease_s: float, out: Any) -> None:
    """A producer that writes layer 0 of ``rid`` (not the last) and then waits to be killed."""
    from kvxfer.connector import Connector
    from kvxfer.registry.agent import RequestAgent

    conn = Connector(name, registry=url)
    conn.register(make_kv(1))
    conn._agent = RequestAgent(conn, url, lease_s=lease_s)
    conn.push(rid, blocks, layers=[0], last=False, timeout=60).wait(30)
    out.put(("pushed", rid))
    time.sleep(600)


# --- unlike tensor parallelism on the two sides (head reshards) ------------------------------
TP_HEADS, TP_BS, TP_D = 8, 16, 32


def make_heads_kv(heads: int, seed: int | None) -> list[np.ndarray]:
    """LAYERS tensors [K/V, blocks, 16 tokens, heads, 32] of uint16 (NHD pieces, block_dim=1)."""
    shape = (2, NUM_BLOCKS, TP_BS, heads, TP_D)
    if seed is None:
        return [np.zeros(shape, dtype=np.uint16) for _ in range(LAYERS)]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2**16, size=shape, dtype=np.uint16) for _ in range(LAYERS)]


def _heads_connector(name: str, url: str, kv: list[np.ndarray]) -> Any:
    from kvxfer.connector import Connector
    from kvxfer.registry.agent import RequestAgent

    conn = Connector(name, backend="tcp", registry=url)
    conn.register(kv, block_dim=1)
    conn._agent = RequestAgent(conn, url, lease_s=LEASE_S)
    return conn


def tp_producer(url: str, name: str, rank: int, tp: int, rid: str, blocks: list[int], consumers: int,
                ttl: float, out: Any) -> None:
    """Prefill rank ``rank`` of ``tp``: publish its heads of ``rid`` for ``consumers`` decode
    ranks; report every finished event that comes within a second after the first."""
    from kvxfer.errors import KvxferError
    from kvxfer.registry.keys import publication_key

    conn = _heads_connector(name, url, make_heads_kv(TP_HEADS // tp, 100 + rank))
    key = publication_key(rid, rank)
    conn.publish(key, blocks, ttl=ttl, consumers=consumers)
    out.put(("published", key))
    agent = conn.requests
    try:
        fin = agent.wait_finished(timeout=ttl + 10)
        out.put(("finished", fin.request_id, fin.kind.value))
        time.sleep(1.0)
        out.put(("later", [f.kind.value for f in agent.finished()]))
    except KvxferError as exc:
        out.put(("error", type(exc).__name__, str(exc)))
    conn.close()


def tp_consumer(url: str, name: str, rank: int, tp: int, prefill_tp: int, rid: str, srcs: list[list[int]],
                dst: list[int], timeout: float, out: Any) -> None:
    """Decode rank ``rank`` of ``tp``: pull its heads from every prefill rank that holds some,
    concurrently, into ``dst``; check every byte against what each prefill rank published."""
    from kvxfer.errors import KvxferError
    from kvxfer.registry.keys import publication_key
    from kvxfer.reshard import BlockFormat, HeadOrder, HeadReshard, tp_head_range

    mine = TP_HEADS // tp
    kv = make_heads_kv(mine, None)
    conn = _heads_connector(name, url, kv)
    lo, hi = tp_head_range(TP_HEADS, rank, tp)
    src_fmt = BlockFormat(HeadOrder.NHD, TP_BS, TP_HEADS // prefill_tp, TP_D, 2)
    dst_fmt = BlockFormat(HeadOrder.NHD, TP_BS, mine, TP_D, 2)
    handles, expect = [], []
    for p in range(prefill_tp):
        p0, p1 = tp_head_range(TP_HEADS, p, prefill_tp)
        a, b = max(lo, p0), min(hi, p1)
        if a >= b:
            continue
        rs = HeadReshard(src_fmt, dst_fmt, (a - p0, b - p0), dst_head_start=a - lo)
        handles.append(conn.pull(publication_key(rid, p), dst, timeout=timeout, reshard=rs))
        expect.append((p, a - p0, b - p0, a - lo))
    try:
        for h in handles:
            h.wait(timeout + 10)
    except KvxferError as exc:
        out.put(("error", type(exc).__name__, str(exc)))
        conn.close()
        return
    same = True
    for p, s0, s1, d0 in expect:
        want = make_heads_kv(TP_HEADS // prefill_tp, 100 + p)
        for i in range(LAYERS):
            same &= np.array_equal(kv[i][:, dst, :, d0:d0 + s1 - s0], want[i][:, srcs[p], :, s0:s1])
    mask = np.zeros(NUM_BLOCKS, dtype=bool)
    mask[dst] = True
    untouched = all(not kv[i][:, ~mask].any() for i in range(LAYERS))
    out.put(("ok", same, untouched, sorted(h.peer_name for h in handles)))
    conn.close()
