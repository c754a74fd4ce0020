"""The measuring side of ``kvxfer-bench``: runs each point against the serving side.

Layer: tools. For each point it asks the serving side (over the bootstrap connection) for a
pool and a connector, builds its own, connects, warms up, checks the bytes once (destination
poisoned first), times ``iters`` transfers, then measures the point's baseline and, when
importable, NIXL on the same blocks.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__
from .._tensors import MemoryKind
from ..backends.base import BackendKind
from ..config import TcpConfig, from_env
from ..connector import Connector, Peer
from ..errors import ConfigError, KvxferError, PeerLostError
from ..handle import Op
from . import wire
from .arrays import Pool, allocate_pool
from .baselines import RawTcpClient, gpu_copy_baseline
from .nixl_baseline import measure_nixl, nixl_module_name
from .options import BenchOptions
from .results import BaselineKind, BaselineResult, PointResult, Timing
from .workloads import Workload

__all__ = ["PeerClient", "PeerUsageError", "PeerFailedError", "PointSpec", "Runner"]

log = logging.getLogger(__name__)

LOCAL_SALT = 0


class PeerUsageError(ConfigError):
    """The serving side refused a request that cannot work there (memory, backend, GPU)."""


class PeerFailedError(KvxferError):
    """The serving side failed a request."""


class PeerClient:
    """The measuring side's end of the bootstrap connection."""

    def __init__(self, host: str, port: int, timeout: float):
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise PeerLostError(f"cannot reach the bench peer at {host}:{port}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = host
        wire.send_msg(self.sock, wire.Hello(__version__))
        info = wire.recv_msg(self.sock)
        if not isinstance(info, wire.PeerInfo):
            raise PeerFailedError(f"the bench peer answered Hello with {type(info).__name__}")
        self.info = info
        self._closed = False

    @property
    def local_address(self) -> str:
        """Our address on the route to the peer (where the peer can reach us)."""
        return str(self.sock.getsockname()[0])

    def request(self, msg: wire.Message) -> wire.Message:
        """Send ``msg``, return the reply; a Failure reply raises."""
        wire.send_msg(self.sock, msg)
        reply = wire.recv_msg(self.sock)
        if isinstance(reply, wire.Failure):
            cls = PeerUsageError if reply.usage else PeerFailedError
            raise cls(f"the serving side ({self.info.hostname}) refused {type(msg).__name__}: {reply.error}: {reply.message}")
        return reply

    def close(self) -> None:
        """Say goodbye and close; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            wire.send_msg(self.sock, wire.Bye())
        except PeerLostError:
            pass
        self.sock.close()


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One point to measure."""

    workload: Workload
    backend: BackendKind
    op: Op


ProgressFn = Callable[[str], None]


class Runner:
    """Measures points one after another; keeps one pool per side and caches baselines."""

    def __init__(self, opts: BenchOptions, client: PeerClient, devices: tuple[int, int], same_host: bool):
        self.opts = opts
        self.client = client
        self.devices = devices
        self.same_host = same_host
        self._pool: Pool | None = None
        self._raw: RawTcpClient | None = None
        self._baselines: dict[tuple[Any, ...], BaselineResult] = {}
        self._nixl_runs = 0

    # -- resources ---------------------------------------------------------------------------
    def _local_pool(self, w: Workload) -> Pool:
        if self._pool is None or self._pool.workload != w:
            self._pool = None  # free the previous pool first
            self._pool = allocate_pool(w, self.opts.memory, self.devices[0], LOCAL_SALT)
        return self._pool

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self._pool = None

    # -- one point ---------------------------------------------------------------------------
    def run_point(self, spec: PointSpec, progress: ProgressFn) -> PointResult:
        """Measure one point. Transfer failures become the result's error; refusals raise.

        Raises:
            PeerUsageError: the serving side cannot do what was asked (exit code 2).
        """
        opts, w = self.opts, spec.workload
        progress("allocating")
        pool = self._local_pool(w)
        ready = self.client.request(wire.Setup(w, spec.backend, opts.memory, self.devices[1], opts.tcp_streams))
        assert isinstance(ready, wire.Ready)
        timing: Timing | None = None
        verified = False
        error = ""
        nixl: BaselineResult | None = None
        tcp = from_env(TcpConfig, "KVXFER_TCP_", streams=opts.tcp_streams)
        conn = Connector("kvxfer-bench", backend=spec.backend.value, listen=f"{self.client.local_address}:0",
                         timeout=opts.timeout, tcp=tcp)
        try:
            conn.register(list(pool.tensors), block_dim=w.block_dim)
            peer = conn.connect(ready.metadata)
            remote_ids, local_ids = w.block_ids()
            if peer.backend != spec.backend.value:
                raise KvxferError(f"asked for {spec.backend.value} but the connector chose {peer.backend}")
            progress("warm-up")
            for _ in range(opts.warmup):
                self._transfer(conn, peer, spec.op, local_ids, remote_ids)
            if opts.verify:
                progress("checking bytes")
                verified = self._verify(conn, peer, spec.op, pool, local_ids, remote_ids)
                if not verified:
                    error = "data check failed: the destination blocks differ from the source blocks"
            samples = []
            for i in range(opts.iters):
                progress(f"iter {i + 1}/{opts.iters}")
                samples.append(self._transfer(conn, peer, spec.op, local_ids, remote_ids))
            timing = Timing.of(w.total_bytes, samples)
            if not opts.verify:
                verified = True
            conn.close()
            if opts.nixl and nixl_module_name() is not None:
                progress("NIXL")
                nixl = self._nixl(spec, pool, local_ids, remote_ids)
        except PeerUsageError:
            raise
        except KvxferError as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
            try:
                self.client.request(wire.Release())
            except PeerFailedError as exc:
                log.warning("releasing the point on the serving side: %s", exc)
        baseline = self._baseline(spec, progress) if opts.baseline else None
        return PointResult(
            workload=w, backend=spec.backend, op=spec.op, memory=opts.memory, devices=self.devices,
            iters=opts.iters, warmup=opts.warmup, timing=timing, verified=verified and not error,
            baseline=baseline, nixl=nixl, error=error,
        )

    def _transfer(self, conn: Connector, peer: Peer, op: Op, local_ids: np.ndarray, remote_ids: np.ndarray) -> float:
        t0 = time.perf_counter()
        if op is Op.READ:
            h = conn.read(peer, remote_ids, local_ids, timeout=self.opts.timeout)
        else:
            h = conn.write(peer, local_ids, remote_ids, timeout=self.opts.timeout)
        h.wait(self.opts.timeout + 5)
        return time.perf_counter() - t0

    def _verify(self, conn: Connector, peer: Peer, op: Op, pool: Pool, local_ids: np.ndarray, remote_ids: np.ndarray) -> bool:
        if op is Op.READ:
            pool.poison(local_ids)
            self._transfer(conn, peer, op, local_ids, remote_ids)
            want = self.client.request(wire.Digest(remote_ids.tolist()))
            assert isinstance(want, wire.DigestReply)
            return pool.digest(local_ids) == want.digest
        self.client.request(wire.Poison(remote_ids.tolist()))
        self._transfer(conn, peer, op, local_ids, remote_ids)
        got = self.client.request(wire.Digest(remote_ids.tolist()))
        assert isinstance(got, wire.DigestReply)
        return pool.digest(local_ids) == got.digest

    # -- references --------------------------------------------------------------------------
    def baseline_kind(self, backend: BackendKind) -> BaselineKind:
        """Which ceiling a backend's figures are compared with."""
        if self.opts.memory is MemoryKind.CUDA and backend is not BackendKind.TCP and self.same_host:
            return BaselineKind.DEVICE_MEMCPY if self.devices[0] == self.devices[1] else BaselineKind.PEER_MEMCPY
        return BaselineKind.RAW_TCP

    def _baseline(self, spec: PointSpec, progress: ProgressFn) -> BaselineResult:
        kind = self.baseline_kind(spec.backend)
        nbytes = spec.workload.total_bytes
        key = (kind, spec.op, nbytes)
        cached = self._baselines.get(key)
        if cached is not None:
            return cached
        progress(f"baseline {kind.value}")
        opts = self.opts
        if kind is BaselineKind.RAW_TCP:
            try:
                if self._raw is None:
                    sockbuf = from_env(TcpConfig, "KVXFER_TCP_").socket_buffer
                    self._raw = RawTcpClient(self.client.host, self.client.info.raw_port, opts.tcp_streams, sockbuf, opts.timeout)
                timing = self._raw.measure(spec.op, nbytes, opts.iters, opts.warmup)
                result = BaselineResult(kind, timing, f"{opts.tcp_streams} plain TCP connections, one sendall/recv_into each")
            except KvxferError as exc:
                result = BaselineResult(kind, None, f"failed: {exc}")
        else:
            local, remote = self.devices
            src, dst = (remote, local) if spec.op is Op.READ else (local, remote)
            result = gpu_copy_baseline(nbytes, src, dst, opts.iters, opts.warmup)
        self._baselines[key] = result
        return result

    def _nixl(self, spec: PointSpec, pool: Pool, local_ids: np.ndarray, remote_ids: np.ndarray) -> BaselineResult:
        key = ("nixl", spec.workload, spec.op)
        cached = self._baselines.get(key)
        if cached is not None:
            return cached
        try:
            ready = self.client.request(wire.NixlSetup())
        except PeerFailedError as exc:
            return BaselineResult(BaselineKind.NIXL, None, f"serving side: {exc}")
        assert isinstance(ready, wire.NixlReady)
        self._nixl_runs += 1
        result = measure_nixl(pool, ready.agent_metadata, ready.addrs, spec.op, local_ids, remote_ids,
                              self.devices[1], self.opts.iters, self.opts.warmup, self.opts.timeout,
                              name=f"kvxfer-bench-initiator-{self._nixl_runs}")
        self._baselines[key] = result
        return result
