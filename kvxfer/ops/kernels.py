"""The kernels of ``kvxfer/csrc/kv_copy.cu``: their specs, the structs they read, typed launches.

Layer: ops, above :mod:`kvxfer.ops.runtime` (loaded kernels, launch facts) and below the copies
(:mod:`kvxfer.ops.jobcopy`, :mod:`kvxfer.ops.pairs`). One launch wrapper per kernel:

- ``kv_copy_jobs`` (:data:`JOBS_KERNEL`): per-warp tasks then job records in device memory
  (:func:`jobs_payload`, :func:`launch_jobs`); the records are :mod:`kvxfer.ops.jobs`'.
- ``kv_copy_pairs`` (:data:`PAIRS_KERNEL`): pair records (:data:`PAIR_DTYPE`) and run tables in
  device memory (:func:`pairs_args`, :func:`launch_pairs`).
- ``kv_copy_pairs_inline`` (:data:`INLINE_KERNEL`): the same records in one by-value
  parameter struct of 4 KiB (:data:`INLINE_DTYPE`, :func:`launch_pairs_inline`).
- ``kv_copy_pairs_ids`` (:data:`IDS_KERNEL`): pair records and int32 block ids in a 32 KiB
  parameter struct (:data:`IDS_DTYPE`, :func:`launch_pairs_ids`).

Every dtype here must match its struct in the CUDA source; the asserts check the sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import TransportError
from .loader import KernelSpec, cupy
from .runtime import device_runtime

__all__ = [
    "JOBS_KERNEL", "PAIRS_KERNEL", "INLINE_KERNEL", "IDS_KERNEL",
    "PAIR_DTYPE", "INLINE_DTYPE", "IDS_DTYPE", "RUN_FIELDS", "INLINE_WORDS", "IDS_WORDS",
    "BUF_NONE", "BUF_SRC", "BUF_DST", "MIN_WARP_BYTES",
    "workers_for", "jobs_offset", "write_jobs_payload", "jobs_payload", "launch_jobs",
    "pairs_args", "launch_pairs", "launch_with_params", "launch_pairs_inline", "launch_pairs_ids",
]

#: job records (any plan, layout changes included)
JOBS_KERNEL = KernelSpec("kv_copy.cu", "kv_copy_jobs")
#: block pairs: every address computed on the GPU from block ids
PAIRS_KERNEL = KernelSpec("kv_copy.cu", "kv_copy_pairs")
#: the same copy with its records passed in the kernel's parameters (small transfers)
INLINE_KERNEL = KernelSpec("kv_copy.cu", "kv_copy_pairs_inline")
#: pieces of a pipelined copy with the pair records and block ids in the launch's parameters
IDS_KERNEL = KernelSpec("kv_copy.cu", "kv_copy_pairs_ids")

MIN_WARP_BYTES = 2048  # below this per warp, launch fewer warps

# Must match `struct KvPair` in kvxfer/csrc/kv_copy.cu.
PAIR_DTYPE = np.dtype(
    [
        ("src", np.uint64),
        ("dst", np.uint64),
        ("src_bstride", np.int64),
        ("dst_bstride", np.int64),
        ("run", np.int64),
        ("count", np.int64),
        ("src_stride", np.int64),
        ("dst_stride", np.int64),
        ("coal", np.int64),
        ("item0", np.int64),
        ("unit", np.int64),
        ("pad", np.int64),
    ]
)
assert PAIR_DTYPE.itemsize == 96

RUN_FIELDS = 6  # KVX_RUN_FIELDS in kvxfer/csrc/kv_copy.cu
INLINE_WORDS = 500  # KVX_INLINE_WORDS
IDS_WORDS = 4080  # KVX_IDS_WORDS
BUF_NONE, BUF_SRC, BUF_DST = 0, 1, 2  # KVX_BUF_*: which side is a stream-ordered buffer

# Must match `struct KvInline` (4,064 bytes: within the 4 KiB of kernel parameters that every
# CUDA version accepts).
INLINE_DTYPE = np.dtype(
    [
        ("npairs", np.int64),
        ("ncoal", np.int64),
        ("nsingle", np.int64),
        ("nitems", np.int64),
        ("coal_off", np.int64),
        ("single_off", np.int64),
        ("split_shift", np.int32),
        ("buf_side", np.int32),
        ("rows_inner", np.int32),
        ("uniform", np.int32),
        ("w", np.int64, (INLINE_WORDS,)),
    ]
)
assert INLINE_DTYPE.itemsize == 4064

# Must match `struct KvIds` (32,704 bytes: within the 32,764 bytes of kernel parameters of
# CUDA 12.1 and later).
IDS_DTYPE = np.dtype(
    [
        ("npairs", np.int64),
        ("nblocks", np.int64),
        ("nitems", np.int64),
        ("item_base", np.int64),
        ("sids_off", np.int64),
        ("dids_off", np.int64),
        ("split_shift", np.int32),
        ("buf_side", np.int32),
        ("rows_inner", np.int32),
        ("uniform", np.int32),
        ("w", np.int64, (IDS_WORDS,)),
    ]
)
assert IDS_DTYPE.itemsize == 32704


# -- launch shape ---------------------------------------------------------------------------------

def workers_for(spec: KernelSpec, device: int, total: int, ctas_per_sm: int | None) -> tuple[int, int]:
    """(warps, CTAs) for a copy of ``total`` bytes: one wave of CTAs (as many as fit on the
    GPU at once, or ``ctas_per_sm`` per SM), fewer for small copies.

    Raises:
        KernelCompileError, BackendUnavailableError: the kernel cannot be loaded to ask.
    """
    sms, fit = device_runtime(device).occupancy(spec)
    warps_per_cta = spec.threads // 32
    warps = max(1, min(sms * (ctas_per_sm or fit) * warps_per_cta, -(-total // MIN_WARP_BYTES)))
    return warps, -(-warps // warps_per_cta)


# -- kv_copy_jobs -----------------------------------------------------------------------------------

def jobs_offset(tasks: np.ndarray) -> int:
    """Where the jobs start in a ``kv_copy_jobs`` payload: after the tasks, 64-byte aligned."""
    return -(-tasks.nbytes // 64) * 64


def write_jobs_payload(view: np.ndarray, djobs: np.ndarray, tasks: np.ndarray) -> None:
    """Tasks then jobs (at :func:`jobs_offset`) written into the byte array ``view``."""
    head = jobs_offset(tasks)
    view[: tasks.nbytes] = tasks.view(np.uint8)
    view[tasks.nbytes : head] = 0
    view[head : head + djobs.nbytes] = djobs.view(np.uint8)


def jobs_payload(djobs: np.ndarray, tasks: np.ndarray) -> tuple[np.ndarray, int]:
    """(payload bytes, offset of the jobs in it): what ``kv_copy_jobs`` reads from device memory."""
    head = jobs_offset(tasks)
    buf = np.empty(head + djobs.nbytes, dtype=np.uint8)
    write_jobs_payload(buf, djobs, tasks)
    return buf, head


def launch_jobs(spec: KernelSpec, device: int, ctas: int, warps: int, dev_ptr: int, jobs_off: int,
                stream_ptr: int) -> None:
    """Launch ``kv_copy_jobs`` (a build ``spec``) over the payload at device address ``dev_ptr``
    (tasks, then jobs at ``dev_ptr + jobs_off``): ``warps`` tasks in ``ctas`` CTAs on raw
    stream ``stream_ptr``.

    Raises:
        KernelCompileError: the kernel does not build. TransportError: the launch failed.
    """
    cp = cupy()
    rt = device_runtime(device)
    fn = rt.kernel(spec)
    try:
        with cp.cuda.Device(device):
            fn((ctas,), (spec.threads,), (np.uint64(dev_ptr), np.uint64(dev_ptr + jobs_off), np.int64(warps)),
               stream=rt.stream(stream_ptr))
    except Exception as exc:
        raise TransportError(f"kv_copy launch failed on cuda:{device}: {exc}") from exc


# -- kv_copy_pairs ---------------------------------------------------------------------------------

def pairs_args(pairs_ptr: int, npairs: int, coal_ptr: int, ncoal: int, single_ptr: int, nsingle: int, nitems: int,
               split_shift: int, buf_side: int, item_base: int, rows_inner: int) -> tuple:
    """The arguments of ``kv_copy_pairs``, typed as its signature: records at ``pairs_ptr``,
    the two run tables at ``coal_ptr`` / ``single_ptr`` (device addresses)."""
    return (np.uint64(pairs_ptr), np.int64(npairs), np.uint64(coal_ptr), np.int64(ncoal), np.uint64(single_ptr),
            np.int64(nsingle), np.int64(nitems), np.int32(split_shift), np.int32(buf_side), np.int64(item_base),
            np.int32(rows_inner))


def launch_pairs(spec: KernelSpec, device: int, ctas: int, args: tuple, cstream: Any) -> None:
    """Launch ``kv_copy_pairs`` (a build ``spec``) with :func:`pairs_args` ``args`` on CuPy
    stream ``cstream``; the caller made ``device`` current.

    Raises:
        TransportError: the kernel did not load or the launch failed.
    """
    try:
        device_runtime(device).kernel(spec)((ctas,), (spec.threads,), args, stream=cstream)
    except Exception as exc:
        raise TransportError(f"kv_copy_pairs launch failed on cuda:{device}: {exc}") from exc


def launch_with_params(spec: KernelSpec, device: int, ctas: int, params: np.ndarray, stream_ptr: int) -> None:
    """Launch ``spec``'s kernel, whose one parameter is a struct passed by value, with the bytes
    of ``params`` (a contiguous numpy array laid out as that struct) as the struct; ``ctas`` CTAs on
    stream ``stream_ptr``. Straight through ``cuLaunchKernel``: no per-argument conversion, and
    the parameters are copied at the launch, so ``params`` may be reused once this returns.

    Raises:
        KernelCompileError: the kernel does not build. CUDA driver errors propagate.
    """
    fptr = device_runtime(device).function_ptr(spec)
    cp = cupy()
    argv = np.array([params.ctypes.data], dtype=np.uintp)  # void* kernelParams[1]
    args = (fptr, ctas, 1, 1, spec.threads, 1, 1, 0, stream_ptr, argv.ctypes.data, 0)
    if cp.cuda.runtime.getDevice() == device:
        cp.cuda.driver.launchKernel(*args)
    else:
        with cp.cuda.Device(device):
            cp.cuda.driver.launchKernel(*args)


def launch_pairs_inline(spec: KernelSpec, device: int, ctas: int, params: np.ndarray, stream_ptr: int) -> None:
    """Launch ``kv_copy_pairs_inline`` (a build ``spec``) with ``params`` (:data:`INLINE_DTYPE`'s
    bytes) as its parameter struct, on raw stream ``stream_ptr``.

    Raises:
        TransportError: the kernel did not build or the launch failed.
    """
    try:
        launch_with_params(spec, device, ctas, params, stream_ptr)
    except Exception as exc:
        raise TransportError(f"kv_copy_pairs_inline launch failed on cuda:{device}: {exc}") from exc


def launch_pairs_ids(device: int, ctas: int, params: np.ndarray, stream_ptr: int) -> None:
    """Launch ``kv_copy_pairs_ids`` with ``params`` (:data:`IDS_DTYPE`'s bytes) as its parameter
    struct, on raw stream ``stream_ptr``.

    Raises:
        TransportError: the kernel did not build or the launch failed.
    """
    try:
        launch_with_params(IDS_KERNEL, device, ctas, params, stream_ptr)
    except Exception as exc:
        raise TransportError(f"kv_copy_pairs_ids launch failed on cuda:{device}: {exc}") from exc
