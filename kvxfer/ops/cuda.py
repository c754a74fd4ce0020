"""CUDA copy operations over plans: gather, scatter and block-to-block copy in one kernel launch.

Layer: ops. Wraps ``csrc/kv_copy.cu`` (built by :mod:`kvxfer.ops._loader`). Jobs are resolved
on the host (:mod:`kvxfer.ops.jobs`), uploaded through pinned staging with an asynchronous copy
on the launch stream, and copied by one launch. Tensors and buffers may be raw device
addresses (ints), torch tensors or cupy arrays; the launch goes to the caller's stream: an
explicit ``stream`` (int handle, torch or cupy stream), else torch's current stream when any
argument is a torch tensor, else cupy's current stream.

Two ways to run:

- :func:`copy_jobs`, :func:`gather`, :func:`scatter`, :func:`copy_blocks`: resolve, upload and
  launch in one call (no host synchronisation except when every pinned staging buffer is still
  being read by an earlier copy).
- :func:`prepare` (and :func:`prepare_gather` / :func:`prepare_scatter`): resolve and upload
  once into a :class:`PreparedCopy`, then :meth:`PreparedCopy.launch` as often as wanted; a
  launch allocates nothing and never synchronises, so it can be captured in a CUDA graph.

Importing this module imports neither cupy nor torch.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, LayoutError, TransportError
from ..plan import TransferPlan
from . import jobs as _jobs
from ._loader import KernelSpec, get_kernel

log = logging.getLogger(__name__)

__all__ = [
    "KERNEL",
    "alloc_on",
    "caller_ready_event",
    "caller_stream_ptr",
    "PreparedCopy",
    "prepare",
    "prepare_gather",
    "prepare_scatter",
    "copy_jobs",
    "gather",
    "scatter",
    "copy_blocks",
    "large_params",
    "no_large_params",
]

KERNEL = KernelSpec("kv_copy.cu", "kv_copy_jobs")
_MIN_WARP_BYTES = 2048  # below this per warp, launch fewer warps
_STAGING_SLOTS = 4
_H2D = 1  # cudaMemcpyHostToDevice


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(f"CUDA ops need CuPy (pip install cupy-cuda13x): {exc}") from None
    return cupy


# -- arguments -------------------------------------------------------------------------------

def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_cupy(x: Any) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def _addr(x: Any, what: str) -> int:
    if isinstance(x, (int, np.integer)):
        return int(x)
    if _is_torch(x):
        if x.device.type != "cuda":
            raise LayoutError(f"{what} is a torch tensor on {x.device}; CUDA ops need GPU memory")
        return int(x.data_ptr())
    if _is_cupy(x):
        return int(x.data.ptr)
    iface = getattr(x, "__cuda_array_interface__", None)
    if iface is not None:
        return int(iface["data"][0])
    raise LayoutError(f"{what} must be a device address (int), a torch CUDA tensor or a cupy array; got {type(x).__name__}")


def _nbytes(x: Any) -> int | None:
    if _is_torch(x):
        return int(x.numel() * x.element_size())
    if _is_cupy(x):
        return int(x.nbytes)
    return None


def _flatten_bases(bases: Any, what: str) -> tuple[Sequence[int], list[Any]]:
    """Base addresses from a KVLayout, one array/int, or a sequence of them; plus the objects
    seen. An array of addresses (a layout's, a peer's mapped tensors) comes back as a uint64
    array, without a Python int per entry."""
    if isinstance(bases, np.ndarray):
        return bases.astype(np.uint64, copy=False).ravel(), []
    addrs = getattr(bases, "addrs", None)
    if addrs is not None and hasattr(bases, "owners"):  # a KVLayout
        return np.asarray(addrs, dtype=np.uint64).ravel(), list(bases.owners)
    if isinstance(bases, (int, np.integer)) or _is_torch(bases) or _is_cupy(bases):
        return [_addr(bases, what)], [bases]
    items = list(bases)
    return [_addr(b, f"{what}[{i}]") for i, b in enumerate(items)], items


def _device_of(objs: Sequence[Any], bases_sources: Sequence[Any], device: int | None) -> int:
    if device is not None:
        return int(device)
    for src in bases_sources:
        dev = getattr(src, "device", None)
        if isinstance(dev, int) and hasattr(src, "owners") and dev >= 0:
            return dev
    for x in objs:
        if _is_torch(x):
            return int(x.device.index if x.device.index is not None else 0)
        if _is_cupy(x):
            return int(x.device.id)
    return int(_cupy().cuda.runtime.getDevice())


def _stream_ptr(stream: Any, objs: Sequence[Any], device: int) -> int:
    if stream is not None:
        if isinstance(stream, (int, np.integer)):
            return int(stream)
        for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy Stream
            if hasattr(stream, attr):
                return int(getattr(stream, attr))
        raise LayoutError(f"stream must be an int handle, a torch or a cupy stream; got {type(stream).__name__}")
    if any(_is_torch(x) for x in objs):
        torch = sys.modules["torch"]
        return int(torch.cuda.current_stream(device).cuda_stream)
    return int(_cupy().cuda.get_current_stream().ptr)


_streams: dict[tuple[int, int], Any] = {}


def _cupy_stream(ptr: int, device: int) -> Any:
    s = _streams.get((device, ptr))
    if s is None:
        cuda = _cupy().cuda
        from_external = getattr(cuda.Stream, "from_external", None)
        s = None
        if from_external is not None:  # CuPy 14 deprecates ExternalStream for Stream.from_external
            try:
                s = from_external(ptr, device)
            except Exception:  # other signature (stream-protocol objects only): use the old class
                s = None
        if s is None or int(getattr(s, "ptr", -1)) != ptr:
            s = cuda.ExternalStream(ptr, device)
        _streams[(device, ptr)] = s
    return s


# -- launch geometry ---------------------------------------------------------------------------

def _threads(spec: KernelSpec) -> int:
    return dict(spec.defines).get("KVX_THREADS", 256)


_per_sm: dict[tuple[KernelSpec, int], tuple[int, int]] = {}


def _workers_for(spec: KernelSpec, device: int, total: int, ctas_per_sm: int | None) -> tuple[int, int]:
    """(warps, CTAs): one wave of CTAs (as many as fit on the GPU at once), fewer for small copies."""
    key = (spec, device)
    if key not in _per_sm:
        props = _cupy().cuda.runtime.getDeviceProperties(device)
        threads = _threads(spec)
        regs = max(int(get_kernel(spec, device).num_regs), 1)
        by_regs = int(props["regsPerMultiprocessor"]) // (((regs + 7) // 8 * 8) * threads)
        by_threads = int(props["maxThreadsPerMultiProcessor"]) // threads
        _per_sm[key] = (int(props["multiProcessorCount"]), max(1, min(by_regs, by_threads, 32)))
    sms, fit = _per_sm[key]
    warps_per_cta = _threads(spec) // 32
    warps = max(1, min(sms * (ctas_per_sm or fit) * warps_per_cta, -(-total // _MIN_WARP_BYTES)))
    return warps, -(-warps // warps_per_cta)


_large_params: dict[int, bool] = {}


def large_params(device: int) -> bool:
    """Whether kernels on ``device`` take up to 32,764 bytes of parameters instead of 4,096:
    CUDA 12.1 or later in both the driver and NVRTC, and compute capability 7.0 or later."""
    ok = _large_params.get(device)
    if ok is None:
        try:
            from cupy_backends.cuda.libs import nvrtc

            rt = _cupy().cuda.runtime
            ok = (int(rt.getDeviceProperties(device)["major"]) >= 7 and int(rt.driverGetVersion()) >= 12010
                  and tuple(nvrtc.getVersion()) >= (12, 1))
        except Exception as exc:  # no device, an old CuPy: the 4 KiB limit
            log.debug("assuming 4 KiB kernel parameters on cuda:%s: %r", device, exc)
            ok = False
        _large_params[device] = ok
    return ok


def no_large_params(device: int, why: str) -> None:
    """Record that a kernel with large parameters failed to build for ``device`` (see
    :func:`large_params`): later copies take the 4 KiB path."""
    log.warning("kernels with 32 KiB parameters unavailable on cuda:%s, using uploaded records: %s", device, why)
    _large_params[device] = False


_fn_ptrs: dict[tuple[KernelSpec, int], int] = {}


def launch_with_params(spec: KernelSpec, device: int, ctas: int, params: np.ndarray, stream_ptr: int) -> None:
    """Launch ``spec``'s kernel, whose one parameter is a struct passed by value, with the bytes
    of ``params`` (a contiguous numpy array laid out as that struct) as the struct; ``ctas`` CTAs on
    stream ``stream_ptr``. Straight through ``cuLaunchKernel``: no per-argument conversion, and
    the parameters are copied at the launch, so ``params`` may be reused once this returns.

    Raises:
        KernelCompileError: the kernel does not build. CUDA driver errors propagate.
    """
    key = (spec, device)
    fptr = _fn_ptrs.get(key)
    cupy = _cupy()
    if fptr is None:
        fn = get_kernel(spec, device)
        with cupy.cuda.Device(device):  # the loaded function of this device
            fptr = _fn_ptrs[key] = int(fn.kernel.ptr)
    argv = np.array([params.ctypes.data], dtype=np.uintp)  # void* kernelParams[1]
    args = (fptr, ctas, 1, 1, _threads(spec), 1, 1, 0, stream_ptr, argv.ctypes.data, 0)
    if cupy.cuda.runtime.getDevice() == device:
        cupy.cuda.driver.launchKernel(*args)
    else:
        with cupy.cuda.Device(device):
            cupy.cuda.driver.launchKernel(*args)


def _jobs_offset(tasks: np.ndarray) -> int:
    """Where the jobs start in a payload: after the tasks, 64-byte aligned."""
    return -(-tasks.nbytes // 64) * 64


def _write_payload(view: np.ndarray, djobs: np.ndarray, tasks: np.ndarray) -> None:
    """Tasks then jobs (at :func:`_jobs_offset`) written into the byte array ``view``."""
    head = _jobs_offset(tasks)
    view[: tasks.nbytes] = tasks.view(np.uint8)
    view[tasks.nbytes : head] = 0
    view[head : head + djobs.nbytes] = djobs.view(np.uint8)


def _payload(djobs: np.ndarray, tasks: np.ndarray) -> tuple[np.ndarray, int]:
    """Tasks then jobs in one new byte array; returns it and the jobs' offset."""
    head = _jobs_offset(tasks)
    buf = np.empty(head + djobs.nbytes, dtype=np.uint8)
    _write_payload(buf, djobs, tasks)
    return buf, head


class _Resolved:
    __slots__ = ("djobs", "spans", "ctas", "warps", "device", "nbytes")

    def __init__(self, jobs: np.ndarray, src: list[int], dst: list[int], device: int, spec: KernelSpec,
                 ctas_per_sm: int | None):
        self.device = device
        self.djobs = _jobs.device_jobs(jobs, src, dst)
        self.nbytes = int(self.djobs["nbytes"].sum()) if self.djobs.size else 0
        self.warps, self.ctas = _workers_for(spec, device, self.nbytes, ctas_per_sm) if self.nbytes else (0, 0)
        self.spans = _jobs.tasks(self.djobs, _jobs.partition(self.djobs, self.warps)) if self.nbytes else None


def _launch(spec: KernelSpec, device: int, ctas: int, warps: int, dev_ptr: int, jobs_off: int,
            stream_ptr: int) -> None:
    cupy = _cupy()
    fn = get_kernel(spec, device)
    try:
        with cupy.cuda.Device(device):
            fn((ctas,), (_threads(spec),), (np.uint64(dev_ptr), np.uint64(dev_ptr + jobs_off), np.int64(warps)),
               stream=_cupy_stream(stream_ptr, device))
    except Exception as exc:
        raise TransportError(f"kv_copy launch failed on cuda:{device}: {exc}") from exc


# -- prepared copies --------------------------------------------------------------------------

class PreparedCopy:
    """Jobs resolved and resident on the GPU; :meth:`launch` runs them with no upload.

    The job records hold absolute addresses: the tensors and buffers they were prepared for must
    outlive every launch. A launch allocates nothing and does not synchronise (graph-capturable).
    """

    __slots__ = ("device", "nbytes", "njobs", "ctas", "warps", "spec", "_mem", "_jobs_off", "__weakref__")

    def __init__(self, resolved: _Resolved, spec: KernelSpec):
        self.device = resolved.device
        self.nbytes = resolved.nbytes
        self.njobs = int(resolved.djobs.size)
        self.ctas = resolved.ctas
        self.warps = resolved.warps
        self.spec = spec
        self._mem = None
        self._jobs_off = 0
        if self.nbytes:
            cupy = _cupy()
            buf, self._jobs_off = _payload(resolved.djobs, resolved.spans)
            with cupy.cuda.Device(self.device):
                self._mem = cupy.cuda.alloc(buf.nbytes)
                cupy.cuda.runtime.memcpy(int(self._mem.ptr), buf.ctypes.data, buf.nbytes, _H2D)

    def launch(self, stream: Any = None) -> None:
        """Run the copy on ``stream`` (int handle, torch or cupy stream; default cupy's current).

        Raises:
            TransportError: the kernel launch failed, or the copy was closed.
        """
        if self._mem is None:
            if self.nbytes:
                raise TransportError("this PreparedCopy was closed")
            return
        _launch(self.spec, self.device, self.ctas, self.warps, int(self._mem.ptr), self._jobs_off,
                _stream_ptr(stream, (), self.device))

    def close(self) -> None:
        """Release the device-resident jobs (idempotent); later launches raise."""
        self._mem = None

    def __enter__(self) -> PreparedCopy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PreparedCopy({self.njobs} jobs, {self.nbytes} B, {self.warps} warps in {self.ctas} CTAs on cuda:{self.device})"


def prepare(jobs: np.ndarray, src_bases: Any, dst_bases: Any, *, device: int | None = None,
            spec: KernelSpec = KERNEL, ctas_per_sm: int | None = None) -> PreparedCopy:
    """Resolve ``jobs`` (JOB_DTYPE) against base addresses and upload them once (synchronously).

    ``src_bases``/``dst_bases``: a KVLayout, or a sequence of per-tensor device addresses, torch
    tensors or cupy arrays (tensor ``t`` of the jobs is entry ``t``).

    Raises:
        LayoutError: malformed jobs or bases.
        KernelCompileError: the kernel does not build.
        BackendUnavailableError: CuPy is missing.
    """
    src, src_objs = _flatten_bases(src_bases, "src_bases")
    dst, dst_objs = _flatten_bases(dst_bases, "dst_bases")
    dev = _device_of(src_objs + dst_objs, (src_bases, dst_bases), device)
    return PreparedCopy(_Resolved(jobs, src, dst, dev, spec, ctas_per_sm), spec)


def prepare_gather(plan: TransferPlan, src: Any, out: Any, **kw: Any) -> PreparedCopy:
    """:func:`prepare` the gather of ``plan``'s source side into buffer ``out``."""
    _check_buffer(out, plan, "gather output")
    return prepare(_jobs.gather_jobs(plan), src, [out], **kw)


def prepare_scatter(plan: TransferPlan, buf: Any, dst: Any, **kw: Any) -> PreparedCopy:
    """:func:`prepare` the scatter of buffer ``buf`` into ``plan``'s destination side."""
    _check_buffer(buf, plan, "scatter input")
    return prepare(_jobs.scatter_jobs(plan), [buf], dst, **kw)


# -- one-shot copies ----------------------------------------------------------------------------

class _Slot:
    """Pinned host memory that uploads are staged in; busy until its event (recorded on the
    stream after the upload, reused) completes."""

    __slots__ = ("mem", "view", "event", "busy")

    def __init__(self, size: int):
        self.event: Any = None
        self.busy = False
        self.resize(size)

    def resize(self, size: int) -> None:
        self.mem = _cupy().cuda.alloc_pinned_memory(size)
        self.view = np.frombuffer(self.mem, dtype=np.uint8, count=size)

    def free(self) -> bool:
        return not self.busy or self.event.done


class _StreamState:
    """Per (device, stream): a device buffer reused in stream order, and pinned staging slots."""

    __slots__ = ("mem", "retired", "slots", "lock")

    def __init__(self) -> None:
        self.mem: Any = None
        self.retired: list[tuple[Any, Any]] = []  # (old device buffer, event after its last use)
        self.slots: list[_Slot] = []
        self.lock = threading.Lock()


_states: dict[tuple[int, int], _StreamState] = {}
_states_lock = threading.Lock()


def _state(device: int, stream_ptr: int) -> _StreamState:
    st = _states.get((device, stream_ptr))
    if st is None:
        with _states_lock:
            st = _states.setdefault((device, stream_ptr), _StreamState())
    return st


def _slot_size(n: int) -> int:
    return 1 << max(20, (n - 1).bit_length())


def _staging(st: _StreamState, n: int) -> _Slot:
    for slot in st.slots:
        if slot.free():
            if slot.view.nbytes < n:
                slot.resize(_slot_size(n))
            slot.busy = False
            return slot
    if len(st.slots) < _STAGING_SLOTS:
        slot = _Slot(_slot_size(n))
        st.slots.append(slot)
        return slot
    oldest = st.slots[0]  # every slot is in flight: wait for the oldest copy, reuse its slot
    oldest.event.synchronize()
    st.slots.append(st.slots.pop(0))
    oldest.busy = False
    return _staging(st, n)


def _upload(st: _StreamState, nbytes: int, fill: Callable[[np.ndarray], None], dst: int, sptr: int, cstream: Any,
            what: str, started: Callable[[], None] | None = None) -> None:
    """Stage ``nbytes`` in pinned memory, written there by ``fill(view)`` (no temporary of
    their own), and copy them to device address ``dst`` in stream order (the caller holds
    ``st.lock``); the slot stays busy until the copy has run. ``started`` runs once the host
    has staged the bytes, just before the copy is queued."""
    slot = _staging(st, nbytes)
    fill(slot.view[:nbytes])
    if started is not None:
        started()
    cupy = _cupy()
    try:
        cupy.cuda.runtime.memcpyAsync(dst, slot.view.ctypes.data, nbytes, _H2D, sptr)
    except Exception as exc:
        raise TransportError(f"{what} upload failed: {exc}") from exc
    if slot.event is None:
        slot.event = cupy.cuda.Event(disable_timing=True)
    slot.event.record(cstream)
    slot.busy = True


def _check_not_capturing(sptr: int, what: str) -> None:
    is_capturing = getattr(_cupy().cuda.runtime, "streamIsCapturing", None)
    if is_capturing is not None and is_capturing(sptr):
        raise TransportError(f"{what} cannot upload its records while the stream is capturing a CUDA graph; "
                             "prepare it before capture and launch it inside")


def _device_buffer(st: _StreamState, n: int, stream: Any) -> Any:
    cupy = _cupy()
    st.retired = [(m, e) for m, e in st.retired if not e.done]
    if st.mem is None or st.mem.mem.size < n:
        if st.mem is not None:  # earlier launches on this stream may still read it
            ev = cupy.cuda.Event(disable_timing=True)
            ev.record(stream)
            st.retired.append((st.mem, ev))
        st.mem = alloc_on(stream, 1 << max(16, (n - 1).bit_length()))
    return st.mem


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
        return _cupy().cuda.alloc(nbytes)


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
    cupy = _cupy()
    with cupy.cuda.Device(device):
        return int(cupy.cuda.get_current_stream().ptr)


def caller_ready_event(layout: Any) -> Any:
    """An event recorded now on the caller's current stream on ``layout``'s device: torch's
    current stream when the layout's tensors are torch tensors, else CuPy's.

    Work a transfer queues on its own streams waits for it, so that it sees every write the
    caller queued before starting the transfer (the KV of a prefill still being computed)
    and never overtakes the caller's queued work on the same blocks. Call it on the caller's
    thread: current streams are per thread.
    """
    cupy = _cupy()
    dev = int(layout.device)
    torch = sys.modules.get("torch")
    torch_tensors = torch is not None and any(isinstance(o, torch.Tensor) for o in layout.owners)
    with cupy.cuda.Device(dev):
        ev = cupy.cuda.Event(disable_timing=True)
        ev.record(_cupy_stream(caller_stream_ptr(dev, torch_tensors), dev))
    return ev


def copy_jobs(jobs: np.ndarray, src_bases: Any, dst_bases: Any, *, stream: Any = None,
              device: int | None = None, spec: KernelSpec = KERNEL) -> None:
    """Copy every job (JOB_DTYPE) from the source tensors to the destination tensors, one launch.

    ``src_bases``/``dst_bases`` as in :func:`prepare`. Asynchronous on the launch stream; the
    job upload is stream-ordered before the kernel. Zero jobs: nothing is launched. Not for use
    while the stream is being captured into a CUDA graph: :func:`prepare` first, then launch.

    Raises:
        LayoutError: malformed jobs or bases.
        TransportError: the stream is capturing, or the upload or launch failed.
        KernelCompileError: the kernel does not build.
        BackendUnavailableError: CuPy is missing.
    """
    src, src_objs = _flatten_bases(src_bases, "src_bases")
    dst, dst_objs = _flatten_bases(dst_bases, "dst_bases")
    objs = src_objs + dst_objs
    dev = _device_of(objs, (src_bases, dst_bases), device)
    res = _Resolved(jobs, src, dst, dev, spec, None)
    if not res.nbytes:
        return
    cupy = _cupy()
    sptr = _stream_ptr(stream, objs, dev)
    st = _state(dev, sptr)
    jobs_off = _jobs_offset(res.spans)
    nbytes = jobs_off + res.djobs.nbytes
    with st.lock, cupy.cuda.Device(dev):
        cstream = _cupy_stream(sptr, dev)
        _check_not_capturing(sptr, "copy_jobs")
        mem = _device_buffer(st, nbytes, cstream)
        _upload(st, nbytes, lambda view: _write_payload(view, res.djobs, res.spans), int(mem.ptr), sptr, cstream,
                f"job records to cuda:{dev}")
        _launch(spec, dev, res.ctas, res.warps, int(mem.ptr), jobs_off, sptr)


def _check_buffer(buf: Any, plan: TransferPlan, what: str) -> None:
    n = _nbytes(buf)
    if n is not None and n < plan.nbytes:
        raise LayoutError(f"{what} holds {n} bytes; the plan moves {plan.nbytes}")


def gather(plan: TransferPlan, src: Any, out: Any, *, stream: Any = None, device: int | None = None) -> None:
    """Copy ``plan``'s source side (tensors ``src``: KVLayout or per-tensor addresses/arrays) into
    the contiguous buffer ``out`` (address or array) in stream order. See :func:`copy_jobs`.

    Raises:
        LayoutError: ``out`` is smaller than the plan, or malformed arguments.
        TransportError, KernelCompileError, BackendUnavailableError: as :func:`copy_jobs`.
    """
    _check_buffer(out, plan, "gather output")
    if plan.block_pairs is not None:  # addresses computed on the GPU: no per-job host work
        from .pairs import gather_pairs

        gather_pairs(plan.block_pairs, src, out, stream=stream, device=device)
        return
    copy_jobs(_jobs.gather_jobs(plan), src, [out], stream=stream, device=device)


def scatter(plan: TransferPlan, buf: Any, dst: Any, *, stream: Any = None, device: int | None = None) -> None:
    """Copy the stream-ordered buffer ``buf`` into ``plan``'s destination side (tensors ``dst``).

    Raises:
        LayoutError: ``buf`` is smaller than the plan, or malformed arguments.
        TransportError, KernelCompileError, BackendUnavailableError: as :func:`copy_jobs`.
    """
    _check_buffer(buf, plan, "scatter input")
    if plan.block_pairs is not None:
        from .pairs import scatter_pairs

        scatter_pairs(plan.block_pairs, buf, dst, stream=stream, device=device)
        return
    copy_jobs(_jobs.scatter_jobs(plan), [buf], dst, stream=stream, device=device)


def copy_blocks(plan: TransferPlan, src: Any, dst: Any, *, stream: Any = None, device: int | None = None) -> None:
    """Block-to-block copy of ``plan`` from tensors ``src`` to tensors ``dst`` (e.g. peer pointers
    opened through CUDA IPC); one launch, no intermediate buffer.

    Raises:
        LayoutError, TransportError, KernelCompileError, BackendUnavailableError: as :func:`copy_jobs`.
    """
    copy_jobs(plan.jobs, src, dst, stream=stream, device=device)

