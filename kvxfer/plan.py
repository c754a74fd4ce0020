"""Planning: (source blocks, destination blocks, layers) -> validated, coalesced copy jobs.

Layer: pure functions over numpy arrays, below the backends and above the pack kernels. Both
peers compute the same plan from the same inputs, so the order of bytes on the wire (the
*stream*) needs no negotiation: it is the order of the jobs, each job's ``count`` runs in turn.

A job copies ``src_count`` runs of ``src_run`` bytes (``src_stride`` apart, from ``src_off`` in
source tensor ``src_t``) to ``dst_count`` runs of ``dst_run`` bytes in destination tensor
``dst_t``; both sides hold the same number of bytes. Offsets are relative to each tensor's first
byte; this is the two-level strided descriptor that the CUDA kernels in kvxfer/csrc/ consume.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._memo import IdentityMemo
from .errors import BlockIdError, KvxferError
from .layout import LayoutGeometry

__all__ = ["JOB_DTYPE", "BlockPairs", "TransferPlan", "as_block_ids", "plan_transfer", "transfer_shape",
           "validate_block_ids"]

JOB_DTYPE = np.dtype(
    [
        ("src_t", np.int64),
        ("dst_t", np.int64),
        ("src_off", np.int64),
        ("src_run", np.int64),
        ("src_count", np.int64),
        ("src_stride", np.int64),
        ("dst_off", np.int64),
        ("dst_run", np.int64),
        ("dst_count", np.int64),
        ("dst_stride", np.int64),
    ]
)


@dataclass(frozen=True, slots=True)
class BlockPairs:
    """A plan between two layouts whose blocks share one segment structure, kept compact.

    ``pairs`` lists (tensor, source segment, destination segment) in stream order; the blocks
    move as runs ``[run_starts[i], run_starts[i] + run_lengths[i])`` of the block lists where a
    pair coalesces, block by block where it does not. Kernels that compute addresses from block
    ids on the GPU consume this form directly; :meth:`jobs` expands it into copy jobs.
    """

    pairs: np.ndarray  # _PAIR_DTYPE
    src_blocks: np.ndarray
    dst_blocks: np.ndarray
    run_starts: np.ndarray
    run_lengths: np.ndarray
    block_nbytes: int  # bytes one block moves through ``pairs``

    @property
    def nbytes(self) -> int:
        return self.block_nbytes * int(self.src_blocks.size)

    @property
    def nruns(self) -> int:
        """Contiguous source runs the plan reads (without expanding jobs)."""
        return _source_runs(self.pairs, int(self.run_lengths.size), int(self.src_blocks.size))

    def jobs(self) -> np.ndarray:
        """The copy jobs (JOB_DTYPE) in stream order."""
        pairs, s, d = self.pairs, self.src_blocks, self.dst_blocks
        coal = pairs["coal"]
        if pairs.size == 0 or s.size == 0:
            return np.zeros(0, dtype=JOB_DTYPE)
        grids = []
        # a (pairs x jobs-per-pair) grid where consecutive pairs agree on coalescing
        for rows in np.split(np.arange(pairs.size), np.flatnonzero(np.diff(coal)) + 1):
            pr = pairs[rows]
            if pr["coal"][0]:
                sb, db, nblk = s[self.run_starts], d[self.run_starts], self.run_lengths
            else:
                sb, db, nblk = s, d, np.ones(s.size, dtype=np.int64)
            g = np.empty((pr.size, sb.size), dtype=JOB_DTYPE)
            col = lambda f: pr[f][:, None]  # noqa: E731
            g["src_t"] = col("t")
            g["dst_t"] = col("t")
            g["src_off"] = sb[None, :] * col("src_bstride") + col("src_off")
            g["dst_off"] = db[None, :] * col("dst_bstride") + col("dst_off")
            g["src_run"] = nblk[None, :] * col("src_run")
            g["dst_run"] = nblk[None, :] * col("dst_run")
            g["src_count"] = col("src_count")
            g["dst_count"] = col("dst_count")
            g["src_stride"] = col("src_stride")
            g["dst_stride"] = col("dst_stride")
            grids.append(g.reshape(-1))
        return grids[0] if len(grids) == 1 else np.concatenate(grids)


def _source_runs(pairs: np.ndarray, runs: int, nblocks: int) -> int:
    """Contiguous source runs of ``nblocks`` blocks moving through ``pairs`` in ``runs``
    coalesced runs: a pair that coalesces reads each run at once, one that does not each block."""
    if nblocks == 0:
        return 0
    return int((pairs["src_count"] * np.where(pairs["coal"], runs, nblocks)).sum())


RAMP = 4  # growth between consecutive ramp pieces (chunk_bounds): gather/scatter outpace the wire


def _ramp(first: int, target: int) -> list[int]:
    """Piece sizes from ``first`` growing by :data:`RAMP` while under ``target`` (none for 0)."""
    sizes: list[int] = []
    size = first
    while 0 < size < target:
        sizes.append(size)
        size *= RAMP
    return sizes


def _piece_cuts(n: int, target: int, edge: int, first: int = 0) -> tuple[list[int], int]:
    """Wanted stream offsets of piece ends (the last one is ``n``): ``target``-sized pieces,
    with ramps at both ends when the transfer holds them (see chunk_bounds): the opening one
    from ``first`` (``edge`` when 0), the closing one down to ``edge``; and how many of the
    last cuts belong to the closing ramp."""
    head, tail = _ramp(first or edge, target), _ramp(edge, target)
    if not tail or sum(head) + sum(tail) + target > n:  # too small for a ramp: plain pieces
        head = tail = []
    mid_lo, mid_hi = sum(head), n - sum(tail)
    k = max(1, math.ceil((mid_hi - mid_lo) / target - 0.01))  # "about target": 1% over is one piece
    cuts, pos = [], 0
    for h in head:
        pos += h
        cuts.append(pos)
    cuts += [mid_lo + (mid_hi - mid_lo) * i // k for i in range(1, k + 1)]
    pos = mid_hi
    for h in reversed(tail):
        pos += h
        cuts.append(pos)
    return cuts, len(tail) + 1 if tail else 0  # the closing ramp starts at mid_hi


class TransferPlan:
    """Copy jobs for one transfer, in stream order, with their byte offsets in the stream.

    Built from jobs (any layout change), or from :class:`BlockPairs` (blocks of the same
    structure on both sides), in which case the jobs are only expanded when asked for: the
    CUDA IPC path copies straight from the compact form.
    """

    __slots__ = ("_jobs", "_offsets", "dst_blocks", "block_pairs")

    def __init__(self, jobs: np.ndarray | None = None, stream_offsets: np.ndarray | None = None,
                 dst_blocks: np.ndarray | None = None, block_pairs: BlockPairs | None = None):
        if jobs is None and block_pairs is None:
            raise ValueError("a TransferPlan needs jobs or block pairs")
        self._jobs = jobs
        self._offsets = stream_offsets
        self.block_pairs = block_pairs
        self.dst_blocks = dst_blocks if dst_blocks is not None else (
            block_pairs.dst_blocks if block_pairs is not None else np.zeros(0, dtype=np.int64))

    @property
    def jobs(self) -> np.ndarray:
        """Copy jobs (JOB_DTYPE), in stream order."""
        if self._jobs is None:
            assert self.block_pairs is not None
            self._jobs = self.block_pairs.jobs()
        return self._jobs

    @property
    def stream_offsets(self) -> np.ndarray:
        """int64, ``len(jobs) + 1``: where each job's bytes start in the stream."""
        if self._offsets is None:
            j = self.jobs
            off = np.zeros(j.size + 1, dtype=np.int64)
            np.cumsum(j["src_run"] * j["src_count"], out=off[1:])
            self._offsets = off
        return self._offsets

    @property
    def nbytes(self) -> int:
        if self._offsets is None and self.block_pairs is not None:
            return self.block_pairs.nbytes
        return int(self.stream_offsets[-1])

    @property
    def nruns(self) -> int:
        """Contiguous source runs of the plan (cheap for block-pair plans: no job expansion)."""
        if self._jobs is None and self.block_pairs is not None:
            return self.block_pairs.nruns
        j = self.jobs
        return int(j["src_count"].sum()) if j.size else 0

    def chunk_bounds(self, target: int, edge: int = 0, first: int = 0) -> list[tuple[int, int, int, int]]:
        """The stream cut into consecutive pieces of about ``target`` bytes, for pipelining:
        ``(first pair, end pair, first stream byte, end byte)`` of each. A piece is a run of
        whole (tensor, segment) pairs of :attr:`block_pairs`, so it is a plan of its own whose
        stream is exactly that slice of this plan's stream. A plan without block pairs, or that
        fits ``target``, is one piece (its pair bounds then mean "everything").

        ``edge`` > 0 ramps the pieces at both ends: the first is about ``edge`` bytes, each next
        one up to :data:`RAMP` times the one before, until ``target``; the last pieces mirror
        that. In a gather -> move -> scatter pipeline the wire then starts after a short gather
        and the last scatter is short too (the copies run several times faster than the wire).
        ``first`` > 0 starts the opening ramp there instead (the first piece must stay on the
        wire while the host prepares the next; the closing ramp still ends at ``edge``).
        No ramp when the transfer is too small for one.
        """
        n = self.nbytes
        bp = self.block_pairs
        if bp is None or bp.pairs.size <= 1 or n <= target or bp.src_blocks.size == 0:
            return [(0, 0 if bp is None else int(bp.pairs.size), 0, n)]
        # the cuts depend on the pairs and the block count only: both sides of every transfer of
        # that many blocks between two layouts cut alike, so they are worked out once
        return list(_BOUNDS.get((bp.pairs,), (int(bp.src_blocks.size), target, edge, first),
                                lambda: _chunk_bounds(bp.pairs, int(bp.src_blocks.size), target, edge, first)))

    def piece(self, first: int, end: int) -> TransferPlan:
        """The plan of pairs ``[first, end)`` (a piece from :meth:`chunk_bounds`)."""
        bp = self.block_pairs
        if bp is None or (first == 0 and end == bp.pairs.size):
            return self
        sub = bp.pairs[first:end]
        return TransferPlan(block_pairs=BlockPairs(sub, bp.src_blocks, bp.dst_blocks, bp.run_starts, bp.run_lengths,
                                                   _bytes_per_block(sub)))

    def runs(self, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Elementary contiguous runs of one side (``"src"`` or ``"dst"``) in stream order.

        Returns (tensor index, byte offset in tensor, length) arrays.
        """
        j = self.jobs
        count, run, stride, off = j[f"{side}_count"], j[f"{side}_run"], j[f"{side}_stride"], j[f"{side}_off"]
        tensor = np.repeat(j[f"{side}_t"], count)
        lengths = np.repeat(run, count)
        starts = np.repeat(off, count)
        # position of each run inside its job: 0..count-1
        first = np.cumsum(count) - count
        within = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(first, count)
        return tensor, starts + within * np.repeat(stride, count), lengths

    def __repr__(self) -> str:
        return f"<TransferPlan {self.nbytes} B, {self.dst_blocks.size} blocks>"


_BOUNDS: IdentityMemo[tuple[tuple[int, int, int, int], ...]] = IdentityMemo()


def _chunk_bounds(pairs: np.ndarray, nblocks: int, target: int, edge: int,
                  first: int = 0) -> tuple[tuple[int, int, int, int], ...]:
    """:meth:`TransferPlan.chunk_bounds` of ``nblocks`` blocks through ``pairs``."""
    ends = np.cumsum(pairs["src_run"] * pairs["src_count"] * nblocks)
    cuts, tail = _piece_cuts(int(ends[-1]), target, edge, first)
    # a wanted cut moves to the first pair end at or after it; in the closing ramp, to the
    # last pair end at or before it (so the last pieces stay small, as the first ones)
    up = np.searchsorted(ends, cuts, side="left")
    down = np.searchsorted(ends, cuts, side="right") - 1
    at = np.where(np.arange(len(cuts)) >= len(cuts) - tail, np.maximum(down, 0), up)
    at = np.unique(np.minimum(at, ends.size - 1))
    out: list[tuple[int, int, int, int]] = []
    first, lo = 0, 0
    for p in at.tolist():
        end = int(ends[p])
        if end > lo:
            out.append((first, p + 1, lo, end))
            first, lo = p + 1, end
    return tuple(out)  # the last cut is n, the last pair's end: every pair is in a piece


def as_block_ids(ids: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    """Turn a block-id list into a 1-D int64 array; BlockIdError when it is not integers."""
    if type(ids) is np.ndarray and ids.dtype == np.int64 and ids.ndim == 1:  # the common case, checked cheaply
        return ids
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise BlockIdError(f"{what} must be a 1-D list of block ids; got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise BlockIdError(f"{what} must hold integers; got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


_FEW = 32  # block lists up to this long take pure-Python paths (numpy's per-call cost dominates)


def block_id_range(ids: np.ndarray) -> tuple[int, int]:
    """(smallest, largest) of a non-empty block-id array; a few ids through Python's min/max,
    which beat two numpy reductions there."""
    if ids.size <= _FEW:
        few = ids.tolist()
        return min(few), max(few)
    return int(ids.min()), int(ids.max())


_BITMAP_MIN = 1 << 16  # duplicate checks use a flag per block up to this many blocks ...
_BITMAP_PER_ID = 16  # ... or up to this many blocks per id checked (else a sort)


def validate_block_ids(ids: np.ndarray, num_blocks: int, what: str, *, unique: bool) -> None:
    """Bounds-check (and optionally uniqueness-check) block ids against ``num_blocks``."""
    if ids.size == 0:
        return
    lo, hi = block_id_range(ids)
    if lo < 0 or hi >= num_blocks:
        bad = ids[(ids < 0) | (ids >= num_blocks)]
        raise BlockIdError(
            f"{what} out of range: {bad[:8].tolist()}{'...' if bad.size > 8 else ''}; "
            f"valid ids are 0..{num_blocks - 1}"
        )
    if unique and ids.size > 1:
        if ids.size <= _FEW:  # a request of few blocks: a set beats a sort
            dup = len(set(ids.tolist())) != ids.size
        elif num_blocks <= max(_BITMAP_MIN, _BITMAP_PER_ID * ids.size):
            # ids are in range by now: mark each one in a flag per block and count the marks
            # (linear; a sort of 4096 ids costs 2-4x more, and this is on every transfer's path)
            seen = np.zeros(num_blocks, dtype=np.bool_)
            seen[ids] = True
            dup = int(np.count_nonzero(seen)) != ids.size
        else:
            srt = np.sort(ids)
            dup = bool((srt[1:] == srt[:-1]).any())
        if dup:
            uniq, counts = np.unique(ids, return_counts=True)
            raise BlockIdError(f"{what} has duplicates: {uniq[counts > 1][:8].tolist()}; each destination block may be written once")


_PAIR_DTYPE = np.dtype(
    [
        ("t", np.int64),
        ("coal", np.bool_),
        ("src_bstride", np.int64),
        ("dst_bstride", np.int64),
        ("src_off", np.int64),
        ("dst_off", np.int64),
        ("src_run", np.int64),
        ("dst_run", np.int64),
        ("src_count", np.int64),
        ("dst_count", np.int64),
        ("src_stride", np.int64),
        ("dst_stride", np.int64),
    ]
)


@functools.lru_cache(maxsize=256)
def _segment_pairs(src: LayoutGeometry, dst: LayoutGeometry, layers: tuple[int, ...] | None) -> np.ndarray:
    """(tensor, src segment, dst segment) pairs of two compatible layouts, in stream order.

    Cached: an engine moves blocks between the same two layouts again and again.
    Raises LayoutMismatchError when the selected tensors' blocks are not interchangeable.
    """
    src.check_compatible(dst, None if layers is None else np.asarray(layers, dtype=np.int64))
    rows = []
    for t in range(len(src.tensors)) if layers is None else layers:
        st, dt = src.tensors[t], dst.tensors[t]
        for ss, ds in zip(st.segments, dt.segments):
            coal = st.block_stride == ss.run and dt.block_stride == ds.run
            rows.append((t, coal, st.block_stride, dt.block_stride, ss.offset, ds.offset, ss.run, ds.run,
                         ss.count, ds.count, ss.stride, ds.stride))
    out = np.array(rows, dtype=_PAIR_DTYPE)
    out.flags.writeable = False
    return out


def _bytes_per_block(pairs: np.ndarray) -> int:
    return int((pairs["src_run"] * pairs["src_count"]).sum())


_PAIRS_BY_ID: IdentityMemo[tuple[np.ndarray, int]] = IdentityMemo()


def _pairs_for(src: LayoutGeometry, dst: LayoutGeometry, layers: tuple[int, ...] | None) -> tuple[np.ndarray, int]:
    """:func:`_segment_pairs` and the bytes per block, found by the geometries' identity first:
    a peer's geometry is an equal but distinct object, and comparing two equal geometries walks
    every tensor (tens of microseconds per transfer for a 32-layer model)."""
    def make() -> tuple[np.ndarray, int]:
        pairs = _segment_pairs(src, dst, layers)
        return pairs, _bytes_per_block(pairs)

    return _PAIRS_BY_ID.get((src, dst), layers, make)


def _checked_layers(layers: np.ndarray | None, ntensors: int) -> tuple[int, ...] | None:
    """``layers`` as the key of :func:`_pairs_for`, checked. Raises BlockIdError."""
    if layers is None:
        return None
    layers = np.asarray(layers, dtype=np.int64)
    if layers.size and (layers.min() < 0 or layers.max() >= ntensors):
        raise BlockIdError(f"layers {layers.tolist()} out of range; valid are 0..{ntensors - 1}")
    if np.unique(layers).size != layers.size:
        # a peer naming a layer twice would have the same destination bytes written twice
        raise BlockIdError(f"layers {layers.tolist()} name a tensor more than once")
    return tuple(layers.tolist())


def _run_gaps(s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Nonzero at i where block i + 1 does not extend block i's run: either side's next id is
    not the next block (two temporaries, the rest in place: this is on every transfer's path)."""
    gap = s[1:] - s[:-1]
    gap -= 1
    dgap = d[1:] - d[:-1]
    dgap -= 1
    gap |= dgap
    return gap


def _run_count(s: np.ndarray, d: np.ndarray) -> int:
    """How many runs of blocks consecutive on both sides the lists hold."""
    return 1 + int(np.count_nonzero(_run_gaps(s, d))) if s.size else 0


class _SharedPrefix:
    """Views of the first ``n`` entries of one read-only int64 array made by ``make(size)``,
    regrown past its size: constant arrays handed out without building them per call."""

    def __init__(self, make: Callable[[int], np.ndarray]):
        self._make = make
        self._arr = self._grown(1 << 16)

    def _grown(self, size: int) -> np.ndarray:
        arr = self._make(size)
        arr.flags.writeable = False
        return arr

    def __call__(self, n: int) -> np.ndarray:
        arr = self._arr
        if n > arr.size:
            arr = self._arr = self._grown(max(n, 2 * arr.size))
        return arr[:n]


#: 0, 1, ..., n - 1 (read-only)
shared_arange = _SharedPrefix(lambda size: np.arange(size, dtype=np.int64))
#: n ones (read-only)
shared_ones = _SharedPrefix(lambda size: np.ones(size, dtype=np.int64))


def _runs(s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of blocks consecutive on both sides, for more than
    :data:`_FEW` blocks. Every block its own run (random ids, the usual case) gives shared
    read-only arrays: no arrays built on the path."""
    n = int(s.size)
    gaps = _run_gaps(s, d)
    if np.count_nonzero(gaps) == n - 1:  # counting is cheaper than listing every break
        return shared_arange(n), shared_ones(n)
    breaks = np.flatnonzero(gaps)
    starts = np.empty(breaks.size + 1, dtype=np.int64)
    starts[0] = 0
    np.add(breaks, 1, out=starts[1:])
    return starts, np.diff(starts, append=n)


_PREFIX = 64  # ids scanned first by transfer_shape(enough=...)


def transfer_shape(src: LayoutGeometry, dst: LayoutGeometry, src_blocks: np.ndarray, dst_blocks: np.ndarray,
                   layers: np.ndarray | None = None, *,
                   enough: Callable[[int], int] | None = None) -> tuple[int, int] | None:
    """(bytes, contiguous source runs) of the plan :func:`plan_transfer` would make of these
    int64 id arrays, without validating the ids and without building the plan: what a backend
    needs to decide how a transfer moves before it is planned. None when the lists or layers
    are not plannable as given (planning them then raises the error).

    ``enough(bytes)``: a run count from which the exact count no longer matters to the caller
    (its decision is the same for every count at least that large). The runs of the first
    :data:`_PREFIX` ids are counted first, and when they already reach that many the count
    returned is theirs, a lower bound: a read of 4096 random blocks is decided from 64 ids.
    """
    if src_blocks.size != dst_blocks.size:
        return None
    try:
        pairs, block_nbytes = _pairs_for(src, dst, _checked_layers(layers, len(src.tensors)))
    except KvxferError:
        return None
    n = int(src_blocks.size)
    nbytes = n * block_nbytes
    if enough is not None and n > _PREFIX:
        # runs among the first ids <= runs among all: a lower bound of the source runs
        some = _source_runs(pairs, _run_count(src_blocks[:_PREFIX], dst_blocks[:_PREFIX]), n)
        if some >= enough(nbytes):
            return nbytes, some
    return nbytes, _source_runs(pairs, _run_count(src_blocks, dst_blocks), n)


def plan_transfer(
    src: LayoutGeometry,
    dst: LayoutGeometry,
    src_blocks: Sequence[int] | np.ndarray,
    dst_blocks: Sequence[int] | np.ndarray,
    layers: np.ndarray | None = None,
    *,
    check_src: bool = True,
    check_dst: bool = True,
) -> TransferPlan:
    """Validate block lists and coalesce them into copy jobs.

    ``layers`` holds tensor indices (see :meth:`KVLayout.resolve_layers`); None means all.
    Runs of blocks that are consecutive on both sides become one job wherever both tensors
    store consecutive blocks back to back.

    ``check_src`` / ``check_dst`` False skips the range (and, for the destination, duplicate)
    check of that side's ids: for a responder, whose peer checked its own ids and whose copies
    never address the peer's memory by them (the lists' lengths are checked either way).

    Raises:
        BlockIdError: lengths differ, ids out of range on either side, duplicate destinations.
        LayoutMismatchError: the two layouts' blocks are not interchangeable.
    """
    s = as_block_ids(src_blocks, "source block ids")
    d = as_block_ids(dst_blocks, "destination block ids")
    if s.size != d.size:
        raise BlockIdError(f"{s.size} source blocks but {d.size} destination blocks; the lists must have equal length")
    if check_src:
        validate_block_ids(s, src.num_blocks, "source block ids", unique=False)
    if check_dst:
        validate_block_ids(d, dst.num_blocks, "destination block ids", unique=True)
    pairs, block_nbytes = _pairs_for(src, dst, _checked_layers(layers, len(src.tensors)))

    if 0 < s.size <= _FEW:
        sl, dl = s.tolist(), d.tolist()
        cut = [0, *(i for i in range(1, len(sl)) if sl[i] - sl[i - 1] != 1 or dl[i] - dl[i - 1] != 1), len(sl)]
        starts = np.array(cut[:-1], dtype=np.int64)
        lengths = np.array([b - a for a, b in zip(cut, cut[1:])], dtype=np.int64)
    elif s.size:
        starts, lengths = _runs(s, d)
    else:
        starts = lengths = np.zeros(0, dtype=np.int64)

    return TransferPlan(block_pairs=BlockPairs(pairs, s, d, starts, lengths, block_nbytes))
