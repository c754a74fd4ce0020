"""CUDA copies by job records (``kv_copy_jobs``): any plan, layout changes included.

Layer: ops, above :mod:`kvxfer.ops.kernels` and :mod:`kvxfer.ops.runtime`; beside
:mod:`kvxfer.ops.pairs` (neither imports the other). Jobs are resolved on the host
(:mod:`kvxfer.ops.jobs`), uploaded through the stream's pinned staging with an asynchronous
copy on the launch stream, and copied by one launch. Two ways to run:

- :func:`copy_jobs`: resolve, upload and launch in one call (no host synchronisation except
  when every pinned staging buffer is still being read by an earlier copy).
- :func:`prepare` (and :func:`prepare_gather` / :func:`prepare_scatter`): resolve and upload
  once into a :class:`PreparedCopy`, then :meth:`PreparedCopy.launch` as often as wanted; a
  launch allocates nothing and never synchronises, so it can be captured in a CUDA graph.

Arguments as in :mod:`kvxfer.ops.operands`. Importing this module imports neither cupy nor torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import TransportError
from ..plan import TransferPlan
from . import jobs as _jobs
from . import kernels, operands
from .kernels import JOBS_KERNEL
from .loader import KernelSpec, cupy
from .runtime import H2D, check_not_capturing, device_runtime

__all__ = ["KERNEL", "PreparedCopy", "prepare", "prepare_gather", "prepare_scatter", "copy_jobs"]

KERNEL = JOBS_KERNEL


class _Resolved:
    __slots__ = ("djobs", "spans", "ctas", "warps", "device", "nbytes")

    def __init__(self, jobs: np.ndarray, src: list[int], dst: list[int], device: int, spec: KernelSpec,
                 ctas_per_sm: int | None):
        self.device = device
        self.djobs = _jobs.device_jobs(jobs, src, dst)
        self.nbytes = int(self.djobs["nbytes"].sum()) if self.djobs.size else 0
        self.warps, self.ctas = kernels.workers_for(spec, device, self.nbytes, ctas_per_sm) if self.nbytes else (0, 0)
        self.spans = _jobs.tasks(self.djobs, _jobs.partition(self.djobs, self.warps)) if self.nbytes else None


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
            cp = cupy()
            buf, self._jobs_off = kernels.jobs_payload(resolved.djobs, resolved.spans)
            with cp.cuda.Device(self.device):
                self._mem = cp.cuda.alloc(buf.nbytes)
                cp.cuda.runtime.memcpy(int(self._mem.ptr), buf.ctypes.data, buf.nbytes, H2D)

    def launch(self, stream: Any = None) -> None:
        """Run the copy on ``stream`` (int handle, torch or cupy stream; default cupy's current).

        Raises:
            TransportError: the kernel launch failed, or the copy was closed.
        """
        if self._mem is None:
            if self.nbytes:
                raise TransportError("this PreparedCopy was closed")
            return
        kernels.launch_jobs(self.spec, self.device, self.ctas, self.warps, int(self._mem.ptr), self._jobs_off,
                            operands.stream_ptr(stream, (), self.device))

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
    src, src_objs = operands.flatten_bases(src_bases, "src_bases")
    dst, dst_objs = operands.flatten_bases(dst_bases, "dst_bases")
    dev = operands.device_of(src_objs + dst_objs, (src_bases, dst_bases), device)
    return PreparedCopy(_Resolved(jobs, src, dst, dev, spec, ctas_per_sm), spec)


def prepare_gather(plan: TransferPlan, src: Any, out: Any, **kw: Any) -> PreparedCopy:
    """:func:`prepare` the gather of ``plan``'s source side into buffer ``out``.

    Raises:
        LayoutError: ``out`` is smaller than the plan; else as :func:`prepare`.
    """
    operands.check_buffer(out, plan.nbytes, "gather output")
    return prepare(_jobs.gather_jobs(plan), src, [out], **kw)


def prepare_scatter(plan: TransferPlan, buf: Any, dst: Any, **kw: Any) -> PreparedCopy:
    """:func:`prepare` the scatter of buffer ``buf`` into ``plan``'s destination side.

    Raises:
        LayoutError: ``buf`` is smaller than the plan; else as :func:`prepare`.
    """
    operands.check_buffer(buf, plan.nbytes, "scatter input")
    return prepare(_jobs.scatter_jobs(plan), [buf], dst, **kw)


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
    src, src_objs = operands.flatten_bases(src_bases, "src_bases")
    dst, dst_objs = operands.flatten_bases(dst_bases, "dst_bases")
    objs = src_objs + dst_objs
    dev = operands.device_of(objs, (src_bases, dst_bases), device)
    res = _Resolved(jobs, src, dst, dev, spec, None)
    if not res.nbytes:
        return
    cp = cupy()
    sptr = operands.stream_ptr(stream, objs, dev)
    rt = device_runtime(dev)
    st = rt.uploads(sptr)
    jobs_off = kernels.jobs_offset(res.spans)
    nbytes = jobs_off + res.djobs.nbytes
    with st.lock, cp.cuda.Device(dev):
        cstream = rt.stream(sptr)
        check_not_capturing(sptr, "copy_jobs")
        mem = st.device_buffer(nbytes, cstream)
        st.upload(nbytes, lambda view: kernels.write_jobs_payload(view, res.djobs, res.spans), int(mem.ptr), sptr,
                  cstream, f"job records to cuda:{dev}")
        kernels.launch_jobs(spec, dev, res.ctas, res.warps, int(mem.ptr), jobs_off, sptr)
