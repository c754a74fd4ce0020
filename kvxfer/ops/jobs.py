"""Copy jobs as the CUDA kernel reads them: absolute addresses, access widths, per-CTA shares.

Layer: ops, pure numpy (no CUDA). :mod:`kvxfer.ops.jobcopy` uploads what this module builds;
keeping it here lets CPU tests check every rule the kernel relies on.

- :func:`gather_jobs` / :func:`scatter_jobs` turn a :class:`~kvxfer.plan.TransferPlan` into jobs
  whose other side is one contiguous buffer (tensor 0, laid out in stream order).
- :func:`device_jobs` resolves ``src_t``/``dst_t`` against per-tensor base addresses and picks
  each job's access width (16-byte vectors when everything in the job is 16-byte aligned).
- :func:`partition` cuts the byte stream into one contiguous share per worker (a warp), so that
  no warp searches the job list and every warp moves about the same number of bytes;
  :func:`tasks` packs the shares as the kernel reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import LayoutError
from ..plan import JOB_DTYPE, TransferPlan

__all__ = [
    "DEVICE_JOB_DTYPE",
    "SPAN_DTYPE",
    "TASK_DTYPE",
    "MAX_UNIT_LOG2",
    "gather_jobs",
    "scatter_jobs",
    "as_plan",
    "device_jobs",
    "partition",
    "tasks",
]

# Must match `struct KvJob` in kvxfer/csrc/kv_copy.cu.
DEVICE_JOB_DTYPE = np.dtype(
    [
        ("src", np.uint64),
        ("dst", np.uint64),
        ("nbytes", np.int64),
        ("src_run", np.int64),
        ("src_stride", np.int64),
        ("dst_run", np.int64),
        ("dst_stride", np.int64),
        ("unit", np.int64),
    ]
)
assert DEVICE_JOB_DTYPE.itemsize == 64

# What partition() returns: where each worker's share starts (job index, byte offset).
SPAN_DTYPE = np.dtype([("job", np.int64), ("off", np.int64)])

# Must match `struct KvTask` in kvxfer/csrc/kv_copy.cu: one per warp, carrying its first job.
TASK_DTYPE = np.dtype(
    [("job", np.int64), ("off", np.int64), ("end_job", np.int64), ("end_off", np.int64), ("first", DEVICE_JOB_DTYPE)]
)
assert TASK_DTYPE.itemsize == 96

MAX_UNIT_LOG2 = 4  # 16-byte accesses


def _contiguous_side(jobs: np.ndarray, offsets: np.ndarray, side: str) -> None:
    n = jobs[f"{side}_t"].size
    jobs[f"{side}_t"] = 0
    jobs[f"{side}_off"] = offsets[:-1]
    jobs[f"{side}_run"] = np.diff(offsets)
    jobs[f"{side}_count"] = np.ones(n, dtype=np.int64)
    jobs[f"{side}_stride"] = 0


def gather_jobs(plan: TransferPlan) -> np.ndarray:
    """Jobs that copy the source side of ``plan`` into one buffer (destination tensor 0) in stream order."""
    jobs = plan.jobs.copy()
    _contiguous_side(jobs, plan.stream_offsets, "dst")
    return jobs


def scatter_jobs(plan: TransferPlan) -> np.ndarray:
    """Jobs that copy one stream-ordered buffer (source tensor 0) into the destination side of ``plan``."""
    jobs = plan.jobs.copy()
    _contiguous_side(jobs, plan.stream_offsets, "src")
    return jobs


def as_plan(jobs: np.ndarray, dst_blocks: np.ndarray | None = None) -> TransferPlan:
    """Wrap a job array (JOB_DTYPE) as a TransferPlan, computing its stream offsets.

    Raises:
        LayoutError: ``jobs`` is not a JOB_DTYPE array or a job's two sides disagree in size.
    """
    _check_jobs(jobs)
    sizes = jobs["src_run"] * jobs["src_count"]
    offsets = np.zeros(jobs.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    blocks = np.zeros(0, dtype=np.int64) if dst_blocks is None else np.asarray(dst_blocks, dtype=np.int64)
    return TransferPlan(jobs=jobs, stream_offsets=offsets, dst_blocks=blocks)


def _check_jobs(jobs: np.ndarray) -> None:
    if not isinstance(jobs, np.ndarray) or jobs.dtype != JOB_DTYPE or jobs.ndim != 1:
        raise LayoutError(f"copy jobs must be a 1-D numpy array of JOB_DTYPE; got {getattr(jobs, 'dtype', type(jobs))!r}")
    if jobs.size == 0:
        return
    for side in ("src", "dst"):
        if (jobs[f"{side}_run"] < 1).any() or (jobs[f"{side}_count"] < 1).any():
            bad = int(np.flatnonzero((jobs[f"{side}_run"] < 1) | (jobs[f"{side}_count"] < 1))[0])
            raise LayoutError(f"job {bad}: {side} runs and counts must be positive")
        if (jobs[f"{side}_off"] < 0).any() or (jobs[f"{side}_stride"] < 0).any():
            raise LayoutError(f"copy jobs hold a negative {side} offset or stride")
    mismatch = jobs["src_run"] * jobs["src_count"] != jobs["dst_run"] * jobs["dst_count"]
    if mismatch.any():
        bad = int(np.flatnonzero(mismatch)[0])
        j = jobs[bad]
        raise LayoutError(
            f"job {bad}: source holds {int(j['src_run']) * int(j['src_count'])} bytes but destination "
            f"{int(j['dst_run']) * int(j['dst_count'])}; both sides must match"
        )


def _bases(bases: Sequence[int] | np.ndarray, idx: np.ndarray, side: str) -> np.ndarray:
    arr = np.asarray([int(b) for b in bases] if not isinstance(bases, np.ndarray) else bases).astype(np.uint64)
    if arr.ndim != 1:
        raise LayoutError(f"{side} base addresses must be a flat list")
    if idx.size and (idx.min() < 0 or idx.max() >= arr.size):
        raise LayoutError(f"jobs name {side} tensor {int(idx.max() if idx.max() >= arr.size else idx.min())} but {arr.size} {side} base addresses were given")
    return arr[idx]


def _trailing_zeros_capped(x: np.ndarray, cap: int) -> np.ndarray:
    out = np.zeros(x.size, dtype=np.int64)
    for b in range(1, cap + 1):
        out += ((x & np.uint64((1 << b) - 1)) == 0).astype(np.int64)
    return out


def device_jobs(jobs: np.ndarray, src_bases: Sequence[int] | np.ndarray, dst_bases: Sequence[int] | np.ndarray) -> np.ndarray:
    """Resolve ``jobs`` (JOB_DTYPE) against base addresses into DEVICE_JOB_DTYPE records.

    ``src_bases[t]`` is the address of source tensor ``t``'s first byte (same for ``dst``).
    Each record's ``unit`` is log2 of the widest access (at most 16 bytes) that divides both
    addresses and every run and stride of the job. Strides of single-run sides are ignored.

    Raises:
        LayoutError: malformed jobs, or a job naming a tensor without a base address.
    """
    _check_jobs(jobs)
    out = np.empty(jobs.size, dtype=DEVICE_JOB_DTYPE)
    if jobs.size == 0:
        return out
    out["src"] = _bases(src_bases, jobs["src_t"], "source") + jobs["src_off"].astype(np.uint64)
    out["dst"] = _bases(dst_bases, jobs["dst_t"], "destination") + jobs["dst_off"].astype(np.uint64)
    out["nbytes"] = jobs["src_run"] * jobs["src_count"]
    for side in ("src", "dst"):
        out[f"{side}_run"] = jobs[f"{side}_run"]
        out[f"{side}_stride"] = np.where(jobs[f"{side}_count"] > 1, jobs[f"{side}_stride"], 0)
    mix = out["src"] | out["dst"]
    for f in ("src_run", "src_stride", "dst_run", "dst_stride"):
        mix |= out[f].astype(np.uint64)
    out["unit"] = _trailing_zeros_capped(mix, MAX_UNIT_LOG2)
    return out


def partition(djobs: np.ndarray, n_ctas: int) -> np.ndarray:
    """Cut the stream of ``djobs`` into ``n_ctas`` contiguous shares (one per worker) of about equal bytes.

    Returns ``n_ctas + 1`` SPAN_DTYPE entries: worker ``b`` copies from entry ``b`` up to entry
    ``b + 1`` (job index, byte offset in that job). Every cut falls on a multiple of its job's
    access width; the last entry is ``(len(djobs), 0)``.

    Raises:
        ValueError: ``n_ctas`` < 1 or no jobs.
    """
    if n_ctas < 1 or djobs.size == 0:
        raise ValueError("partition needs at least one job and one CTA")
    nbytes = djobs["nbytes"]
    starts = np.zeros(nbytes.size + 1, dtype=np.int64)
    np.cumsum(nbytes, out=starts[1:])
    total = int(starts[-1])
    cuts = (np.arange(n_ctas + 1, dtype=np.int64) * total) // n_ctas if total < (1 << 62) // max(n_ctas, 1) else np.array(
        [b * total // n_ctas for b in range(n_ctas + 1)], dtype=np.int64
    )
    job = np.searchsorted(starts, cuts, side="right") - 1
    job = np.minimum(job, nbytes.size - 1)
    off = cuts - starts[job]
    width = np.left_shift(np.int64(1), djobs["unit"][job])
    off = (off + width - 1) // width * width
    past = off >= nbytes[job]
    job = np.where(past, job + 1, job)
    off = np.where(past, 0, off)
    spans = np.empty(n_ctas + 1, dtype=SPAN_DTYPE)
    spans["job"] = job
    spans["off"] = off
    return spans


def tasks(djobs: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """One TASK_DTYPE record per worker (warp) from :func:`partition`'s spans: its share and a
    copy of its first job (zeros for an empty share at the end of the stream)."""
    out = np.zeros(spans.size - 1, dtype=TASK_DTYPE)
    out["job"], out["off"] = spans["job"][:-1], spans["off"][:-1]
    out["end_job"], out["end_off"] = spans["job"][1:], spans["off"][1:]
    has = out["job"] < djobs.size
    out["first"][has] = djobs[out["job"][has]]
    return out
