"""Baselines measured in the same run as kvxfer: raw sockets and contiguous GPU copies.

Layer: tools. The raw-socket baseline moves the same number of bytes over the same number of
TCP connections as the kvxfer TCP backend, each connection one big ``sendall`` into one
``recv_into`` of a contiguous buffer: the most a Python process gets from these sockets. The
GPU baseline is one contiguous ``cudaMemcpyAsync`` of the same bytes (on one device, or peer to
peer), timed with CUDA events. NIXL lives in :mod:`kvxfer.tools.nixl_baseline`.
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
import time
from enum import IntEnum

import numpy as np

from ..errors import PeerLostError, TransportError
from ..handle import Op
from .arrays import ArrayLib, _module, gpu_lib
from .results import BaselineKind, BaselineResult, Timing

__all__ = ["RawTcpServer", "RawTcpClient", "gpu_copy_baseline"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!BQQ")  # command, offset, nbytes
_ACK = b"\x01"


class _Cmd(IntEnum):
    SERVER_SENDS = 1  # a read: the server's bytes come to the client
    SERVER_RECEIVES = 2  # a write: the client's bytes go to the server, acknowledged at the end


def _tune(sock: socket.socket, socket_buffer: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if socket_buffer > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise PeerLostError("raw baseline connection closed by the peer")
        view = view[n:]


class RawTcpServer:
    """Serving half of the raw-socket baseline: one thread per connection, a shared buffer.

    The buffer grows to the largest range asked for and is reused, like a KV pool is.
    """

    def __init__(self, host: str, socket_buffer: int):
        self._socket_buffer = socket_buffer
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._buf = np.zeros(0, dtype=np.uint8)
        self._lock = threading.Lock()
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, name="kvxfer-bench-raw-accept", daemon=True).start()

    def _view(self, end: int) -> memoryview:
        with self._lock:
            if self._buf.nbytes < end:
                self._buf = np.ones(end, dtype=np.uint8)  # touched pages: no first-use faults while timed
            return memoryview(self._buf)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            _tune(conn, self._socket_buffer)
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="kvxfer-bench-raw", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        header = memoryview(bytearray(_HEADER.size))
        try:
            while True:
                _recv_exact_into(conn, header)
                cmd, off, n = _HEADER.unpack(header)
                view = self._view(off + n)[off : off + n]
                if cmd == _Cmd.SERVER_SENDS:
                    conn.sendall(view)
                elif cmd == _Cmd.SERVER_RECEIVES:
                    _recv_exact_into(conn, view)
                    conn.sendall(_ACK)
                else:
                    log.warning("raw baseline: unknown command %r; dropping the connection", cmd)
                    return
        except (OSError, PeerLostError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        """Stop accepting and close every connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._listener.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


class RawTcpClient:
    """Measuring half of the raw-socket baseline: ``streams`` connections, one worker thread each."""

    def __init__(self, host: str, port: int, streams: int, socket_buffer: int, timeout: float = 60.0):
        self._socks: list[socket.socket] = []
        try:
            for _ in range(streams):
                s = socket.create_connection((host, port), timeout=timeout)
                _tune(s, socket_buffer)
                self._socks.append(s)
        except OSError as exc:
            self.close()
            raise TransportError(f"raw-socket baseline cannot reach {host}:{port}: {exc}") from None
        self._buf = np.zeros(0, dtype=np.uint8)
        self._done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._jobs: list[queue.SimpleQueue[tuple[_Cmd, int, int] | None]] = []
        for s in self._socks:
            q: queue.SimpleQueue[tuple[_Cmd, int, int] | None] = queue.SimpleQueue()
            self._jobs.append(q)
            threading.Thread(target=self._work, args=(s, q), name="kvxfer-bench-raw-client", daemon=True).start()

    def _work(self, sock: socket.socket, jobs: queue.SimpleQueue[tuple[_Cmd, int, int] | None]) -> None:
        ack = memoryview(bytearray(1))
        while (job := jobs.get()) is not None:
            cmd, off, n = job
            try:
                sock.sendall(_HEADER.pack(cmd, off, n))
                view = memoryview(self._buf)[off : off + n]
                if cmd == _Cmd.SERVER_SENDS:
                    _recv_exact_into(sock, view)
                else:
                    sock.sendall(view)
                    _recv_exact_into(sock, ack)
                self._done.put(None)
            except (OSError, PeerLostError) as exc:
                self._done.put(exc)

    def measure(self, op: Op, nbytes: int, iters: int, warmup: int) -> Timing:
        """Move ``nbytes`` split over the connections, ``warmup + iters`` times; time each.

        Raises:
            TransportError: a connection failed.
        """
        if self._buf.nbytes < nbytes:
            self._buf = np.ones(nbytes, dtype=np.uint8)
        cmd = _Cmd.SERVER_SENDS if op is Op.READ else _Cmd.SERVER_RECEIVES
        k = len(self._socks)
        bounds = [nbytes * i // k for i in range(k + 1)]
        samples = []
        for it in range(warmup + iters):
            t0 = time.perf_counter()
            for q, lo, hi in zip(self._jobs, bounds, bounds[1:]):
                q.put((cmd, lo, hi - lo))
            errors = [e for e in (self._done.get() for _ in range(k)) if e is not None]
            dt = time.perf_counter() - t0
            if errors:
                raise TransportError(f"raw-socket baseline failed: {errors[0]}")
            if it >= warmup:
                samples.append(dt)
        return Timing.of(nbytes, samples)

    def close(self) -> None:
        """Stop the workers and close the connections; idempotent."""
        for q in getattr(self, "_jobs", []):
            q.put(None)
        self._jobs = []
        for s in self._socks:
            s.close()
        self._socks = []


def _time_torch_copy(nbytes: int, src_dev: int, dst_dev: int, iters: int, warmup: int) -> list[float]:
    torch = _module(ArrayLib.TORCH)
    src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_dev}")
    src.random_(0, 255)  # never time on zeros
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_dev}")
    out = []
    with torch.cuda.device(dst_dev):
        stream = torch.cuda.current_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for it in range(warmup + iters):
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            if it >= warmup:
                out.append(start.elapsed_time(end) / 1e3)
    if not torch.equal(dst[:4096].cpu(), src[:4096].cpu()):
        raise TransportError("the GPU copy baseline produced wrong bytes")
    return out


def _time_cupy_copy(nbytes: int, src_dev: int, dst_dev: int, iters: int, warmup: int) -> list[float]:
    cp = _module(ArrayLib.CUPY)
    with cp.cuda.Device(src_dev):
        src = cp.random.randint(0, 255, size=nbytes, dtype=cp.uint8)
    with cp.cuda.Device(dst_dev):
        dst = cp.empty(nbytes, dtype=cp.uint8)
        if src_dev != dst_dev:
            try:
                cp.cuda.runtime.deviceEnablePeerAccess(src_dev)
            except Exception:  # already enabled, or not possible: memcpyPeer still works
                pass
        stream = cp.cuda.Stream(non_blocking=True)
        start, end = cp.cuda.Event(), cp.cuda.Event()
        out = []
        for it in range(warmup + iters):
            start.record(stream)
            cp.cuda.runtime.memcpyPeerAsync(dst.data.ptr, dst_dev, src.data.ptr, src_dev, nbytes, stream.ptr)
            end.record(stream)
            end.synchronize()
            if it >= warmup:
                out.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
        if not bool((dst[:4096] == cp.asarray(src[:4096])).all()):
            raise TransportError("the GPU copy baseline produced wrong bytes")
    return out


def gpu_copy_baseline(nbytes: int, src_dev: int, dst_dev: int, iters: int, warmup: int) -> BaselineResult:
    """One contiguous copy of ``nbytes`` from ``src_dev`` to ``dst_dev``, timed with CUDA events.

    A failure is returned as a result with the reason, not raised: a missing baseline must not
    stop the kvxfer measurement.
    """
    kind = BaselineKind.DEVICE_MEMCPY if src_dev == dst_dev else BaselineKind.PEER_MEMCPY
    lib = gpu_lib()
    try:
        if lib is ArrayLib.TORCH:
            samples = _time_torch_copy(nbytes, src_dev, dst_dev, iters, warmup)
        elif lib is ArrayLib.CUPY:
            samples = _time_cupy_copy(nbytes, src_dev, dst_dev, iters, warmup)
        else:
            return BaselineResult(kind, None, "needs torch or cupy")
    except Exception as exc:  # any CUDA failure becomes the recorded reason
        return BaselineResult(kind, None, f"failed: {type(exc).__name__}: {exc}")
    how = f"contiguous {lib.value} copy cuda:{src_dev} -> cuda:{dst_dev}, CUDA events"
    return BaselineResult(kind, Timing.of(nbytes, samples), how)
