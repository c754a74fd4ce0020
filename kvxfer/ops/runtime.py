"""The per-device CUDA runtime of the copy kernels: everything a process keeps between launches.

Layer: ops, the bottom (beside :mod:`kvxfer.ops.loader`, which builds the kernels). One
:class:`DeviceRuntime` per CUDA device (:func:`device_runtime`) owns that device's loaded kernels and
their launch facts (function pointers, CTAs per SM), whether it takes 32 KiB of kernel
parameters, the CuPy wrappers of the raw streams launches go to, and per stream the pinned
slots and the device buffer that record uploads are staged through (:class:`StreamUploads`).
Nothing is created at import and nothing touches CUDA before first use; importing this module
imports neither cupy nor torch.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import TransportError
from .loader import KernelSpec, cupy, load_kernel

log = logging.getLogger(__name__)

__all__ = [
    "H2D",
    "DeviceRuntime",
    "StreamUploads",
    "device_runtime",
    "reset",
    "large_params",
    "no_large_params",
    "alloc_on",
    "check_not_capturing",
    "caller_stream_ptr",
    "caller_ready_event",
]

H2D = 1  # cudaMemcpyHostToDevice
STAGING_SLOTS = 4  # pinned upload slots per stream; a fifth upload waits for the oldest


class _Slot:
    """Pinned host memory that uploads are staged in; busy until its event (recorded on the
    stream after the upload, reused) completes."""

    __slots__ = ("mem", "view", "event", "busy")

    def __init__(self, size: int):
        self.event: Any = None
        self.busy = False
        self.resize(size)

    def resize(self, size: int) -> None:
        self.mem = cupy().cuda.alloc_pinned_memory(size)
        self.view = np.frombuffer(self.mem, dtype=np.uint8, count=size)

    def free(self) -> bool:
        return not self.busy or self.event.done


def _slot_size(n: int) -> int:
    return 1 << max(20, (n - 1).bit_length())


class StreamUploads:
    """Per (device, stream): a device buffer reused in stream order, and the pinned staging
    slots that records are uploaded through. Hold :attr:`lock` around :meth:`device_buffer`
    and :meth:`upload` and the launch that reads what they uploaded."""

    __slots__ = ("mem", "retired", "slots", "lock")

    def __init__(self) -> None:
        self.mem: Any = None
        self.retired: list[tuple[Any, Any]] = []  # (old device buffer, event after its last use)
        self.slots: list[_Slot] = []
        self.lock = threading.Lock()

    def _staging(self, n: int) -> _Slot:
        for slot in self.slots:
            if slot.free():
                if slot.view.nbytes < n:
                    slot.resize(_slot_size(n))
                slot.busy = False
                return slot
        if len(self.slots) < STAGING_SLOTS:
            slot = _Slot(_slot_size(n))
            self.slots.append(slot)
            return slot
        oldest = self.slots[0]  # every slot is in flight: wait for the oldest copy, reuse its slot
        oldest.event.synchronize()
        self.slots.append(self.slots.pop(0))
        oldest.busy = False
        return self._staging(n)

    def upload(self, nbytes: int, fill: Callable[[np.ndarray], None], dst: int, sptr: int, cstream: Any,
               what: str, started: Callable[[], None] | None = None) -> None:
        """Stage ``nbytes`` in pinned memory, written there by ``fill(view)`` (no temporary of
        their own), and copy them to device address ``dst`` in stream order on raw stream
        ``sptr`` (``cstream`` its CuPy wrapper); the slot stays busy until the copy has run.
        ``started`` runs once the host has staged the bytes, just before the copy is queued.

        Raises:
            TransportError: the copy could not be queued.
        """
        slot = self._staging(nbytes)
        fill(slot.view[:nbytes])
        if started is not None:
            started()
        cp = cupy()
        try:
            cp.cuda.runtime.memcpyAsync(dst, slot.view.ctypes.data, nbytes, H2D, sptr)
        except Exception as exc:
            raise TransportError(f"{what} upload failed: {exc}") from exc
        if slot.event is None:
            slot.event = cp.cuda.Event(disable_timing=True)
        slot.event.record(cstream)
        slot.busy = True

    def device_buffer(self, n: int, stream: Any) -> Any:
        """A device buffer of at least ``n`` bytes for use in order on CuPy stream ``stream``;
        a buffer outgrown is kept until the work queued before the switch has run."""
        cp = cupy()
        self.retired = [(m, e) for m, e in self.retired if not e.done]
        if self.mem is None or self.mem.mem.size < n:
            if self.mem is not None:  # earlier launches on this stream may still read it
                ev = cp.cuda.Event(disable_timing=True)
                ev.record(stream)
                self.retired.append((self.mem, ev))
            self.mem = alloc_on(stream, 1 << max(16, (n - 1).bit_length()))
        return self.mem


class DeviceRuntime:
    """What this process keeps for CUDA device :attr:`device` between launches (see the module).

    Safe to use from several threads: the loaded-kernel memo and the per-stream tables are
    filled under a lock; a :class:`StreamUploads` is used under its own lock.
    """

    __slots__ = ("device", "_kernels", "_fn_ptrs", "_per_sm", "_large_params", "_streams", "_uploads", "_lock")

    def __init__(self, device: int):
        self.device = device
        self._kernels: dict[KernelSpec, Any] = {}
        self._fn_ptrs: dict[KernelSpec, int] = {}
        self._per_sm: dict[KernelSpec, tuple[int, int]] = {}
        self._large_params: bool | None = None
        self._streams: dict[int, Any] = {}
        self._uploads: dict[int, StreamUploads] = {}
        self._lock = threading.Lock()

    def kernel(self, spec: KernelSpec) -> Any:
        """``spec``'s kernel (a ``cupy.RawKernel``) loaded on this device, built at first use.

        Raises:
            KernelCompileError: the source is missing, does not compile, or does not load.
            BackendUnavailableError: CuPy is not installed.
        """
        fn = self._kernels.get(spec)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._kernels.get(spec)
            if fn is None:
                fn = self._kernels[spec] = load_kernel(spec, self.device)
            return fn

    def function_ptr(self, spec: KernelSpec) -> int:
        """The ``CUfunction`` of ``spec``'s kernel on this device (for ``cuLaunchKernel``).

        Raises:
            KernelCompileError, BackendUnavailableError: as :meth:`kernel`.
        """
        fptr = self._fn_ptrs.get(spec)
        if fptr is None:
            fn = self.kernel(spec)
            with cupy().cuda.Device(self.device):  # the loaded function of this device
                fptr = self._fn_ptrs[spec] = int(fn.kernel.ptr)
        return fptr

    def occupancy(self, spec: KernelSpec) -> tuple[int, int]:
        """(SMs of this device, CTAs of ``spec``'s kernel that fit on one SM at once, at most 32).

        Raises:
            KernelCompileError, BackendUnavailableError: as :meth:`kernel`.
        """
        hit = self._per_sm.get(spec)
        if hit is None:
            props = cupy().cuda.runtime.getDeviceProperties(self.device)
            threads = spec.threads
            regs = max(int(self.kernel(spec).num_regs), 1)
            by_regs = int(props["regsPerMultiprocessor"]) // (((regs + 7) // 8 * 8) * threads)
            by_threads = int(props["maxThreadsPerMultiProcessor"]) // threads
            hit = self._per_sm[spec] = (int(props["multiProcessorCount"]), max(1, min(by_regs, by_threads, 32)))
        return hit

    def large_params(self) -> bool:
        """Whether kernels here take up to 32,764 bytes of parameters instead of 4,096: CUDA
        12.1 or later in both the driver and NVRTC, and compute capability 7.0 or later."""
        ok = self._large_params
        if ok is None:
            try:
                from cupy_backends.cuda.libs import nvrtc

                rt = cupy().cuda.runtime
                ok = (int(rt.getDeviceProperties(self.device)["major"]) >= 7 and int(rt.driverGetVersion()) >= 12010
                      and tuple(nvrtc.getVersion()) >= (12, 1))
            except Exception as exc:  # no device, an old CuPy: the 4 KiB limit
                log.debug("assuming 4 KiB kernel parameters on cuda:%s: %r", self.device, exc)
                ok = False
            self._large_params = ok
        return ok

    def no_large_params(self, why: str) -> None:
        """Record that a kernel with large parameters failed to build here: later copies take
        the 4 KiB path."""
        log.warning("kernels with 32 KiB parameters unavailable on cuda:%s, using uploaded records: %s",
                    self.device, why)
        self._large_params = False

    def stream(self, ptr: int) -> Any:
        """The CuPy stream object over raw stream handle ``ptr`` of this device (made once)."""
        s = self._streams.get(ptr)
        if s is None:
            cuda = cupy().cuda
            from_external = getattr(cuda.Stream, "from_external", None)
            if from_external is not None:  # CuPy 14 deprecates ExternalStream for Stream.from_external
                try:
                    s = from_external(ptr, self.device)
                except Exception:  # other signature (stream-protocol objects only): use the old class
                    s = None
            if s is None or int(getattr(s, "ptr", -1)) != ptr:
                s = cuda.ExternalStream(ptr, self.device)
            self._streams[ptr] = s
        return s

    def uploads(self, ptr: int) -> StreamUploads:
        """The upload staging of raw stream ``ptr`` on this device (made once)."""
        st = self._uploads.get(ptr)
        if st is None:
            with self._lock:
                st = self._uploads.setdefault(ptr, StreamUploads())
        return st

    def clear_kernels(self) -> None:
        """Forget the loaded kernels and their launch facts (tests use this to exercise the
        disk cache); the next launch loads them again."""
        with self._lock:
            self._kernels.clear()
            self._fn_ptrs.clear()
            self._per_sm.clear()


_runtimes: dict[int, DeviceRuntime] = {}
_runtimes_lock = threading.Lock()


def device_runtime(device: int) -> DeviceRuntime:
    """The :class:`DeviceRuntime` of CUDA device ``device`` (made on first use; touches no CUDA)."""
    rt = _runtimes.get(device)
    if rt is None:
        with _runtimes_lock:
            rt = _runtimes.setdefault(device, DeviceRuntime(device))
    return rt


def reset() -> None:
    """Drop every device's runtime (kernels, streams, upload staging); the next use starts
    afresh. For diagnostics that measure a cold start; not while copies are in flight."""
    with _runtimes_lock:
        _runtimes.clear()


def large_params(device: int) -> bool:
    """:meth:`DeviceRuntime.large_params` of ``device``."""
    return device_runtime(device).large_params()


def no_large_params(device: int, why: str) -> None:
    """:meth:`DeviceRuntime.no_large_params` of ``device``."""
    device_runtime(device).no_large_params(why)


def alloc_on(stream: Any, nbytes: int) -> Any:
    """Device memory from CuPy's pool for use on ``stream`` (a CuPy stream).

    CuPy's pool hands a freed block back out at once to the next allocation made under the
    same current stream, trusting stream order. Memory used on one of our streams must be
    allocated under that stream: allocated under the caller's (default) stream, it could be
    handed to the caller while our kernels still read it, or reused by us while the caller's
    queued kernels still write the block they freed (seen as corrupted records and an illegal
    address in the UCX backend's scatter with reads in flight).
    """
    with stream:
        return cupy().cuda.alloc(nbytes)


def check_not_capturing(sptr: int, what: str) -> None:
    """Refuse an upload on raw stream ``sptr`` while it is capturing a CUDA graph.

    Raises:
        TransportError: the stream is capturing.
    """
    is_capturing = getattr(cupy().cuda.runtime, "streamIsCapturing", None)
    if is_capturing is not None and is_capturing(sptr):
        raise TransportError(f"{what} cannot upload its records while the stream is capturing a CUDA graph; "
                             "prepare it before capture and launch it inside")


def caller_stream_ptr(device: int, torch_tensors: bool) -> int:
    """The calling thread's current stream on ``device`` as a raw handle: torch's current
    stream when the tensors are torch's (read through torch's raw-stream accessor when it has
    one: a microsecond instead of a Stream object), else CuPy's current stream."""
    if torch_tensors:
        torch = sys.modules["torch"]
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is not None:
            return int(raw(device))
        return int(torch.cuda.current_stream(device).cuda_stream)
    cp = cupy()
    with cp.cuda.Device(device):
        return int(cp.cuda.get_current_stream().ptr)


def caller_ready_event(layout: Any) -> Any:
    """An event recorded now on the caller's current stream on ``layout``'s device: torch's
    current stream when the layout's tensors are torch tensors, else CuPy's.

    Work a transfer queues on its own streams waits for it, so that it sees every write the
    caller queued before starting the transfer (the KV of a prefill still being computed)
    and never overtakes the caller's queued work on the same blocks. Call it on the caller's
    thread: current streams are per thread.
    """
    cp = cupy()
    dev = int(layout.device)
    torch = sys.modules.get("torch")
    torch_tensors = torch is not None and any(isinstance(o, torch.Tensor) for o in layout.owners)
    with cp.cuda.Device(dev):
        ev = cp.cuda.Event(disable_timing=True)
        ev.record(device_runtime(dev).stream(caller_stream_ptr(dev, torch_tensors)))
    return ev
