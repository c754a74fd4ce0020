"""Separate "hosts" on one machine: network namespaces joined by a bridge, and parties in them.

Test harness, no part of the library. :class:`Topology` makes one namespace per host (each
with its own 10.x address that exists only inside these namespaces) plus a "switch"
namespace holding a bridge; each host's veth port on the bridge can be taken down and up
(a cable pulled) or rate-limited. Processes run inside a host with ``ip netns exec``.
:meth:`Topology.close` kills what runs there and deletes every namespace (and so every veth);
it is idempotent and also registered with ``atexit``.

:class:`Party` runs this file as ``python netns.py party ...`` inside a host: a Connector
(TCP or UCX) with a registry agent, driven by JSON lines on stdin/stdout (test plumbing
through pipes, not the network). :class:`RegistryProc` runs ``kvxfer-registry`` in a host.

Needs root and iproute2 (``ip``, ``tc``); :func:`netns_unavailable` says why not, for skips.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
SUBNET = "10.213.77"  # exists only inside the namespaces below; nothing is routed anywhere
REGISTRY_PORT = 7391

_live: list[Topology] = []


def _ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=timeout)


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "iproute2 'ip' is not installed (apt-get install -y iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"kvxprobe{secrets.token_hex(3)}"
    try:
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"'ip netns add' is not permitted here: {r.stderr.strip()}"
        r = _ip("-n", probe, "link", "add", "kvxp0", "type", "bridge", check=False)
        if r.returncode != 0:
            return f"creating links in a namespace is not permitted here: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Host:
    name: str  # role: "registry", "prefill", "decode", ...
    ns: str  # namespace name
    addr: str  # its only address
    port: str  # its veth port on the bridge (in the switch namespace)
    inner: str  # its veth inside its own namespace


class Topology:
    """Hosts in namespaces on one bridge. Use as a context manager or call :meth:`close`."""

    def __init__(self, roles: list[str]):
        tag = secrets.token_hex(3)
        self.tag = tag
        self.switch = f"kvx{tag}sw"
        self.hosts: dict[str, Host] = {}
        self._procs: list[subprocess.Popen] = []
        self._namespaces: list[str] = []
        self._closed = False
        _live.append(self)
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, role in enumerate(roles):
                ns = f"kvx{tag}h{i}"
                host = Host(role, ns, f"{SUBNET}.{i + 1}", f"kv{tag}p{i}", f"kv{tag}i{i}")
                self._add_ns(ns)
                # both ends are created inside the switch namespace: nothing touches the root one
                _ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", host.inner)
                _ip("-n", self.switch, "link", "set", host.inner, "netns", ns)
                _ip("-n", self.switch, "link", "set", host.port, "master", "br0")
                _ip("-n", self.switch, "link", "set", host.port, "up")
                _ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", host.inner)
                _ip("-n", ns, "link", "set", host.inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.hosts[role] = host
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    # -- faults -------------------------------------------------------------------------
    def link(self, role: str, up: bool) -> None:
        """Pull (``up=False``) or plug back the cable of ``role``'s host."""
        _ip("-n", self.switch, "link", "set", self.hosts[role].port, "up" if up else "down")

    def rate_limit(self, role: str, mbit: int | None) -> None:
        """Limit the bandwidth towards ``role``'s host (None removes the limit)."""
        port = self.hosts[role].port
        subprocess.run(["tc", "-n", self.switch, "qdisc", "del", "dev", port, "root"], capture_output=True, timeout=15)
        if mbit is not None:
            subprocess.run(["tc", "-n", self.switch, "qdisc", "add", "dev", port, "root", "tbf", "rate", f"{mbit}mbit",
                            "burst", "64kb", "latency", "2s"], check=True, capture_output=True, timeout=15)

    def kill_host(self, role: str) -> list[int]:
        """SIGKILL every process running in ``role``'s namespace (all of them are ours)."""
        ns = self.hosts[role].ns
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self._procs:
            if p.pid in pids:
                p.wait(10)
        return pids

    # -- processes ----------------------------------------------------------------------
    def popen(self, role: str, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``role``'s namespace."""
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[role].ns, *argv], env={**os.environ, **(env or {})},
                             **kw)
        self._procs.append(p)
        return p

    def close(self) -> None:
        """Kill our processes, delete every namespace (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for ns in self._namespaces:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
        if self in _live:
            _live.remove(self)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for topo in list(_live):
        topo.close()


# --------------------------------------------------------------------------------------------
# processes in a host
# --------------------------------------------------------------------------------------------
class _Lines:
    """Lines of a child's stdout, read by a thread so that every wait has a timeout."""

    def __init__(self, stream: Any):
        self.q: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.tail: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.q.put(line)
        self.q.put(None)

    def get(self, timeout: float) -> str | None:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output within {timeout} s") from None


class RegistryProc:
    """``kvxfer-registry`` listening on the registry host's address, on a fixed port."""

    def __init__(self, topo: Topology, role: str = "registry", port: int = REGISTRY_PORT):
        self.topo, self.role, self.port = topo, role, port
        self.url = f"kvxfer://{topo[role].addr}:{port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 30) -> None:
        self.proc = self.topo.popen(self.role, [sys.executable, "-m", "kvxfer.registry.cli", "--host",
                                                self.topo[self.role].addr, "--port", str(self.port),
                                                "--log-level", "WARNING"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = _Lines(self.proc.stdout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = lines.get(max(0.1, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"kvxfer-registry exited with {self.proc.wait(5)}")
            if "serving" in line:
                return
        raise TimeoutError("kvxfer-registry did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class PartyError(RuntimeError):
    """A party answered a command with an error: ``kind`` is the exception class name."""

    def __init__(self, kind: str, msg: str, elapsed: float | None = None):
        super().__init__(f"{kind}: {msg}")
        self.kind, self.msg, self.elapsed = kind, msg, elapsed


class Party:
    """A Connector with a registry agent in ``role``'s host, driven over its stdin/stdout."""

    def __init__(self, topo: Topology, role: str, name: str, registry_url: str, *, backend: str = "tcp",
                 seed: int | None = None, lease_s: float = 1.5, timeout: float = 10.0, num_blocks: int = 64,
                 block_kib: int = 16, layers: int = 2):
        self.topo, self.role, self.name = topo, role, name
        env = {"PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        if backend == "ucx":
            env.update(UCX_TLS="tcp", UCX_NET_DEVICES=topo[role].inner, UCX_WARN_UNUSED_ENV_VARS="n")
        args = dict(name=name, addr=topo[role].addr, registry=registry_url, backend=backend, seed=seed,
                    lease_s=lease_s, timeout=timeout, num_blocks=num_blocks, block_kib=block_kib, layers=layers)
        self.spec = args
        self.proc = topo.popen(role, [sys.executable, str(HERE), "party", json.dumps(args)], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lines = _Lines(self.proc.stdout)
        self.call("ping", reply_timeout=90)

    def call(self, op: str, reply_timeout: float = 60, **kw: Any) -> Any:
        """Send one command; its result, or PartyError. TimeoutError when the party hangs."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + reply_timeout
        while True:
            line = self._lines.get(max(0.01, deadline - time.monotonic()))
            if line is None:
                raise PartyError("ProcessExited", f"party {self.name!r} exited ({self.proc.poll()})")
            if line.startswith("@@"):
                break  # anything else on stdout is a library print: ignore it
        reply = json.loads(line[2:])
        if "error" in reply:
            raise PartyError(reply["error"], reply["msg"], reply.get("elapsed"))
        return reply.get("result")

    def blocks(self, ids: list[int]) -> list[bytes]:
        return [base64.b64decode(b) for b in self.call("blocks", ids=ids)]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit", reply_timeout=15)
            except (PartyError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def make_kv(seed: int | None, num_blocks: int, block_kib: int, layers: int) -> list[np.ndarray]:
    """Layers of [blocks, K/V, block bytes / 2]: random for a producer (seed), zeros otherwise."""
    shape = (num_blocks, 2, block_kib * 512)
    if seed is None:
        return [np.zeros(shape, dtype=np.uint8) for _ in range(layers)]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(layers)]


def expected_blocks(seed: int, ids: list[int], num_blocks: int = 64, block_kib: int = 16, layers: int = 2) -> list[bytes]:
    """What :meth:`Party.blocks` returns for a producer seeded ``seed``."""
    return [np.ascontiguousarray(t[ids]).tobytes() for t in make_kv(seed, num_blocks, block_kib, layers)]


# --------------------------------------------------------------------------------------------
# the party process
# --------------------------------------------------------------------------------------------
def _party_main(spec: dict[str, Any]) -> None:
    from kvxfer.connector import Connector
    from kvxfer.errors import KvxferError
    from kvxfer.registry.agent import RequestAgent

    kv = make_kv(spec["seed"], spec["num_blocks"], spec["block_kib"], spec["layers"])
    conn = Connector(spec["name"], backend=spec["backend"], listen=f"{spec['addr']}:0", registry=spec["registry"],
                     timeout=spec["timeout"])
    conn.register(kv)
    # a short lease so that a lost party shows within seconds
    conn._agent = RequestAgent(conn, spec["registry"], lease_s=spec["lease_s"])
    agent = conn._agent
    handles: dict[int, Any] = {}

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write("@@" + json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        t0 = time.monotonic()
        try:
            if op == "ping":
                result: Any = spec["name"]
            elif op == "exit":
                reply({"result": None})
                conn.close()
                return
            elif op == "blocks":
                result = [base64.b64encode(np.ascontiguousarray(t[cmd["ids"]]).tobytes()).decode() for t in kv]
            elif op == "publish":
                conn.publish(cmd["rid"], cmd["blocks"], ttl=cmd.get("ttl", 60.0))
                result = None
            elif op in ("pull", "expect"):
                h = getattr(conn, op)(cmd["rid"], cmd["dst"], timeout=cmd.get("timeout", 30.0))
                handles[id(h)] = h
                result = id(h)
            elif op == "push":
                h = conn.push(cmd["rid"], cmd["src"], layers=cmd.get("layers"), last=cmd.get("last", True),
                              timeout=cmd.get("timeout", 30.0))
                handles[id(h)] = h
                result = id(h)
            elif op == "wait":
                h = handles.pop(cmd["h"])
                try:
                    h.wait(cmd["timeout"])
                except KvxferError:
                    if not h.done():
                        raise TimeoutError("handle still pending: the transfer hangs") from None
                    raise
                result = h.nbytes
            elif op == "finished":
                fin = agent.wait_finished(cmd["timeout"])
                result = [fin.request_id, fin.kind.value, fin.reason]
            elif op == "lookup":
                agent._client.lookup(cmd["name"])
                result = True
            else:
                raise ValueError(f"unknown command {op!r}")
        except Exception as exc:
            reply({"error": type(exc).__name__, "msg": str(exc), "elapsed": time.monotonic() - t0})
            continue
        reply({"result": result})
    conn.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "party":
        _party_main(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: netns.py party '<json spec>'")
