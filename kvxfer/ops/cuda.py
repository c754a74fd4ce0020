"""The CUDA copy operations over plans: gather, scatter and block-to-block copy, one launch each.

Layer: ops, the top. :func:`gather` and :func:`scatter` pick the kernel family for a plan: a
plan between layouts of the same segment structure (``plan.block_pairs``) goes to the block-pair
copies of :mod:`kvxfer.ops.pairs` (addresses computed on the GPU), any other to the job-record
copies of :mod:`kvxfer.ops.jobcopy`. This module is also the stable home of the CUDA ops' public
names that live lower down (:mod:`kvxfer.ops.jobcopy`, :mod:`kvxfer.ops.runtime`).

Tensors and buffers may be raw device addresses (ints), torch tensors or cupy arrays; the
launch goes to the caller's stream: an explicit ``stream`` (int handle, torch or cupy stream),
else torch's current stream when any argument is a torch tensor, else cupy's current stream
(:mod:`kvxfer.ops.operands`). Importing this module imports neither cupy nor torch.
"""

from __future__ import annotations

from typing import Any

from ..plan import TransferPlan
from . import jobs as _jobs
from .jobcopy import KERNEL, PreparedCopy, copy_jobs, prepare, prepare_gather, prepare_scatter
from .operands import check_buffer
from .pairs import gather_pairs, scatter_pairs
from .runtime import alloc_on, caller_ready_event, caller_stream_ptr, large_params, no_large_params

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


def gather(plan: TransferPlan, src: Any, out: Any, *, stream: Any = None, device: int | None = None) -> None:
    """Copy ``plan``'s source side (tensors ``src``: KVLayout or per-tensor addresses/arrays) into
    the contiguous buffer ``out`` (address or array) in stream order. See :func:`copy_jobs`.

    Raises:
        LayoutError: ``out`` is smaller than the plan, or malformed arguments.
        TransportError, KernelCompileError, BackendUnavailableError: as :func:`copy_jobs`.
    """
    check_buffer(out, plan.nbytes, "gather output")
    if plan.block_pairs is not None:  # addresses computed on the GPU: no per-job host work
        gather_pairs(plan.block_pairs, src, out, stream=stream, device=device)
        return
    copy_jobs(_jobs.gather_jobs(plan), src, [out], stream=stream, device=device)


def scatter(plan: TransferPlan, buf: Any, dst: Any, *, stream: Any = None, device: int | None = None) -> None:
    """Copy the stream-ordered buffer ``buf`` into ``plan``'s destination side (tensors ``dst``).

    Raises:
        LayoutError: ``buf`` is smaller than the plan, or malformed arguments.
        TransportError, KernelCompileError, BackendUnavailableError: as :func:`copy_jobs`.
    """
    check_buffer(buf, plan.nbytes, "scatter input")
    if plan.block_pairs is not None:
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
