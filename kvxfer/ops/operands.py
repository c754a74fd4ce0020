"""What the CUDA copies accept: device addresses, tensors and arrays, devices, streams.

Layer: ops, the bottom (beside :mod:`kvxfer.ops.runtime`). Tensors and buffers may be raw
device addresses (ints), torch tensors, cupy arrays or anything with
``__cuda_array_interface__``; a stream is an int handle, a torch or a cupy stream. torch and
cupy are looked up in ``sys.modules``, never imported for a check: an argument can only be a
torch tensor if torch is already loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import LayoutError
from .loader import cupy

__all__ = ["is_torch", "is_cupy", "addr_of", "nbytes_of", "flatten_bases", "device_of", "stream_ptr", "check_buffer"]


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (False when torch is not loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_cupy(x: Any) -> bool:
    """Whether ``x`` is a cupy array (False when cupy is not loaded)."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def addr_of(x: Any, what: str) -> int:
    """The device address of ``x`` (an int, a torch CUDA tensor, a cupy array, a CUDA array).

    Raises:
        LayoutError: ``x`` is none of those, or a torch tensor off the GPU; ``what`` names it.
    """
    if isinstance(x, (int, np.integer)):
        return int(x)
    if is_torch(x):
        if x.device.type != "cuda":
            raise LayoutError(f"{what} is a torch tensor on {x.device}; CUDA ops need GPU memory")
        return int(x.data_ptr())
    if is_cupy(x):
        return int(x.data.ptr)
    iface = getattr(x, "__cuda_array_interface__", None)
    if iface is not None:
        return int(iface["data"][0])
    raise LayoutError(f"{what} must be a device address (int), a torch CUDA tensor or a cupy array; got {type(x).__name__}")


def nbytes_of(x: Any) -> int | None:
    """The size in bytes of a torch tensor or cupy array; None for anything else (an address)."""
    if is_torch(x):
        return int(x.numel() * x.element_size())
    if is_cupy(x):
        return int(x.nbytes)
    return None


def flatten_bases(bases: Any, what: str) -> tuple[Sequence[int], list[Any]]:
    """Base addresses from a KVLayout, one array/int, or a sequence of them; plus the objects
    seen. An array of addresses (a layout's, a peer's mapped tensors) comes back as a uint64
    array, without a Python int per entry.

    Raises:
        LayoutError: an entry is not an address, tensor or array (see :func:`addr_of`).
    """
    if isinstance(bases, np.ndarray):
        return bases.astype(np.uint64, copy=False).ravel(), []
    addrs = getattr(bases, "addrs", None)
    if addrs is not None and hasattr(bases, "owners"):  # a KVLayout
        return np.asarray(addrs, dtype=np.uint64).ravel(), list(bases.owners)
    if isinstance(bases, (int, np.integer)) or is_torch(bases) or is_cupy(bases):
        return [addr_of(bases, what)], [bases]
    items = list(bases)
    return [addr_of(b, f"{what}[{i}]") for i, b in enumerate(items)], items


def device_of(objs: Sequence[Any], bases_sources: Sequence[Any], device: int | None) -> int:
    """The CUDA device of a copy: ``device`` if given, else a KVLayout's among
    ``bases_sources``, else the first tensor's or array's among ``objs``, else CuPy's current."""
    if device is not None:
        return int(device)
    for src in bases_sources:
        dev = getattr(src, "device", None)
        if isinstance(dev, int) and hasattr(src, "owners") and dev >= 0:
            return dev
    for x in objs:
        if is_torch(x):
            return int(x.device.index if x.device.index is not None else 0)
        if is_cupy(x):
            return int(x.device.id)
    return int(cupy().cuda.runtime.getDevice())


def stream_ptr(stream: Any, objs: Sequence[Any], device: int) -> int:
    """The raw handle of the stream a copy goes to: ``stream`` (int handle, torch or cupy
    stream) if given, else torch's current stream on ``device`` when any of ``objs`` is a torch
    tensor, else cupy's current stream.

    Raises:
        LayoutError: ``stream`` is of another type.
    """
    if stream is not None:
        if isinstance(stream, (int, np.integer)):
            return int(stream)
        for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy Stream
            if hasattr(stream, attr):
                return int(getattr(stream, attr))
        raise LayoutError(f"stream must be an int handle, a torch or a cupy stream; got {type(stream).__name__}")
    if any(is_torch(x) for x in objs):
        torch = sys.modules["torch"]
        return int(torch.cuda.current_stream(device).cuda_stream)
    return int(cupy().cuda.get_current_stream().ptr)


def check_buffer(buf: Any, nbytes: int, what: str) -> None:
    """Refuse a torch tensor or cupy array ``buf`` smaller than ``nbytes`` (an address is not checked).

    Raises:
        LayoutError: ``buf`` holds fewer bytes; ``what`` names it.
    """
    n = nbytes_of(buf)
    if n is not None and n < nbytes:
        raise LayoutError(f"{what} holds {n} bytes; the plan moves {nbytes}")
