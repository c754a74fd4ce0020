"""Soak: thousands of TCP transfers over random layouts and block lists, with faults injected.

A driver Connector in this process reads from and writes to peer Connectors in child
processes. Each epoch picks a random layout (kind, blocks, block size, layers) for everyone;
the lower half of every side's blocks holds seeded content that is never written, the upper
half receives transfers. Every tensor sits between canary bytes. Faults, at random: a peer
killed (SIGKILL) or stalled (SIGSTOP) under a transfer, a link's socket shut down, garbage or a
truncated frame sent on a live link, garbage and truncated frames sent to a listening port.

Every transfer must either deliver exactly the right bytes (compared: reads here, writes by the
peer's digest) or fail with a KvxferError within its timeout. At the end of each epoch the
canaries and the never-written halves are checked on every side. File descriptors, threads and
RSS of the driver are measured after the warm-up epoch and at the end.

    python bench/soak.py --transfers 10000          # the full soak (a few minutes on 2 cores)
    python bench/soak.py --transfers 500 --json out.json

Exit status: 0 clean; 1 corruption, hang or leak; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

CANARY = 4096
CANARY_BYTE = 0xA5
KINDS = ("kv_first", "blocks_first", "mla", "vllm_shared")
FAULTS = ("kill", "stall", "drop", "garbage_link", "truncate_link", "garbage_port")


# --------------------------------------------------------------------------------------------
# layouts between canaries
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    kind: str
    num_blocks: int
    layers: int
    block_size: int
    heads: int
    head_dim: int


class Arena:
    """The tensors of one side, each carved out of a buffer with canary bytes on both sides."""

    def __init__(self, spec: Spec, seed: int):
        self.spec, self.seed = spec, seed
        nb, L, bs, h, d = spec.num_blocks, spec.layers, spec.block_size, spec.heads, spec.head_dim
        self.buffers: list[np.ndarray] = []
        self.tensors: list[np.ndarray] = []
        rng = np.random.default_rng(seed)
        if spec.kind == "vllm_shared":
            piece = bs * h * d * 2
            per_block = L * 2 * piece
            body = self._carve(nb * per_block)
            body[:] = rng.integers(0, 256, body.size, dtype=np.uint8)
            self.tensors = [np.lib.stride_tricks.as_strided(body[l * 2 * piece:], shape=(2, nb, piece),
                                                            strides=(piece, per_block, 1)) for l in range(L)]
            self.block_dim = 1
            return
        shape, dtype, self.block_dim = {
            "kv_first": ((2, nb, bs, h, d), np.float16, 1),
            "blocks_first": ((nb, 2, bs, h, d), np.float16, 0),
            "mla": ((nb, bs, 576), np.uint16, 0),
        }[spec.kind]
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        for _ in range(L):
            body = self._carve(nbytes)
            body[:] = rng.integers(0, 256, body.size, dtype=np.uint8)
            self.tensors.append(body.view(dtype).reshape(shape))

    def _carve(self, nbytes: int) -> np.ndarray:
        buf = np.full(nbytes + 2 * CANARY, CANARY_BYTE, dtype=np.uint8)
        self.buffers.append(buf)
        return buf[CANARY:CANARY + nbytes]

    def blocks(self, ids: Any, layers: list[int] | None = None) -> list[bytes]:
        ids = np.asarray(ids, dtype=np.int64)
        return [np.ascontiguousarray(np.take(t, ids, axis=self.block_dim)).tobytes()
                for i, t in enumerate(self.tensors) if layers is None or i in layers]

    def digest(self, ids: Any, layers: list[int] | None) -> str:
        h = hashlib.blake2b(digest_size=16)
        for b in self.blocks(ids, layers):
            h.update(b)
        return h.hexdigest()

    def canary_damage(self) -> int:
        """Bytes of canary that are no longer the canary pattern."""
        return sum(int((b[:CANARY] != CANARY_BYTE).sum() + (b[-CANARY:] != CANARY_BYTE).sum()) for b in self.buffers)

    def source_damage(self) -> int:
        """Bytes of the never-written lower half that differ from the seeded content."""
        fresh = Arena(self.spec, self.seed)
        low = np.arange(self.spec.num_blocks // 2)
        return sum(int((np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8)).sum())
                   for a, b in zip(self.blocks(low), fresh.blocks(low)))


# --------------------------------------------------------------------------------------------
# the peer process
# --------------------------------------------------------------------------------------------
LINK_FAULTS = ("drop", "garbage_link", "truncate_link")  # faults that break the driver's link to the victim


def _quiet_logs() -> None:
    # the soak provokes thousands of expected "dropping link" warnings
    lg = logging.getLogger("kvxfer")
    lg.addHandler(logging.NullHandler())
    lg.propagate = False


def _peer_main(conn: Any, name: str, spec: Spec, seed: int, timeout: float) -> None:
    _quiet_logs()
    from kvxfer import Connector

    arena = Arena(spec, seed)
    with Connector(name, backend="tcp", timeout=timeout) as c:
        c.register(arena.tensors, block_dim=arena.block_dim)
        conn.send(c.metadata())
        while True:
            try:
                seq, cmd, *args = conn.recv()
            except EOFError:
                return
            if cmd == "digest":
                conn.send((seq, arena.digest(*args)))
            elif cmd == "check":
                conn.send((seq, (arena.canary_damage(), arena.source_damage())))
            elif cmd == "exit":
                conn.send((seq, None))
                return


class Peer:
    """A peer Connector in a child process."""

    def __init__(self, ctx: Any, name: str, spec: Spec, seed: int, timeout: float):
        self.name, self.spec, self.seed = name, spec, seed
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, args=(child, name, spec, seed, timeout), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            self.kill()
            raise RuntimeError(f"peer {name} did not start")
        self.metadata: bytes = self.conn.recv()
        self.link: Any = None
        self.stopped = False
        self.seq = 0

    def ask(self, *cmd: Any, timeout: float = 30) -> Any:
        self.seq += 1
        self.conn.send((self.seq, *cmd))
        deadline = time.monotonic() + timeout
        while self.conn.poll(max(0.0, deadline - time.monotonic())):
            seq, result = self.conn.recv()
            if seq == self.seq:  # a late answer to an earlier, timed-out question is skipped
                return result
        raise TimeoutError(f"peer {self.name} did not answer {cmd[0]}")

    @property
    def tcp_addr(self) -> tuple[str, int]:
        import msgpack

        ep = msgpack.unpackb(self.metadata, raw=False)["be"]["tcp"]
        return ep["host"], ep["port"]

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)
        self.conn.close()

    def close(self) -> None:
        if self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
        if self.proc.is_alive():
            try:
                self.ask("exit", timeout=10)
            except (TimeoutError, OSError, EOFError):
                pass
            self.proc.join(10)
        self.kill()


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
@dataclass
class Report:
    transfers: int = 0
    succeeded: int = 0
    failures_reported: int = 0
    unexpected_failures: int = 0
    faults_injected: int = 0
    corrupted_bytes: int = 0
    canary_bytes_damaged: int = 0
    hangs: int = 0
    late_failures: int = 0
    epochs: int = 0
    bytes_moved: int = 0
    duration_s: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    failure_kinds: dict[str, int] = field(default_factory=dict)
    leaks: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.corrupted_bytes or self.canary_bytes_damaged or self.hangs or self.late_failures
                    or self.leaks.get("leaked"))


def _resources() -> dict[str, int]:
    gc.collect()
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(), "rss": rss}


def _garbage(rng: random.Random) -> bytes:
    from kvxfer.protocol.frames import FrameType, encode_frame

    pick = rng.randrange(5)
    if pick == 0:
        return rng.randbytes(rng.randrange(1, 4096))
    if pick == 1:  # a prefix promising more header than follows
        return encode_frame(FrameType.XFER_REQUEST, {"x": 1, "op": "r"})[:rng.randrange(1, 30)]
    if pick == 2:  # bad version
        return b"KVXF\x09\x03\x00\x00" + struct.pack("!IQ", 1, 0) + b"\x80"
    if pick == 3:  # header that is not msgpack
        return b"KVXF\x01\x03\x00\x00" + struct.pack("!IQ", 4, 0) + b"\xc1\xc1\xc1\xc1"
    return encode_frame(FrameType.XFER_REQUEST, {"x": "nope", "op": 7})


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.report = Report()
        self.ctx = mp.get_context("spawn")
        self.deadline = time.monotonic() + args.max_minutes * 60
        self.open_res: dict[str, int] = {}

    def random_spec(self) -> Spec:
        r = self.rng
        return Spec(r.choice(KINDS), r.choice([16, 24, 48, 64, 96]), r.randint(1, 4), r.choice([1, 4, 16]),
                    r.choice([1, 2, 4]), r.choice([16, 64]))

    def run(self) -> Report:
        from kvxfer import Connector

        t0 = time.monotonic()
        start_res: dict[str, int] | None = None
        epoch = 0
        while self.report.transfers < self.args.transfers and time.monotonic() < self.deadline:
            spec = self.random_spec()
            driver_arena = Arena(spec, seed=1000 + epoch)
            driver = Connector("driver", backend="tcp", timeout=self.args.timeout)
            try:
                driver.register(driver_arena.tensors, block_dim=driver_arena.block_dim)
                peers = [Peer(self.ctx, f"peer{i}", spec, 2000 + 10 * epoch + i, self.args.timeout)
                         for i in range(self.args.peers)]
                try:
                    self.epoch(driver, driver_arena, peers, min(self.args.epoch, self.args.transfers - self.report.transfers))
                finally:
                    for p in peers:
                        p.close()
            finally:
                driver.close()
            self.report.canary_bytes_damaged += driver_arena.canary_damage()
            dmg = driver_arena.source_damage()
            if dmg:
                self.report.problems.append(f"epoch {epoch}: driver's never-written blocks changed ({dmg} B)")
                self.report.corrupted_bytes += dmg
            del driver, driver_arena, peers
            epoch += 1
            self.report.epochs = epoch
            if epoch == 1:  # after the warm-up epoch: connected (before close) and closed
                start_res = {**_resources(), **{f"open_{k}": v for k, v in self.open_res.items()}}
            if self.args.verbose:
                print(f"epoch {epoch}: {spec} transfers={self.report.transfers} faults={self.report.faults_injected}",
                      flush=True)
        time.sleep(0.5)  # let closing threads finish
        end_res = {**_resources(), **{f"open_{k}": v for k, v in self.open_res.items()}}
        self.report.duration_s = round(time.monotonic() - t0, 1)
        self.report.faults = dict(sorted(Counter(self.report.faults).items()))
        if start_res is not None:
            growth = {k: end_res[k] - start_res[k] for k in end_res}
            limits = {"fds": self.args.fd_slack, "threads": self.args.thread_slack, "rss": self.args.rss_slack_mib << 20}
            leaked = [k for k in growth if growth[k] > limits[k.removeprefix("open_")]]
            self.report.leaks = {"start": start_res, "end": end_res, "growth": growth, "leaked": leaked}
        return self.report

    # -- one epoch ----------------------------------------------------------------------
    def connect(self, driver: Any, peer: Peer) -> None:
        from kvxfer import KvxferError

        for attempt in range(5):  # bounded: a peer that cannot be reached 5 times is a problem
            try:
                peer.link = driver.connect(peer.metadata, timeout=10)
                return
            except KvxferError as exc:
                self.report.problems.append(f"connect to {peer.name} failed (attempt {attempt + 1}): "
                                            f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
        raise RuntimeError(f"cannot reconnect to {peer.name}: {self.report.problems[-5:]}")

    def epoch(self, driver: Any, arena: Arena, peers: list[Peer], count: int) -> None:
        for p in peers:
            self.connect(driver, p)
        spec = arena.spec
        half = spec.num_blocks // 2
        done = 0
        while done < count and time.monotonic() < self.deadline:
            batch = min(self.rng.randint(1, 4), count - done)
            fault = self.rng.choice(FAULTS) if self.rng.random() < self.args.fault_rate else None
            victim = self.rng.choice(peers)
            self.run_batch(driver, arena, peers, victim, fault, batch, half)
            done += batch
            # repair: respawn dead peers, reconnect closed links
            for i, p in enumerate(peers):
                if not p.proc.is_alive():
                    p.kill()
                    peers[i] = p = Peer(self.ctx, p.name, spec, p.seed, self.args.timeout)
                    p.link = None
                if p.link is None or p.link.closed:
                    self.connect(driver, p)
        time.sleep(0.2)  # let links closed by the last faults finish their threads
        self.open_res = _resources()  # connected to every peer: the steady state
        for p in peers:
            try:
                canary, source = p.ask("check", timeout=60)
            except (TimeoutError, EOFError, OSError) as exc:
                self.report.problems.append(f"peer {p.name} did not answer the final check: {exc}")
                continue
            self.report.canary_bytes_damaged += canary
            if source:
                self.report.problems.append(f"peer {p.name}: never-written blocks changed ({source} B)")
                self.report.corrupted_bytes += source

    def run_batch(self, driver: Any, arena: Arena, peers: list[Peer], victim: Peer, fault: str | None, n: int,
                  half: int) -> None:
        from kvxfer import KvxferError

        r, rep, spec = self.rng, self.report, arena.spec
        timeout = self.args.timeout
        if fault == "garbage_port":
            self.send_garbage(r.choice([victim.tcp_addr, self.driver_addr(driver)]))
        if fault == "stall":
            os.kill(victim.proc.pid, signal.SIGSTOP)
            victim.stopped = True
        jobs = []
        used_dst: dict[str, set[int]] = {}
        for _ in range(n):
            p = victim if r.random() < 0.5 else r.choice(peers)
            op = r.choice(("read", "write"))
            k = r.randint(1, min(32, half))
            src = r.sample(range(half), k)  # the seeded, never-written half
            key = "driver" if op == "read" else p.name  # whose upper half receives the bytes
            free = [b for b in range(half, spec.num_blocks) if b not in used_dst.setdefault(key, set())]
            if len(free) < k:
                continue
            dst = r.sample(free, k)
            used_dst[key].update(dst)  # two transfers in flight never write the same block
            layers = None if r.random() < 0.6 else sorted(r.sample(range(spec.layers), r.randint(1, spec.layers)))
            tmo = self.args.stall_timeout if p.stopped else timeout
            try:
                h = getattr(driver, op)(p.link, src, dst, layers=layers, timeout=tmo)
            except KvxferError as exc:  # the link was already gone: reported at once, fine
                rep.transfers += 1
                rep.failures_reported += 1
                rep.failure_kinds[type(exc).__name__] = rep.failure_kinds.get(type(exc).__name__, 0) + 1
                continue
            jobs.append((p, op, src, dst, layers, h, tmo))
        if fault is not None:
            rep.faults_injected += 1
            rep.faults[fault] = rep.faults.get(fault, 0) + 1
            self.inject(fault, victim)
        for p, op, src, dst, layers, h, tmo in jobs:
            rep.transfers += 1
            try:
                h.wait(tmo + 10)
            except KvxferError as exc:
                if not h.done():
                    rep.hangs += 1
                    rep.problems.append(f"hang: {op} with {p.name} still pending {tmo + 10} s after its timeout {tmo}")
                    continue
                rep.failures_reported += 1
                rep.failure_kinds[type(exc).__name__] = rep.failure_kinds.get(type(exc).__name__, 0) + 1
                if fault is None or fault == "garbage_port":
                    rep.unexpected_failures += 1
                    if len(rep.problems) < 50:
                        rep.problems.append(f"unexpected failure without a fault on the link: {type(exc).__name__}: {exc}")
                continue
            finally:
                if h.done() and h.stats.seconds > tmo + 5:
                    rep.late_failures += 1
            rep.succeeded += 1
            rep.bytes_moved += h.nbytes
            self.verify(arena, p, op, src, dst, layers)
        if victim.stopped:
            os.kill(victim.proc.pid, signal.SIGCONT)
            victim.stopped = False
        if fault in LINK_FAULTS and not victim.link.closed:
            # The fault broke this link's framing, but a truncated frame in the middle of a stream
            # is only detected once later bytes arrive (the next batch's frames are read as its
            # remainder and then refused). A stream protocol cannot know sooner; the link is
            # tainted, so retire it here and let the repair step reconnect, and the next batch's
            # failures stay attributable to faults of their own.
            victim.link.close()

    def verify(self, arena: Arena, p: Peer, op: str, src: list[int], dst: list[int], layers: list[int] | None) -> None:
        rep = self.report
        if op == "read":
            want = _seeded(arena.spec, p.seed)  # the peer's seeded content, rebuilt here
            got_b, want_b = arena.blocks(dst, layers), want.blocks(src, layers)
            bad = sum(int((np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8)).sum()) for a, b in zip(got_b, want_b))
            if bad:
                rep.corrupted_bytes += bad
                rep.problems.append(f"read from {p.name}: {bad} B differ")
        else:
            try:
                got = p.ask("digest", dst, layers, timeout=30)
            except (TimeoutError, EOFError, OSError) as exc:
                if p.proc.is_alive():
                    rep.problems.append(f"write to {p.name}: no digest to compare ({type(exc).__name__})")
                return  # else the peer was killed after completing: nothing to compare
            if got != arena.digest(src, layers):
                nbytes = sum(len(b) for b in arena.blocks(src, layers))
                rep.corrupted_bytes += nbytes
                rep.problems.append(f"write to {p.name}: digest differs ({nbytes} B suspect)")

    def inject(self, fault: str, victim: Peer) -> None:
        time.sleep(self.rng.random() * 0.004)  # land somewhere inside the batch
        link = victim.link.link  # the TcpLink under the Connector's Peer
        if fault == "kill":
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.join(10)  # dead before the repair step looks at it
        elif fault == "drop":
            socks = [link._ctrl, *link._data]
            try:
                self.rng.choice(socks).shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif fault == "garbage_link":
            try:
                link._ctrl.sendall(_garbage(self.rng) or b"\0")
            except OSError:
                pass
        elif fault == "truncate_link":
            from kvxfer.protocol.frames import FrameType, encode_frame

            frame = encode_frame(FrameType.NOTIFY, {"n": b"x" * 64})
            try:
                with link._ctrl_lock:
                    link._ctrl.sendall(frame[:self.rng.randrange(1, len(frame))])
                    link._ctrl.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def send_garbage(self, addr: tuple[str, int]) -> None:
        try:
            with socket.create_connection(addr, timeout=2) as s:
                s.sendall(_garbage(self.rng))
        except OSError:
            pass

    @staticmethod
    def driver_addr(driver: Any) -> tuple[str, int]:
        import msgpack

        ep = msgpack.unpackb(driver.metadata(), raw=False)["be"]["tcp"]
        return ep["host"], ep["port"]


_seeded_cache: dict[tuple[Spec, int], Arena] = {}


def _seeded(spec: Spec, seed: int) -> Arena:
    key = (spec, seed)
    if key not in _seeded_cache:
        _seeded_cache.clear()  # one epoch's peers at a time
        _seeded_cache[key] = Arena(spec, seed)
    return _seeded_cache[key]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=10_000)
    ap.add_argument("--epoch", type=int, default=500, help="transfers per random layout")
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--fault-rate", type=float, default=0.03, help="chance that a batch gets a fault")
    ap.add_argument("--timeout", type=float, default=5.0, help="deadline of a transfer, seconds")
    ap.add_argument("--stall-timeout", type=float, default=1.0, help="deadline of transfers to a stalled peer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=60.0, help="stop starting transfers after this")
    ap.add_argument("--fd-slack", type=int, default=8)
    ap.add_argument("--thread-slack", type=int, default=3)
    ap.add_argument("--rss-slack-mib", type=int, default=64)
    ap.add_argument("--json", default=None, help="write the report here too")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.transfers < 1 or args.peers < 1 or not 0 <= args.fault_rate <= 1:
        ap.error("--transfers and --peers must be positive, --fault-rate in [0, 1]")
    _quiet_logs()
    rep = Soak(args).run()
    out = {**asdict(rep), "ok": rep.ok}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if rep.transfers < args.transfers:
        print(f"soak: only {rep.transfers} of {args.transfers} transfers ran before --max-minutes", file=sys.stderr)
        return 1
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
