"""Uniform read-only view of torch, cupy and numpy arrays: address, shape, byte strides, device.

Layer: below layout. Detects the array library through ``sys.modules`` so that importing kvxfer
never imports torch or cupy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import LayoutError

__all__ = ["MemoryKind", "TensorInfo", "tensor_info"]


class MemoryKind(Enum):
    """Where a tensor's bytes live."""

    HOST = "host"
    CUDA = "cuda"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What kvxfer needs to know about one array, independent of its library."""

    addr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    itemsize: int
    dtype: str
    kind: MemoryKind
    device: int  # CUDA ordinal, -1 for host
    library: str


def _torch_info(t: Any) -> TensorInfo:
    itemsize = t.element_size()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.device.type == "cuda":
        kind, dev = MemoryKind.CUDA, int(t.device.index if t.device.index is not None else 0)
    elif t.device.type == "cpu":
        kind, dev = MemoryKind.HOST, -1
    else:
        raise LayoutError(f"torch tensor on device {t.device} is not supported; expected cpu or cuda")
    return TensorInfo(
        addr=int(t.data_ptr()),
        shape=tuple(int(s) for s in t.shape),
        strides=tuple(int(s) * itemsize for s in t.stride()),
        itemsize=itemsize,
        dtype=dtype,
        kind=kind,
        device=dev,
        library="torch",
    )


def _cupy_info(t: Any) -> TensorInfo:
    return TensorInfo(
        addr=int(t.data.ptr),
        shape=tuple(int(s) for s in t.shape),
        strides=tuple(int(s) for s in t.strides),
        itemsize=int(t.itemsize),
        dtype=t.dtype.name,
        kind=MemoryKind.CUDA,
        device=int(t.device.id),
        library="cupy",
    )


def _numpy_info(t: Any) -> TensorInfo:
    iface = t.__array_interface__
    return TensorInfo(
        addr=int(iface["data"][0]),
        shape=tuple(int(s) for s in t.shape),
        strides=tuple(int(s) for s in t.strides),
        itemsize=int(t.itemsize),
        dtype=t.dtype.name,
        kind=MemoryKind.HOST,
        device=-1,
        library="numpy",
    )


def tensor_info(t: Any) -> TensorInfo:
    """Describe ``t`` (a torch tensor, cupy array or numpy array).

    Raises:
        LayoutError: ``t`` is none of the supported array types.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(t, torch.Tensor):
        return _torch_info(t)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(t, cupy.ndarray):
        return _cupy_info(t)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(t, numpy.ndarray):
        return _numpy_info(t)
    raise LayoutError(
        f"cannot describe an object of type {type(t).__module__}.{type(t).__name__}; "
        "expected a torch.Tensor, cupy.ndarray or numpy.ndarray"
    )
