"""Byte views over raw host addresses. Layer: below backends and ops."""

from __future__ import annotations

import ctypes

import numpy as np

__all__ = ["host_bytes"]


def host_bytes(addr: int, nbytes: int) -> np.ndarray:
    """A writable uint8 numpy view of ``nbytes`` of host memory at ``addr`` (no copy).

    The caller keeps the owner of that memory alive for as long as the view is used.
    """
    if nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    buf = (ctypes.c_uint8 * nbytes).from_address(addr)
    return np.frombuffer(buf, dtype=np.uint8)
