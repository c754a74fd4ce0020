"""Benchmark memory: allocate a workload's KV pool, fill it, poison blocks, digest blocks.

Layer: tools. Host memory is numpy; GPU memory is torch when installed, else cupy. Both sides
of a run use the same library, so their layouts (dtype included) have the same fingerprint.
Nothing is imported from torch or cupy until GPU memory is asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from .._tensors import MemoryKind
from ..errors import BackendUnavailableError
from .workloads import Workload

__all__ = ["ArrayLib", "Pool", "gpu_lib", "allocate_pool", "gpu_count", "gpu_names", "gpu_free_bytes", "synchronize"]

_POISON16 = 0xA5A5
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: i -> i * _MIX is a bijection, so every word differs


class ArrayLib(Enum):
    """Which array library holds a pool."""

    NUMPY = "numpy"
    TORCH = "torch"
    CUPY = "cupy"


def gpu_lib() -> ArrayLib | None:
    """The library used for GPU memory here (torch first, then cupy), or None without either."""
    for lib in (ArrayLib.TORCH, ArrayLib.CUPY):
        if importlib.util.find_spec(lib.value) is not None:
            return lib
    return None


def _module(lib: ArrayLib) -> Any:
    return importlib.import_module(lib.value)


def gpu_count() -> int:
    """Visible CUDA devices (0 without torch/cupy or without a driver)."""
    lib = gpu_lib()
    try:
        if lib is ArrayLib.TORCH:
            torch = _module(lib)
            return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
        if lib is ArrayLib.CUPY:
            return int(_module(lib).cuda.runtime.getDeviceCount())
    except Exception:  # no driver, no device: the answer is "none"
        return 0
    return 0


def gpu_names() -> list[str]:
    """Names of the visible GPUs (empty when there are none or no library to ask)."""
    n = gpu_count()
    lib = gpu_lib()
    out = []
    for d in range(n):
        if lib is ArrayLib.TORCH:
            out.append(str(_module(lib).cuda.get_device_name(d)))
        elif lib is ArrayLib.CUPY:
            name = _module(lib).cuda.runtime.getDeviceProperties(d)["name"]
            out.append(name.decode() if isinstance(name, bytes) else str(name))
    return out


def gpu_free_bytes(device: int) -> int:
    """Free memory on ``device`` in bytes."""
    lib = gpu_lib()
    if lib is ArrayLib.TORCH:
        return int(_module(lib).cuda.mem_get_info(device)[0])
    if lib is ArrayLib.CUPY:
        cp = _module(lib)
        with cp.cuda.Device(device):
            return int(cp.cuda.runtime.memGetInfo()[0])
    raise BackendUnavailableError("GPU memory needs torch or cupy; neither is installed")


def synchronize(memory: MemoryKind, device: int) -> None:
    """Wait for queued GPU work on ``device`` (no-op for host memory)."""
    if memory is MemoryKind.HOST:
        return
    lib = gpu_lib()
    if lib is ArrayLib.TORCH:
        _module(lib).cuda.synchronize(device)
    elif lib is ArrayLib.CUPY:
        cp = _module(lib)
        with cp.cuda.Device(device):
            cp.cuda.Device(device).synchronize()


@dataclass(frozen=True, slots=True)
class Pool:
    """One side's KV pool: a tensor per layer, in the workload's layout."""

    workload: Workload
    memory: MemoryKind
    device: int
    lib: ArrayLib
    tensors: tuple[Any, ...]

    @property
    def nbytes(self) -> int:
        return self.workload.pool_bytes

    def _index(self, blocks: np.ndarray) -> Any:
        if self.lib is ArrayLib.TORCH:
            torch = _module(self.lib)
            return torch.as_tensor(blocks, device=f"cuda:{self.device}")
        if self.lib is ArrayLib.CUPY:
            cp = _module(self.lib)
            with cp.cuda.Device(self.device):
                return cp.asarray(blocks)
        return blocks

    def _words16(self, t: Any) -> Any:
        """A 2-byte integer view of a layer tensor (torch bf16 -> int16)."""
        if self.lib is ArrayLib.TORCH:
            return t.view(_module(self.lib).int16)
        return t

    def poison(self, blocks: np.ndarray) -> None:
        """Overwrite ``blocks`` in every layer with a fixed non-zero pattern."""
        idx = self._index(blocks)
        bd = self.workload.block_dim
        for t in self.tensors:
            w = self._words16(t)
            if self.lib is ArrayLib.TORCH:
                w.index_fill_(bd, idx, _POISON16 - (1 << 16))  # int16 view: the same bits
            else:
                sel = (slice(None),) * bd + (idx,)
                w[sel] = _POISON16
        synchronize(self.memory, self.device)

    def digest(self, blocks: np.ndarray) -> str:
        """Hash of the bytes of ``blocks`` (all layers, in block order), for a correctness check."""
        idx = self._index(blocks)
        bd = self.workload.block_dim
        h = hashlib.blake2b(digest_size=16)
        for t in self.tensors:
            w = self._words16(t)
            if self.lib is ArrayLib.TORCH:
                part = w.index_select(bd, idx).cpu().numpy()
            elif self.lib is ArrayLib.CUPY:
                part = _module(self.lib).asnumpy(w.take(idx, axis=bd))
            else:
                part = np.take(w, idx, axis=bd)
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()


def _fill_numpy(t: np.ndarray, salt: int) -> None:
    flat = t.reshape(-1).view(np.uint8)
    n8 = flat.nbytes // 8
    words = flat[: n8 * 8].view(np.uint64)
    words[:] = np.arange(n8, dtype=np.uint64) * _MIX + np.uint64(salt)
    flat[n8 * 8 :] = 0x5A


def allocate_pool(workload: Workload, memory: MemoryKind, device: int, salt: int) -> Pool:
    """Allocate and fill one side's pool; ``salt`` makes the two sides' contents differ.

    Contents are a non-repeating pattern (never zeros), so misplaced or missing bytes change
    a block's digest.

    Raises:
        BackendUnavailableError: GPU memory asked for without torch or cupy.
    """
    shape = workload.layer_shape
    tensors: list[Any] = []
    if memory is MemoryKind.HOST:
        for layer in range(workload.layers):
            t = np.empty(shape, dtype=np.uint16)
            _fill_numpy(t, salt * 1_000_003 + layer)
            tensors.append(t)
        return Pool(workload, memory, -1, ArrayLib.NUMPY, tuple(tensors))
    lib = gpu_lib()
    if lib is ArrayLib.TORCH:
        torch = _module(lib)
        dev = torch.device(f"cuda:{device}")
        for layer in range(workload.layers):
            t = torch.empty(shape, dtype=torch.bfloat16, device=dev)
            flat = t.view(-1).view(torch.uint8)
            n8 = flat.numel() // 8
            w = flat[: n8 * 8].view(torch.int64)
            # int64 arithmetic wraps, which is all a pattern needs
            w.copy_(torch.arange(n8, dtype=torch.int64, device=dev) * int(_MIX.astype(np.int64)) + salt * 1_000_003 + layer)
            flat[n8 * 8 :] = 0x5A
            tensors.append(t)
        torch.cuda.synchronize(dev)
        return Pool(workload, memory, device, lib, tuple(tensors))
    if lib is ArrayLib.CUPY:
        cp = _module(lib)
        with cp.cuda.Device(device):
            for layer in range(workload.layers):
                t = cp.empty(shape, dtype=cp.uint16)
                flat = t.reshape(-1).view(cp.uint8)
                n8 = flat.size // 8
                w = flat[: n8 * 8].view(cp.uint64)
                w[:] = cp.arange(n8, dtype=cp.uint64) * cp.uint64(int(_MIX)) + cp.uint64(salt * 1_000_003 + layer)
                flat[n8 * 8 :] = 0x5A
                tensors.append(t)
            cp.cuda.Device(device).synchronize()
        return Pool(workload, memory, device, lib, tuple(tensors))
    raise BackendUnavailableError("--memory cuda needs torch or cupy to allocate GPU memory; neither is installed")
