"""Scatter/gather socket I/O over iovec arrays, with the GIL released.

Layer: backends, tcp package. A chunk of a plan's stream is a list of (address, length) runs kept in a
numpy ``(n, 2)`` uint64 array laid out as ``struct iovec``; ``readv``/``writev`` through ctypes
move it in as few system calls as the kernel allows, without creating a Python object per run.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

from ...errors import PeerLostError

__all__ = ["readv_full", "writev_full", "IOV_MAX"]

IOV_MAX = 1024
_libc = ctypes.CDLL(None, use_errno=True)
_readv = _libc.readv
_writev = _libc.writev
for _f in (_readv, _writev):
    _f.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    _f.restype = ctypes.c_ssize_t


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


_recvmsg = _libc.recvmsg
_recvmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int)
_recvmsg.restype = ctypes.c_ssize_t
_MSG_WAITALL = 0x100


def _recv_waitall(fd: int, ptr: int, count: int) -> int:
    # MSG_WAITALL: one call fills the whole iovec unless a signal, EOF or error intervenes
    hdr = _MsgHdr(None, 0, ptr, count, None, 0, 0)
    return _recvmsg(fd, ctypes.byref(hdr), _MSG_WAITALL)


def _advance(iov: np.ndarray, idx: int, n: int) -> int:
    """Consume ``n`` bytes from ``iov[idx:]`` in place; return the new first index."""
    lens = iov[idx:, 1]
    cs = np.cumsum(lens)
    k = int(np.searchsorted(cs, n, side="right"))
    idx += k
    if idx < iov.shape[0]:
        done = n - (int(cs[k - 1]) if k else 0)
        iov[idx, 0] += np.uint64(done)
        iov[idx, 1] -= np.uint64(done)
    return idx


def _loop(fn, fd: int, iov: np.ndarray, what: str) -> None:
    iov = np.ascontiguousarray(iov, dtype=np.uint64)
    n = iov.shape[0]
    idx = 0
    base = iov.ctypes.data
    while idx < n:
        if iov[idx, 1] == 0:
            idx += 1
            continue
        r = fn(fd, base + idx * 16, min(n - idx, IOV_MAX))
        if r < 0:
            e = ctypes.get_errno()
            if e == errno.EINTR:
                continue
            raise OSError(e, f"{what}: {os.strerror(e)}")
        if r == 0:
            raise PeerLostError("connection closed by peer")
        idx = _advance(iov, idx, r)


def readv_full(fd: int, iov: np.ndarray) -> None:
    """Fill every run of ``iov`` from blocking socket ``fd``. Raises PeerLostError on EOF."""
    _loop(_recv_waitall, fd, iov, "recvmsg")


def writev_full(fd: int, iov: np.ndarray) -> None:
    """Send every run of ``iov`` on blocking socket ``fd``."""
    _loop(_writev, fd, iov, "writev")
