"""The serving side of ``kvxfer-bench``: holds a KV pool and a Connector for the measuring side.

Layer: tools. Runs as ``kvxfer-bench --listen host:port`` on another host, or as a spawned
child process of a one-host run. It answers bootstrap requests (:mod:`kvxfer.tools.wire`) one
session at a time and serves the raw-socket baseline beside them.
"""

from __future__ import annotations

import logging
import socket
import sys
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .. import __version__
from ..config import TcpConfig, from_env
from ..connector import Connector
from ..errors import BackendUnavailableError, ConfigError, KvxferError, PeerLostError, ProtocolError
from ..backends.tcp import parse_host_port
from . import wire
from .arrays import Pool, allocate_pool
from .baselines import RawTcpServer
from .environment import check_fits, collect_environment, FitRequest

__all__ = ["serve", "child_main", "PEER_SALT"]

log = logging.getLogger(__name__)

PEER_SALT = 1  # the serving side fills its pool differently from the measuring side (salt 0)
_WILDCARDS = ("", "0.0.0.0", "::")


class _Session:
    """State of one measuring side's session: the current pool, connector and NIXL agent."""

    def __init__(self, sock: socket.socket, raw: RawTcpServer, bind_host: str):
        self.sock = sock
        self.raw = raw
        self.bind_host = bind_host
        # what the other side can reach us at: the address it connected to
        self.advertise = sock.getsockname()[0] if bind_host in _WILDCARDS else bind_host
        self.pool: Pool | None = None
        self.connector: Connector | None = None
        self.nixl: Any = None

    def release(self) -> None:
        if self.connector is not None:
            self.connector.close()
            self.connector = None
        if self.nixl is not None:
            try:
                self.nixl.close()
            except Exception:  # a NIXL teardown failure must not end the session
                log.exception("closing the NIXL target")
            self.nixl = None

    def close(self) -> None:
        self.release()
        self.pool = None

    def _pool_for(self, setup: wire.Setup) -> Pool:
        p = self.pool
        if p is not None and p.workload == setup.workload and p.memory is setup.memory and p.device == setup.device:
            return p
        self.pool = None  # free the old pool before allocating the next one
        check_fits([FitRequest(setup.memory, setup.device, setup.workload.pool_bytes, "the serving side's KV pool")])
        self.pool = allocate_pool(setup.workload, setup.memory, setup.device, PEER_SALT)
        return self.pool

    def handle(self, msg: wire.Message) -> wire.Message:
        if isinstance(msg, wire.Setup):
            self.release()
            pool = self._pool_for(msg)
            tcp = from_env(TcpConfig, "KVXFER_TCP_", streams=msg.tcp_streams, advertise=self.advertise)
            self.connector = Connector("kvxfer-bench-peer", backend=msg.backend.value, listen=f"{self.bind_host or '0.0.0.0'}:0", tcp=tcp)
            self.connector.register(list(pool.tensors), block_dim=pool.workload.block_dim)
            return wire.Ready(self.connector.metadata())
        if isinstance(msg, wire.Poison | wire.Digest):
            if self.pool is None:
                raise ConfigError("no pool: send Setup first")
            blocks = np.asarray(msg.blocks, dtype=np.int64)
            if blocks.size and (blocks.min() < 0 or blocks.max() >= self.pool.workload.num_blocks):
                raise ConfigError("block ids out of range of the pool")
            if isinstance(msg, wire.Poison):
                self.pool.poison(blocks)
                return wire.Ok()
            return wire.DigestReply(self.pool.digest(blocks))
        if isinstance(msg, wire.NixlSetup):
            from .nixl_baseline import NixlTarget

            if self.pool is None:
                raise ConfigError("no pool: send Setup first")
            self.nixl = NixlTarget(self.pool)
            return wire.NixlReady(self.nixl.metadata, self.nixl.addrs)
        if isinstance(msg, wire.Release):
            self.release()
            return wire.Ok()
        raise ProtocolError(f"unexpected {type(msg).__name__} from the measuring side")

    def run(self) -> None:
        hello = wire.recv_msg(self.sock)
        if not isinstance(hello, wire.Hello):
            raise ProtocolError(f"expected Hello, got {type(hello).__name__}")
        env = collect_environment(argv=sys.argv)
        wire.send_msg(self.sock, wire.PeerInfo(env.hostname, __version__, list(env.gpus), self.raw.port, env.to_json()))
        while True:
            msg = wire.recv_msg(self.sock)
            if isinstance(msg, wire.Bye):
                return
            try:
                reply = self.handle(msg)
            except (KvxferError, ImportError, MemoryError, RuntimeError) as exc:
                usage = isinstance(exc, (ConfigError, BackendUnavailableError, ImportError, MemoryError))
                reply = wire.Failure(type(exc).__name__, str(exc), usage)
            wire.send_msg(self.sock, reply)


def serve(listen: str, *, once: bool = False, announce: Connection | None = None, accept_timeout: float | None = None,
          registry: str | None = None, name: str = "kvxfer-bench") -> None:
    """Serve measuring sides on ``listen`` ("host:port"; port 0 picks one) until interrupted.

    With ``once``, return after the first session; ``announce`` receives the bound port;
    ``registry`` (a URL) lists this server there as ``name`` while it serves.

    Raises:
        ConfigError: ``listen`` is not host:port or cannot be bound.
    """
    try:
        host, port = parse_host_port(listen)
    except ValueError as exc:
        raise ConfigError(f"--listen {listen!r}: {exc}") from None
    try:
        server = socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from None
    server.settimeout(accept_timeout)
    raw = RawTcpServer(host, from_env(TcpConfig, "KVXFER_TCP_").socket_buffer)
    bound = server.getsockname()[1]
    if announce is not None:
        announce.send(bound)
        announce.close()
    else:
        print(f"kvxfer-bench: serving on {host}:{bound} (raw-socket baseline on port {raw.port}); Ctrl-C stops", flush=True)
    entry = None
    try:
        if registry is not None:
            from .rendezvous import announce as announce_in_registry

            advertised = host if host not in _WILDCARDS else (from_env(TcpConfig, "KVXFER_TCP_").advertise or socket.getfqdn())
            entry = announce_in_registry(registry, name, advertised, bound)
            print(f"kvxfer-bench: listed as {name!r} in {registry} ({advertised}:{bound})", flush=True)
        while True:
            try:
                sock, addr = server.accept()
            except TimeoutError:
                return  # nobody came: the parent that started us is gone
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = _Session(sock, raw, host)
            try:
                session.run()
            except (PeerLostError, ProtocolError) as exc:
                log.warning("session with %s ended: %s", addr, exc)
            finally:
                session.close()
                sock.close()
            if once:
                return
    finally:
        if entry is not None:
            entry.close()
        raw.close()
        server.close()


def child_main(announce: Connection, host: str) -> None:
    """Entry point of the serving child of a one-host run (started with multiprocessing spawn)."""
    logging.basicConfig(level=logging.WARNING, format="kvxfer-bench peer: %(message)s")
    serve(f"{host}:0", once=True, announce=announce, accept_timeout=120.0)
