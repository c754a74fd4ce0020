"""CUDA IPC memory handles: export a layout's allocations, open a peer's, close them again.

Layer: backends, cuda_ipc package. Talks to the CUDA runtime
through CuPy and to ``libcuda`` through ctypes (``cuMemGetAddressRange``, which CuPy does not
wrap). CuPy is imported inside functions only, so importing this module touches no GPU.

Why base + offset: tensors from PyTorch's caching allocator (and CuPy's pool) sit inside a
larger ``cudaMalloc`` allocation. ``cudaIpcGetMemHandle`` names the whole allocation and
``cudaIpcOpenMemHandle`` maps it at its first byte, so each tensor travels as (allocation,
offset) and the importer adds the offset to the mapped base.

Opened handles are shared process-wide with a reference count: CUDA maps a given allocation
only once per process, so two links (or two connectors) that reach the same peer must share one
mapping and the last one to let go closes it. Handles exported by this very process are
recognised and resolve to the original address (``cudaIpcOpenMemHandle`` refuses them).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

from ...errors import BackendUnavailableError, TransportError

__all__ = [
    "ExportedMemory",
    "export_tensors",
    "address_range",
    "bus_id",
    "device_of_bus_id",
    "peer_access_possible",
    "ensure_peer_access",
    "open_handle",
    "release_handle",
    "open_handle_count",
    "cuda_error_text",
]

IPC_HANDLE_BYTES = 64
_CUDA_MEMORY_TYPE_DEVICE = 2  # cudaMemoryTypeDevice
_PEER_ACCESS_ALREADY_ENABLED = 704  # cudaErrorPeerAccessAlreadyEnabled

EXPANDABLE_SEGMENTS_FIX = (
    "Memory mapped through CUDA's virtual memory API (cuMemCreate/cuMemMap) cannot be shared "
    "with cudaIpcGetMemHandle. PyTorch allocates that way when PYTORCH_CUDA_ALLOC_CONF contains "
    "'expandable_segments:True': start the process with PYTORCH_CUDA_ALLOC_CONF unset or without "
    "expandable_segments (or allocate the KV cache with plain cudaMalloc, e.g. through CuPy's "
    "default pool) to use the cuda_ipc backend; the 'tcp' backend works with any memory."
)


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"the cuda_ipc backend needs CuPy (pip install kvxfer[cuda13] or kvxfer[cuda12]): {exc}") from None
    return cupy


def cuda_error_text(exc: BaseException) -> str:
    """A short description of a CuPy CUDA error (or any exception)."""
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# libcuda through ctypes
# --------------------------------------------------------------------------------------------
_libcuda: Any = None
_libcuda_lock = threading.Lock()


def _driver() -> Any:
    global _libcuda
    with _libcuda_lock:
        if _libcuda is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as exc:
                raise BackendUnavailableError(f"cannot load the CUDA driver library libcuda.so.1: {exc}") from None
            f = lib.cuMemGetAddressRange_v2
            f.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
            f.restype = ctypes.c_int
            g = lib.cuGetErrorName
            g.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
            g.restype = ctypes.c_int
            _libcuda = lib
        return _libcuda


def _driver_error_name(code: int) -> str:
    name = ctypes.c_char_p()
    if _driver().cuGetErrorName(code, ctypes.byref(name)) == 0 and name.value:
        return name.value.decode()
    return f"CUresult {code}"


def address_range(addr: int, device: int) -> tuple[int, int]:
    """(base, size) of the allocation that holds device address ``addr``.

    Raises:
        TransportError: the driver does not know the address (not device memory of this process).
    """
    cupy = _cupy()
    lib = _driver()
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.free(0)  # makes the device's primary context current in this thread
        base = ctypes.c_uint64()
        size = ctypes.c_size_t()
        rc = lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(addr))
    if rc != 0:
        raise TransportError(f"cuMemGetAddressRange(0x{addr:x}) failed on cuda:{device}: {_driver_error_name(rc)}")
    return int(base.value), int(size.value)


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------
def bus_id(device: int) -> str:
    """The PCI bus id of CUDA device ``device`` (stable across processes, unlike ordinals)."""
    return str(_cupy().cuda.runtime.deviceGetPCIBusId(device))


def device_of_bus_id(pci: str) -> int | None:
    """This process's ordinal of the GPU at PCI bus id ``pci``, or None when it is not visible."""
    cupy = _cupy()
    try:
        return int(cupy.cuda.runtime.deviceGetByPCIBusId(pci))
    except cupy.cuda.runtime.CUDARuntimeError:
        return None


def peer_access_possible(device: int, peer_device: int) -> bool:
    """Whether kernels on ``device`` can access memory of ``peer_device`` (True for the same GPU)."""
    if device == peer_device:
        return True
    return bool(_cupy().cuda.runtime.deviceCanAccessPeer(device, peer_device))


def ensure_peer_access(device: int, peer_device: int) -> None:
    """Enable ``device``'s access to ``peer_device`` memory within this process (idempotent).

    Raises:
        BackendUnavailableError: the two GPUs cannot access each other.
    """
    if device == peer_device:
        return
    cupy = _cupy()
    rt = cupy.cuda.runtime
    with cupy.cuda.Device(device):
        ensure = getattr(rt, "_deviceEnsurePeerAccess", None)  # also clears "already enabled"
        try:
            if ensure is not None:
                ensure(peer_device)
            else:
                rt.deviceEnablePeerAccess(peer_device)
        except rt.CUDARuntimeError as exc:
            if getattr(exc, "status", None) == _PEER_ACCESS_ALREADY_ENABLED:
                return
            raise BackendUnavailableError(f"cannot enable peer access cuda:{device} -> cuda:{peer_device}: {cuda_error_text(exc)}") from None


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExportedMemory:
    """The IPC description of a layout's tensors: allocations and where each tensor sits."""

    handles: tuple[bytes, ...]  # one cudaIpcMemHandle (64 B) per allocation
    sizes: tuple[int, ...]  # bytes of each allocation
    tensors: tuple[tuple[int, int], ...]  # per tensor: (allocation index, byte offset of its first byte)

    def to_wire(self) -> dict[str, Any]:
        return {"h": list(self.handles), "z": list(self.sizes), "t": [list(t) for t in self.tensors]}


# handle bytes -> base address, for allocations exported by this process
_local_exports: dict[bytes, int] = {}
_local_lock = threading.Lock()


def export_tensors(addrs: list[int], spans: list[int], device: int) -> ExportedMemory:
    """Export the allocations holding ``addrs[t] .. addrs[t] + spans[t]`` on ``device``.

    Raises:
        BackendUnavailableError: a tensor is not plain device memory (managed, host, or VMM /
            PyTorch expandable segments), with the cause and the fix in the message.
    """
    cupy = _cupy()
    rt = cupy.cuda.runtime
    handles: list[bytes] = []
    sizes: list[int] = []
    by_base: dict[int, int] = {}
    tensors: list[tuple[int, int]] = []
    with cupy.cuda.Device(device):
        for t, (addr, span) in enumerate(zip(addrs, spans)):
            try:
                attrs = rt.pointerGetAttributes(addr)
            except rt.CUDARuntimeError as exc:
                raise BackendUnavailableError(f"tensor {t} at 0x{addr:x} is not CUDA memory known to this process: {cuda_error_text(exc)}") from None
            if int(attrs.type) != _CUDA_MEMORY_TYPE_DEVICE:
                raise BackendUnavailableError(
                    f"tensor {t} at 0x{addr:x} is not plain device memory (cudaMemoryType {int(attrs.type)}: "
                    "managed or host memory); CUDA IPC can only share cudaMalloc'ed device memory"
                )
            try:
                base, size = address_range(addr, device)
            except TransportError as exc:
                raise BackendUnavailableError(f"tensor {t}: {exc}. {EXPANDABLE_SEGMENTS_FIX}") from None
            if addr + span > base + size:
                raise BackendUnavailableError(
                    f"tensor {t} spans 0x{addr:x}+{span} B but its allocation ends at 0x{base + size:x}: it crosses "
                    f"allocations, which happens with VMM memory. {EXPANDABLE_SEGMENTS_FIX}"
                )
            idx = by_base.get(base)
            if idx is None:
                try:
                    h = bytes(rt.ipcGetMemHandle(base))
                except rt.CUDARuntimeError as exc:
                    raise BackendUnavailableError(
                        f"cudaIpcGetMemHandle failed for tensor {t} (allocation 0x{base:x}, {size} B) on cuda:{device}: "
                        f"{cuda_error_text(exc)}. {EXPANDABLE_SEGMENTS_FIX}"
                    ) from None
                if len(h) != IPC_HANDLE_BYTES:
                    raise BackendUnavailableError(f"cudaIpcGetMemHandle returned {len(h)} bytes; expected {IPC_HANDLE_BYTES}")
                idx = by_base[base] = len(handles)
                handles.append(h)
                sizes.append(size)
                with _local_lock:
                    _local_exports[h] = base
            tensors.append((idx, addr - base))
    return ExportedMemory(tuple(handles), tuple(sizes), tuple(tensors))


# --------------------------------------------------------------------------------------------
# import (process-wide, reference counted)
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Mapping:
    ptr: int
    size: int
    device: int
    refs: int
    owned: bool  # opened with cudaIpcOpenMemHandle (False: exported by this process)


_mappings: dict[bytes, _Mapping] = {}
_map_lock = threading.Lock()


def open_handle(handle: bytes, device: int) -> tuple[int, int]:
    """Map a peer's allocation on ``device``; returns (address, mapped size). Reference counted.

    Raises:
        TransportError: the handle cannot be opened (peer gone, no peer access, bad handle).
    """
    cupy = _cupy()
    rt = cupy.cuda.runtime
    with _map_lock:
        m = _mappings.get(handle)
        if m is not None:
            m.refs += 1
            return m.ptr, m.size
        with _local_lock:
            local = _local_exports.get(handle)
        if local is not None:  # our own export (two connectors in one process)
            _, size = address_range(local, device)
            _mappings[handle] = _Mapping(local, size, device, 1, owned=False)
            return local, size
        with cupy.cuda.Device(device):
            try:
                ptr = int(rt.ipcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess))
            except rt.CUDARuntimeError as exc:
                raise TransportError(f"cudaIpcOpenMemHandle failed on cuda:{device}: {cuda_error_text(exc)}") from None
        try:
            base, size = address_range(ptr, device)
        except TransportError:
            _close(ptr, device)
            raise
        _mappings[handle] = _Mapping(ptr, size - (ptr - base), device, 1, owned=True)
        return ptr, size - (ptr - base)


def _close(ptr: int, device: int) -> None:
    cupy = _cupy()
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.ipcCloseMemHandle(ptr)


def release_handle(handle: bytes) -> None:
    """Drop one reference to a mapping opened by :func:`open_handle`; the last one unmaps it.

    Never raises: a failing close is logged by the caller's logger via the returned nothing; an
    unmapping error here only means the driver already dropped the mapping.
    """
    with _map_lock:
        m = _mappings.get(handle)
        if m is None:
            return
        m.refs -= 1
        if m.refs > 0:
            return
        del _mappings[handle]
        if m.owned:
            try:
                _close(m.ptr, m.device)
            except Exception:  # the peer's context may be gone already; nothing left to free
                pass


def open_handle_count() -> int:
    """How many peer allocations this process has mapped (for tests and diagnostics)."""
    with _map_lock:
        return sum(1 for m in _mappings.values() if m.owned)
