"""Block-pair copies: one launch that computes every address on the GPU from block ids.

Layer: ops, above :mod:`kvxfer.ops.kernels` (the launches and the structs they read) and
:mod:`kvxfer.ops.runtime`; beside :mod:`kvxfer.ops.jobcopy`. For a plan between layouts of the
same segment structure (the usual case: :class:`~kvxfer.plan.BlockPairs`), the host uploads
only the (tensor, segment) pairs and the block-id runs, a few KiB, instead of one record per
layer and block; the ``kv_copy_pairs`` kernel in ``kvxfer/csrc/kv_copy.cu`` expands them. This
keeps the host cost of a CUDA IPC transfer flat in the number of layers and blocks
(``kv_copy_jobs`` remains the path for layout changes).

When those records fit in 4,000 bytes (a small transfer: a few blocks), they are not uploaded at
all: ``kv_copy_pairs_inline`` takes them as its one by-value parameter, launched straight through
``cuLaunchKernel``. No staging copy, no device buffer, and the launch can be captured in a CUDA
graph as is; on 2x H200 the ``small`` gather runs at 800 GB/s this way against 550 uploaded
(``bench/results/pack_h200_2026-11-27_inline.json``).

A pipelined gather or scatter (:class:`PairPieces`, the UCX backend's packed path) goes further
where the GPU takes 32 KiB of parameters (CUDA 12.1 and later): ``kv_copy_pairs_ids`` gets
the pair records and the block ids themselves, as int32, one block per run; thousands of
blocks fit (4,096 ids and 64 pairs take 22 KiB). Each piece is the same parameter block with
its own item range. No upload, no device buffer, no staging slot or event per transfer: the
host work before the first piece's launch is writing the ids once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._memo import IdentityMemo
from ..errors import KernelCompileError
from ..plan import BlockPairs, shared_arange
from . import kernels, operands
from .kernels import (BUF_DST, BUF_NONE, BUF_SRC, IDS_DTYPE, IDS_KERNEL, IDS_WORDS, INLINE_DTYPE, INLINE_KERNEL,
                      INLINE_WORDS, PAIR_DTYPE, PAIRS_KERNEL, RUN_FIELDS)
from .loader import KernelSpec, cupy
from .runtime import H2D, alloc_on, check_not_capturing, device_runtime

__all__ = [
    "BUF_DST", "BUF_NONE", "BUF_SRC", "IDS_DTYPE", "IDS_KERNEL", "IDS_WORDS", "INLINE_DTYPE", "INLINE_KERNEL",
    "INLINE_WORDS", "PAIRS_KERNEL", "PAIR_DTYPE", "RUN_FIELDS", "PairPieces", "PairsLaunch", "PreparedPairs",
    "copy_block_pairs", "gather_pairs", "ids_params_fit", "pair_records", "prepare_pairs", "resolve_block_pairs",
    "scatter_pairs", "split_shift_for",
]

MAX_ITEM_BYTES = 64 << 10  # one warp copies at most this much per item: long runs are split
MIN_PART_BYTES = 1 << 10  # items are cut into parts for idle warps, never below this size


def _unit(mix: np.ndarray) -> np.ndarray:
    out = np.zeros(mix.size, dtype=np.int64)
    for b in range(1, 5):
        out += ((mix & np.uint64((1 << b) - 1)) == 0).astype(np.int64)
    return out


_INLINE_W0 = INLINE_DTYPE.fields["w"][1]  # byte offset of the records in the block
_IDS_W0 = IDS_DTYPE.fields["w"][1]
_IDS_NITEMS, _IDS_ITEM_BASE = IDS_DTYPE.fields["nitems"][1] // 8, IDS_DTYPE.fields["item_base"][1] // 8
_INT32_MAX = 2**31 - 1


def ids_params_fit(bp: BlockPairs, buffer_side: int) -> bool:
    """Whether a gather (``buffer_side`` :data:`BUF_DST`) or scatter (:data:`BUF_SRC`) of ``bp``
    can run as ``kv_copy_pairs_ids``: its pair records and the ids of its tensor side, as int32,
    fit the parameter block, and one block per run lays out the stream as the coalesced form
    does. That holds when every run is one block (random ids, the usual case), or when no pair
    whose blocks are back to back has several rows: a run of blocks through such a pair (K and
    V rows of a ``[2, blocks, ...]`` tensor) streams row by row across its blocks."""
    if buffer_side not in (BUF_SRC, BUF_DST):
        return False
    pairs, n = bp.pairs, int(bp.src_blocks.size)
    if n == 0 or pairs.size == 0 or 12 * pairs.size + -(-n // 2) > IDS_WORDS:
        return False
    if bp.run_lengths.size != n and bool((pairs["coal"] & (pairs["src_count"] != 1)).any()):
        return False
    # every id in [0, 2**31) iff their OR is: one pass instead of a min and a max
    return 0 <= int(np.bitwise_or.reduce(bp.src_blocks if buffer_side == BUF_DST else bp.dst_blocks)) <= _INT32_MAX


class _Template:
    """What the records of a (pairs, bases, buffer) hold whatever blocks move: everything but
    ``item0``, plus memoized launch decisions. Cached: a connector's transfers reuse a few."""

    __slots__ = ("pairs", "rec", "any_coal", "any_single", "per_item", "splits", "filled", "heads")

    def __init__(self, pairs: np.ndarray, rec: np.ndarray):
        self.pairs, self.rec = pairs, rec
        coal = pairs["coal"]
        self.any_coal = bool(coal.any())
        self.any_single = not bool(coal.all())
        # blocks per coalesced item: long runs are cut so that no item exceeds MAX_ITEM_BYTES
        self.per_item = max(1, MAX_ITEM_BYTES // int(pairs["src_run"][coal].max())) if self.any_coal else 1
        self.splits: dict[tuple[int, int], int] = {}
        #: (coalesced runs, single blocks) -> (records with item0, item count): read-only, shared
        self.filled: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
        #: (coalesced runs, single blocks, split, rows_inner) -> inline parameter block with
        #: everything but the run tables filled in (see _Payload)
        self.heads: dict[tuple[int, int, int, int], np.ndarray] = {}

    def split(self, rec: np.ndarray, nitems: int, warps: int) -> int:
        """:func:`split_shift_for` of records ``rec`` (this template's, any item0), memoized."""
        key = (nitems, warps)
        split = self.splits.get(key)
        if split is None:
            split = self.splits[key] = split_shift_for(rec, nitems, warps)
        return split

    def records(self, n_coal: int, n_single: int) -> tuple[np.ndarray, int]:
        key = (n_coal, n_single)
        hit = self.filled.get(key)
        if hit is None:
            rec = self.rec.copy()
            items = rec["count"] * np.where(rec["coal"], n_coal, n_single)
            csum = np.cumsum(items)
            rec["item0"] = csum - items
            rec.flags.writeable = False
            if len(self.filled) >= 64:
                self.filled.clear()
                self.heads.clear()
            hit = self.filled[key] = (rec, int(csum[-1]))
        return hit


_TEMPLATES: IdentityMemo[_Template] = IdentityMemo()


def _template(pairs: np.ndarray, src_bases: Any, dst_bases: Any, buffer_side: int, buffer: int, nblocks: int) -> _Template:
    if buffer_side not in (BUF_NONE, BUF_SRC, BUF_DST):
        raise ValueError(f"buffer_side={buffer_side}; expected BUF_NONE, BUF_SRC or BUF_DST")
    sb = b"" if buffer_side == BUF_SRC else np.asarray(src_bases, dtype=np.uint64).tobytes()
    db = b"" if buffer_side == BUF_DST else np.asarray(dst_bases, dtype=np.uint64).tobytes()
    key = (buffer_side, int(buffer), nblocks if buffer_side != BUF_NONE else 0, sb, db)
    return _TEMPLATES.get((pairs,), key, lambda: _build_template(pairs, sb, db, buffer_side, buffer, nblocks))


def _build_template(pairs: np.ndarray, sb: bytes, db: bytes, buffer_side: int, buffer: int, nblocks: int) -> _Template:
    rec = np.zeros(pairs.size, dtype=PAIR_DTYPE)
    t = pairs["t"]
    run, count = pairs["src_run"], pairs["src_count"]
    rec["src_bstride"] = pairs["src_bstride"]
    rec["dst_bstride"] = pairs["dst_bstride"]
    rec["src_stride"] = np.where(pairs["src_count"] > 1, pairs["src_stride"], 0)
    rec["dst_stride"] = np.where(pairs["dst_count"] > 1, pairs["dst_stride"], 0)
    if buffer_side != BUF_NONE:
        per_pair = run * count * nblocks  # each pair's share of the stream
        side = "src" if buffer_side == BUF_SRC else "dst"
        rec[side] = (np.cumsum(per_pair) - per_pair).astype(np.uint64) + np.uint64(buffer)
        rec[f"{side}_bstride"] = 0
        rec[f"{side}_stride"] = 0
    if buffer_side != BUF_SRC:
        rec["src"] = np.frombuffer(sb, dtype=np.uint64)[t] + pairs["src_off"].astype(np.uint64)
    if buffer_side != BUF_DST:
        rec["dst"] = np.frombuffer(db, dtype=np.uint64)[t] + pairs["dst_off"].astype(np.uint64)
    rec["run"] = run
    rec["count"] = count
    rec["coal"] = pairs["coal"]
    mix = rec["src"] | rec["dst"]
    for f in ("src_bstride", "dst_bstride", "run", "src_stride", "dst_stride"):
        mix |= rec[f].astype(np.uint64)
    rec["unit"] = _unit(mix)
    return _Template(pairs, rec)


def _uniform_items(rec: np.ndarray, nitems: int) -> int:
    """Items per pair when every pair of ``rec`` holds the same number (item0 is then exactly
    i * items, and the kernel finds a warp's pair by division instead of searching item0), else 0."""
    npairs = int(rec.size)
    per = nitems // npairs if npairs else 0
    if per and per < 2**31 and per * npairs == nitems and np.array_equal(rec["item0"], shared_arange(npairs) * per):
        return per
    return 0


_EMPTY_RUNS = np.zeros(0, dtype=np.int64)


def _records(bp: BlockPairs, src_bases: Any, dst_bases: Any, buffer_side: int,
             buffer: int) -> tuple[np.ndarray, Any, Any, int, _Template | None]:
    """(pair records, coalesced run table, single-block run table, item count, template); a
    table is an array or a :class:`_OneBlockRuns` (the same object for both when every run is
    one block)."""
    pairs = bp.pairs
    s, d = bp.src_blocks, bp.dst_blocks
    if pairs.size == 0 or s.size == 0:
        return np.zeros(pairs.size, dtype=PAIR_DTYPE), _EMPTY_RUNS, _EMPTY_RUNS, 0, None
    tmpl = _template(pairs, src_bases, dst_bases, buffer_side, buffer, int(s.size))
    if s.size <= _FEW_BLOCKS:
        return _few_records(bp, tmpl)
    coal_runs = single_runs = _EMPTY_RUNS
    n_coal = 0
    if tmpl.any_coal:  # coalesced runs, split to bounded items
        per_item = tmpl.per_item
        lens = bp.run_lengths
        if lens.size == s.size:  # every run is one block (random ids): the runs are the id lists
            coal_runs, n_coal = _OneBlockRuns(s, d), int(s.size)
        elif int(lens.max()) <= per_item:  # no run needs splitting
            pre = np.cumsum(lens) - lens
            starts = bp.run_starts
            coal_runs = np.concatenate((s[starts], d[starts], lens, pre, lens, np.zeros(lens.size, dtype=np.int64)))
            n_coal = int(lens.size)
        else:
            pieces = -(-lens // per_item)
            idx = np.repeat(np.arange(lens.size), pieces)
            within = (np.arange(idx.size, dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * per_item
            starts = bp.run_starts[idx]
            parent_len = lens[idx]
            coal_runs = np.concatenate((s[starts] + within, d[starts] + within, np.minimum(per_item, parent_len - within),
                                        (np.cumsum(lens) - lens)[idx], parent_len, within))
            n_coal = int(idx.size)
    n_single = 0
    if tmpl.any_single:  # the same table as the coalesced runs' when every run is one block
        single_runs = coal_runs if isinstance(coal_runs, _OneBlockRuns) else _OneBlockRuns(s, d)
        n_single = int(s.size)
    rec, nitems = tmpl.records(n_coal, n_single)
    return rec, coal_runs, single_runs, nitems, tmpl


class _OneBlockRuns:
    """The run table (RUN_FIELDS arrays) of blocks ``s`` -> ``d`` moved one block per run (the
    random-id case), written straight where it goes instead of built first: four of its six
    fields are constants or a count. For a 4096-block transfer this saves a 196 KB temporary
    and a copy of it on every launch's host path, where fresh memory costs page faults and
    cold caches (``bench/results/host_cold_probe_*``). One object serves both tables of a
    launch whose pairs are of both kinds (:class:`_Payload` then uploads it once)."""

    __slots__ = ("s", "d", "size", "nbytes")

    def __init__(self, s: np.ndarray, d: np.ndarray):
        self.s, self.d = s, d
        self.size = RUN_FIELDS * int(s.size)
        self.nbytes = 8 * self.size

    def write(self, out: np.ndarray) -> None:
        """Fill ``out`` (int64, ``size`` entries) with the table."""
        n = int(self.s.size)
        out[:n] = self.s
        out[n : 2 * n] = self.d
        out[2 * n : 3 * n] = 1
        out[3 * n : 4 * n] = shared_arange(n)
        out[4 * n : 5 * n] = 1
        out[5 * n :] = 0

    def array(self) -> np.ndarray:
        out = np.empty(self.size, dtype=np.int64)
        self.write(out)
        return out


def _table_array(t: np.ndarray | _OneBlockRuns) -> np.ndarray:
    return t.array() if isinstance(t, _OneBlockRuns) else t


def _write_table(t: np.ndarray | _OneBlockRuns, out: np.ndarray) -> None:
    """Write run table ``t`` into the bytes ``out`` (uint8, ``t.nbytes`` long, 8-aligned)."""
    if isinstance(t, _OneBlockRuns):
        t.write(out.view(np.int64))
    else:
        out[:] = t.view(np.uint8)


_FEW_BLOCKS = 8  # up to this many blocks, the run tables are built from Python lists (µs matter)


def _few_records(bp: BlockPairs, tmpl: _Template) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, _Template]:
    """:func:`_records` for a transfer of a few blocks: the same tables, built without the
    dozen small numpy calls of the general path (each costs about a microsecond)."""
    s, d = bp.src_blocks.tolist(), bp.dst_blocks.tolist()
    n = len(s)
    coal_runs = single_runs = _EMPTY_RUNS
    n_coal = 0
    if tmpl.any_coal:
        per_item = tmpl.per_item
        cs, cd, cn, cpre, cplen, cwithin = [], [], [], [], [], []
        pre = 0
        for st, ln in zip(bp.run_starts.tolist(), bp.run_lengths.tolist()):
            for within in range(0, ln, per_item):  # a run longer than per_item is cut into items
                cs.append(s[st] + within)
                cd.append(d[st] + within)
                cn.append(min(per_item, ln - within))
                cpre.append(pre)
                cplen.append(ln)
                cwithin.append(within)
            pre += ln
        n_coal = len(cs)
        coal_runs = np.array(cs + cd + cn + cpre + cplen + cwithin, dtype=np.int64)
    n_single = 0
    if tmpl.any_single:
        single_runs = np.array(s + d + [1] * n + list(range(n)) + [1] * n + [0] * n, dtype=np.int64)
        n_single = n
    rec, nitems = tmpl.records(n_coal, n_single)
    return rec, coal_runs, single_runs, nitems, tmpl


def pair_records(bp: BlockPairs, src_bases: np.ndarray, dst_bases: np.ndarray, *, buffer_side: int = BUF_NONE,
                 buffer: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(pair records, coalesced runs, single-block runs, item count) for ``kv_copy_pairs``.

    Each runs array holds :data:`RUN_FIELDS` arrays back to back: ``[src ids | dst ids |
    blocks per run | blocks of the stream before the parent run | blocks of the parent run |
    blocks of the parent run before this one]`` (see ``KvRun`` in ``kvxfer/csrc/kv_copy.cu``); a kind
    of run no pair uses is left empty. Coalesced runs are split so that no item exceeds
    :data:`MAX_ITEM_BYTES` (a long contiguous run would leave one warp copying it alone).

    ``buffer_side`` :data:`BUF_SRC` / :data:`BUF_DST`: that side is the contiguous buffer at
    device address ``buffer`` holding the plan's stream (scatter from it / gather into it);
    its ``*_bases`` are ignored. The block-independent part is cached per (pairs, bases).
    """
    rec, coal_runs, single_runs, nitems, _ = _records(bp, src_bases, dst_bases, buffer_side, buffer)
    return rec, _table_array(coal_runs), _table_array(single_runs), nitems


def split_shift_for(rec: np.ndarray, nitems: int, warps: int) -> int:
    """log2 of the parts each item is cut into, so that a transfer of few items keeps ``warps``
    warps busy (the ``small`` workload: 64 items of 32 KiB). A part must stay a multiple of its
    pair's access width and at least :data:`MIN_PART_BYTES`; 0 when items already outnumber warps.
    """
    if nitems <= 0 or nitems >= warps or rec.size == 0:
        return 0
    want = (warps // nitems).bit_length() - 1
    runs = rec["run"].astype(np.int64)
    units = rec["unit"].astype(np.int64)
    shift = 0
    while shift < want:
        nxt = shift + 1
        if np.any(runs % (np.int64(1) << (units + nxt))) or int(runs.min()) >> nxt < MIN_PART_BYTES:
            break
        shift = nxt
    return shift


def copy_block_pairs(bp: BlockPairs, src_bases: Any, dst_bases: Any, *, stream: Any = None,
                     device: int | None = None, spec: KernelSpec = PAIRS_KERNEL, max_warps: int | None = None,
                     rows_inner: bool | None = None, inline: bool | None = None) -> None:
    """Copy every block of ``bp`` from the source tensors to the destination tensors, one launch.

    ``src_bases``/``dst_bases``: a KVLayout, or per-tensor device addresses / torch tensors /
    cupy arrays. Asynchronous on the launch stream (the caller's, as in :func:`kvxfer.ops.cuda.copy_jobs`).
    ``max_warps`` caps the launch (tests use it to make each warp walk many items);
    ``rows_inner`` overrides the item order (benchmarks compare both); ``inline`` as in
    :func:`prepare_pairs` (by default a small copy's records travel in the launch parameters).

    Raises:
        TransportError: the upload or launch failed.
        KernelCompileError: the kernel does not build.
        BackendUnavailableError: CuPy is missing.
    """
    _resolve(bp, src_bases, dst_bases, BUF_NONE, stream, device, spec, max_warps, rows_inner, inline).enqueue()


def gather_pairs(bp: BlockPairs, src: Any, out: Any, *, stream: Any = None, device: int | None = None,
                 max_warps: int | None = None) -> None:
    """Copy ``bp``'s source blocks (tensors ``src``) into the contiguous buffer ``out`` in the
    plan's stream order (the same bytes as :func:`kvxfer.ops.cuda.gather` of the plan), one
    launch, with addresses computed on the GPU. Raises as :func:`copy_block_pairs`."""
    _resolve(bp, src, out, BUF_DST, stream, device, PAIRS_KERNEL, max_warps).enqueue()


def scatter_pairs(bp: BlockPairs, buf: Any, dst: Any, *, stream: Any = None, device: int | None = None,
                  max_warps: int | None = None) -> None:
    """Copy the stream-ordered buffer ``buf`` into ``bp``'s destination blocks (tensors ``dst``),
    one launch. Raises as :func:`copy_block_pairs`."""
    _resolve(bp, buf, dst, BUF_SRC, stream, device, PAIRS_KERNEL, max_warps).enqueue()


class _Payload:
    """A launch of kv_copy_pairs resolved on the host: records, run tables and launch shape.

    The records' bytes (pairs, then the two run tables, 64-byte aligned; one table when both
    are the same) are written where they go (:meth:`write`: a pinned upload slot, the inline
    parameter block); :attr:`bytes` builds them in an array of their own for other uses."""

    __slots__ = ("_rec", "_coal", "_single", "_bytes", "nbytes", "coal_off", "single_off", "npairs", "ncoal",
                 "nsingle", "nitems", "split", "ctas", "buffer_side", "device", "item0", "rows_inner", "spec",
                 "inline")

    def __init__(self, bp: BlockPairs, src: Sequence[int], dst: Sequence[int], buffer_side: int, buffer: int,
                 device: int, spec: KernelSpec, max_warps: int | None, rows_inner: bool | None = None,
                 inline: bool | None = None):
        rec, coal_runs, single_runs, self.nitems, tmpl = _records(bp, src, dst, buffer_side, buffer)
        self._rec, self._coal, self._single, self._bytes = rec, coal_runs, single_runs, None
        self.buffer_side, self.device = buffer_side, device
        # item numbering (see kv_copy_pairs): the stream's order for a buffer side, one row across
        # blocks for block-to-block copies (faster over NVLink, bench/results/ipc_kernel_probe_*)
        self.rows_inner = (buffer_side != BUF_NONE) if rows_inner is None else bool(rows_inner)
        self.item0 = rec["item0"]  # read-only, shared by launches of equal shape
        self.npairs, self.ncoal, self.nsingle = rec.size, coal_runs.size // RUN_FIELDS, single_runs.size // RUN_FIELDS
        self.coal_off = -(-rec.nbytes // 64) * 64
        shared = single_runs is coal_runs
        self.single_off = self.coal_off if shared else self.coal_off + coal_runs.nbytes
        total = self.nbytes = self.single_off + single_runs.nbytes
        # records that fit the kernel's parameters travel with the launch (kv_copy_pairs_inline)
        fits = total <= INLINE_WORDS * 8
        if inline and not fits:
            raise ValueError(f"inline=True but the records take {total} B; at most {INLINE_WORDS * 8} fit")
        if spec == PAIRS_KERNEL and fits and inline is not False:
            spec = INLINE_KERNEL
        self.spec = spec
        self.split, self.ctas = 0, 0
        if self.nitems:
            warps, self.ctas = kernels.workers_for(spec, device, bp.nbytes, None)
            if max_warps is not None:
                warps = max(1, min(warps, int(max_warps)))
                self.ctas = -(-warps // (spec.threads // 32))
            self.split = (tmpl.split(rec, self.nitems, warps) if tmpl is not None
                          else split_shift_for(rec, self.nitems, warps))
        #: the parameter block of kv_copy_pairs_inline (INLINE_DTYPE's bytes), or None
        self.inline: np.ndarray | None = None
        if spec == INLINE_KERNEL and tmpl is not None:
            hkey = (self.ncoal, self.nsingle, self.split, int(self.rows_inner))
            head = tmpl.heads.get(hkey)
            if head is None:
                head = tmpl.heads[hkey] = self._inline_head(rec)
            blob = head.copy()
            self._write_tables(blob[_INLINE_W0 : _INLINE_W0 + total])
            self.inline = blob
            self._bytes = blob[_INLINE_W0 : _INLINE_W0 + total]  # the same layout as an upload's

    def _write_tables(self, out: np.ndarray) -> None:
        _write_table(self._coal, out[self.coal_off : self.coal_off + self._coal.nbytes])
        if self._single is not self._coal:
            _write_table(self._single, out[self.single_off : self.nbytes])

    def write(self, out: np.ndarray) -> None:
        """Write the records' bytes into ``out`` (uint8, at least :attr:`nbytes`, 8-aligned)."""
        rec = self._rec.view(np.uint8)
        out[: rec.size] = rec
        out[rec.size : self.coal_off] = 0
        self._write_tables(out)

    @property
    def bytes(self) -> np.ndarray:
        """The records' bytes as one array (built on first use)."""
        if self._bytes is None:
            self._bytes = np.empty(self.nbytes, dtype=np.uint8)
            self.write(self._bytes)
        return self._bytes

    def _inline_head(self, rec: np.ndarray) -> np.ndarray:
        """The parameter block of kv_copy_pairs_inline with the launch's scalars and the pair
        records filled in; the run tables (which depend on the blocks moved) go in per launch."""
        head = np.zeros(1, dtype=INLINE_DTYPE)
        h = head[0]
        h["npairs"], h["ncoal"], h["nsingle"], h["nitems"] = self.npairs, self.ncoal, self.nsingle, self.nitems
        h["coal_off"], h["single_off"] = self.coal_off // 8, self.single_off // 8
        h["split_shift"], h["buf_side"], h["rows_inner"] = self.split, self.buffer_side, int(self.rows_inner)
        h["uniform"] = _uniform_items(rec, self.nitems)
        raw = head.view(np.uint8)
        w0 = _INLINE_W0
        raw[w0 : w0 + rec.nbytes] = rec.view(np.uint8)
        raw.flags.writeable = False
        return raw

    def launch_global(self, base: int, cstream: Any, pairs: tuple[int, int] | None = None) -> None:
        """Launch ``self.spec`` with the records at device address ``base`` on CuPy stream
        ``cstream`` (the caller made ``self.device`` current); ``pairs`` as in :meth:`args`.

        Raises:
            TransportError: the launch failed.
        """
        kernels.launch_pairs(self.spec, self.device, self.ctas, self.args(base, pairs), cstream)

    def launch_inline(self, stream_ptr: int) -> None:
        """Launch ``kv_copy_pairs_inline`` with the records in its parameters (nothing uploaded).

        Raises:
            TransportError: the launch failed.
        """
        kernels.launch_pairs_inline(self.spec, self.device, self.ctas, self.inline, stream_ptr)

    def args(self, base: int, pairs: tuple[int, int] | None = None) -> tuple:
        """Kernel arguments with the records at device address ``base``; ``pairs`` (first,
        end) launches only those consecutive pairs."""
        p0, p1, nitems, item_base = 0, self.npairs, self.nitems, 0
        if pairs is not None:
            p0, p1 = pairs
            item0 = self.item0
            item_base = int(item0[p0])
            nitems = (int(item0[p1]) if p1 < self.npairs else self.nitems) - item_base
        return kernels.pairs_args(base + p0 * PAIR_DTYPE.itemsize, p1 - p0, base + self.coal_off, self.ncoal,
                                  base + self.single_off, self.nsingle, nitems, self.split, self.buffer_side,
                                  item_base, self.rows_inner)


class PairsLaunch:
    """A block-pair copy resolved on the host (records built, launch shape chosen), not yet
    queued: :meth:`enqueue` uploads the records (unless they travel inline) and launches, in
    stream order. Splitting the two lets a caller time only the GPU's share of a transfer (see
    the cuda_ipc backend)."""

    __slots__ = ("_pl", "_sptr", "_dev")

    def __init__(self, pl: _Payload, sptr: int, dev: int):
        self._pl, self._sptr, self._dev = pl, sptr, dev

    @property
    def inline(self) -> bool:
        """Whether the records travel in the kernel's parameters (nothing is uploaded)."""
        return self._pl.inline is not None

    def enqueue(self, started: Callable[[], None] | None = None) -> None:
        """Upload and launch on the stream the copy was resolved for. ``started`` runs once
        the host work that precedes the GPU's is done (records staged), just before the first
        GPU operation is queued: a timing event recorded there measures the GPU's share only.

        Raises:
            TransportError: the stream is capturing a CUDA graph (records to upload), or the
                upload or launch failed.
        """
        pl, dev, sptr = self._pl, self._dev, self._sptr
        if pl.nitems == 0 or pl.inline is not None:
            if started is not None:
                started()
            if pl.nitems:  # records inline: nothing to upload, capturable, no staging, no device buffer
                pl.launch_inline(sptr)
            return
        cp = cupy()
        rt = device_runtime(dev)
        st = rt.uploads(sptr)
        with st.lock, cp.cuda.Device(dev):
            cstream = rt.stream(sptr)
            check_not_capturing(sptr, "kv_copy_pairs")
            base = int(st.device_buffer(pl.nbytes, cstream).ptr)
            st.upload(pl.nbytes, pl.write, base, sptr, cstream, f"kv_copy_pairs records to cuda:{dev}", started)
            pl.launch_global(base, cstream)


def resolve_block_pairs(bp: BlockPairs, src_bases: Any, dst_bases: Any, *, stream: Any = None,
                        device: int | None = None, spec: KernelSpec = PAIRS_KERNEL) -> PairsLaunch:
    """The host half of :func:`copy_block_pairs`: everything but the upload and the launch.

    Raises:
        KernelCompileError: the kernel does not build. BackendUnavailableError: CuPy is missing.
    """
    return _resolve(bp, src_bases, dst_bases, BUF_NONE, stream, device, spec, None)


def _sides(src: Any, dst: Any, buffer_side: int) -> tuple[Sequence[int], Sequence[int], int, list[Any]]:
    """(source bases, destination bases, buffer address or 0, the objects seen) of a copy whose
    ``buffer_side`` (if any) is one contiguous buffer."""
    srcs, sobjs = operands.flatten_bases([src] if buffer_side == BUF_SRC else src, "src")
    dsts, dobjs = operands.flatten_bases([dst] if buffer_side == BUF_DST else dst, "dst")
    buffer = srcs[0] if buffer_side == BUF_SRC else dsts[0] if buffer_side == BUF_DST else 0
    return srcs, dsts, buffer, sobjs + dobjs


def _resolve(bp: BlockPairs, src: Any, dst: Any, buffer_side: int, stream: Any, device: int | None, spec: KernelSpec,
             max_warps: int | None, rows_inner: bool | None = None, inline: bool | None = None) -> PairsLaunch:
    """Every entry point's host half: ``src``/``dst`` are tensors (a KVLayout, addresses, torch
    or cupy arrays), or, on the side ``buffer_side`` names, the one contiguous buffer.
    ``inline``: None passes the records in the launch's parameters when they fit."""
    srcs, dsts, buffer, objs = _sides(src, dst, buffer_side)
    dev = operands.device_of(objs, (src, dst), device)
    pl = _Payload(bp, srcs, dsts, buffer_side, buffer, dev, spec, max_warps, rows_inner, inline)
    return PairsLaunch(pl, operands.stream_ptr(stream, objs, dev), dev)


class PreparedPairs:
    """A block-pair copy whose records are resident: :meth:`launch` uploads nothing and
    allocates nothing (CUDA-graph capturable). The records sit in device memory, or, when they
    fit, in the launch's own parameters. The tensors and buffer it was prepared for must
    outlive every launch."""

    def __init__(self, payload: _Payload):
        self._pl = payload
        self.nbytes_records = payload.nbytes
        self.inline = payload.inline is not None
        self._mem = None
        if payload.nitems and not self.inline:
            cp = cupy()
            with cp.cuda.Device(payload.device):
                self._mem = cp.cuda.alloc(payload.bytes.nbytes)
                cp.cuda.runtime.memcpy(int(self._mem.ptr), payload.bytes.ctypes.data, payload.bytes.nbytes, H2D)

    def launch(self, stream: Any = None) -> None:
        """Run the copy on ``stream`` (int handle, torch or cupy stream; default cupy's current).

        Raises:
            TransportError: the launch failed.
        """
        pl = self._pl
        if not pl.nitems:
            return
        sptr = operands.stream_ptr(stream, (), pl.device)
        if self.inline:
            pl.launch_inline(sptr)
            return
        with cupy().cuda.Device(pl.device):
            pl.launch_global(int(self._mem.ptr), device_runtime(pl.device).stream(sptr))


class _IdsPieces:
    """The pieces of a gather or scatter as ``kv_copy_pairs_ids`` launches: one parameter block
    (header, pair records, the tensor side's block ids as int32) built once, each piece
    launched with its own item range written into the header."""

    __slots__ = ("params", "header", "items", "ctas", "sptr", "device")

    def __init__(self, bp: BlockPairs, src: Any, dst: Any, buffer_side: int, bounds: list[tuple[int, int]],
                 stream: Any, device: int):
        srcs, dsts, buffer, objs = _sides(src, dst, buffer_side)
        n = int(bp.src_blocks.size)
        tmpl = _template(bp.pairs, srcs, dsts, buffer_side, buffer, n)
        rec, nitems = tmpl.records(n, n)  # one block per run, on both kinds of pair
        warps, self.ctas = kernels.workers_for(IDS_KERNEL, device, bp.nbytes, None)
        split = tmpl.split(rec, nitems, warps)
        head = tmpl.heads.get(("ids", split))
        if head is None:
            head = tmpl.heads[("ids", split)] = _ids_head(rec, n, nitems, split, buffer_side)
        self.params = head.copy()
        ids_at = _IDS_W0 // 4 + 24 * int(rec.size)  # int32 index: after the records (12 words each)
        self.params.view(np.int32)[ids_at : ids_at + n] = bp.src_blocks if buffer_side == BUF_DST else bp.dst_blocks
        item0 = rec["item0"].tolist()
        self.items = [(item0[p0], (item0[p1] if p1 < len(item0) else nitems) - item0[p0]) for p0, p1 in bounds]
        self.header = self.params[:_IDS_W0].view(np.int64)  # where each launch writes its item range
        self.sptr, self.device = operands.stream_ptr(stream, objs, device), device

    def launch(self, i: int) -> None:
        self.header[_IDS_ITEM_BASE], self.header[_IDS_NITEMS] = self.items[i]
        kernels.launch_pairs_ids(self.device, self.ctas, self.params, self.sptr)


def _ids_head(rec: np.ndarray, nblocks: int, nitems: int, split: int, buffer_side: int) -> np.ndarray:
    """The parameter block of kv_copy_pairs_ids without the ids and the item range (read-only)."""
    head = np.zeros(1, dtype=IDS_DTYPE)
    h = head[0]
    h["npairs"], h["nblocks"], h["nitems"] = rec.size, nblocks, nitems
    h["sids_off"] = h["dids_off"] = 24 * rec.size  # one id array; the buffer side's ids are never read
    h["split_shift"], h["buf_side"], h["rows_inner"] = split, buffer_side, 1  # a buffer side: stream order
    h["uniform"] = _uniform_items(rec, nitems)
    raw = head.view(np.uint8)
    raw[_IDS_W0 : _IDS_W0 + rec.nbytes] = rec.view(np.uint8)
    raw.flags.writeable = False
    return raw


class PairPieces:
    """A block-pair copy prepared once and launched piece by piece: piece ``i`` copies the
    consecutive pairs ``bounds[i]`` (see :meth:`kvxfer.plan.TransferPlan.chunk_bounds`), so a
    pipelined transfer pays the host work of one launch per piece, not one plan.

    Where the GPU takes 32 KiB of kernel parameters and the ids fit (:func:`ids_params_fit`),
    everything travels in each launch's parameters (``kv_copy_pairs_ids``): nothing is uploaded
    or allocated. Otherwise the records are uploaded once (stream-ordered) into a device
    allocation of their own, which lives as long as this object. ``in_params``: None picks;
    True requires the parameters (ValueError where they cannot hold the copy); False uploads.
    """

    def __init__(self, bp: BlockPairs, src: Any, dst: Any, *, buffer_side: int, bounds: list[tuple[int, int]],
                 stream: Any, device: int, spec: KernelSpec = PAIRS_KERNEL, in_params: bool | None = None):
        self._bounds, self._dev = bounds, device
        self._ids: _IdsPieces | None = None
        self._mem = None
        if (in_params is not False and spec == PAIRS_KERNEL and ids_params_fit(bp, buffer_side)
                and device_runtime(device).large_params()):
            try:
                self._ids = _IdsPieces(bp, src, dst, buffer_side, bounds, stream, device)
                return
            except KernelCompileError as exc:  # an NVRTC that took the check but not the kernel
                device_runtime(device).no_large_params(str(exc))
                if in_params:
                    raise
        if in_params:
            raise ValueError("in_params=True but this copy cannot travel in kernel parameters (see ids_params_fit; "
                             f"the GPU must take 32 KiB of them: {device_runtime(device).large_params()})")
        # pieces start at a pair's first item: the inline kernel numbers items from 0, so not inline
        resolved = _resolve(bp, src, dst, buffer_side, stream, device, spec, None, inline=False)
        self._pl, self._sptr = resolved._pl, resolved._sptr
        cp = cupy()
        if self._pl.nitems:
            rt = device_runtime(device)
            st = rt.uploads(self._sptr)
            with st.lock, cp.cuda.Device(device):
                self._cstream = rt.stream(self._sptr)
                self._mem = alloc_on(self._cstream, self._pl.nbytes)
                st.upload(self._pl.nbytes, self._pl.write, int(self._mem.ptr), self._sptr, self._cstream,
                          f"kv_copy_pairs records to cuda:{device}")

    def __len__(self) -> int:
        return len(self._bounds)

    @property
    def in_params(self) -> bool:
        """Whether the pieces travel in kernel parameters (``kv_copy_pairs_ids``)."""
        return self._ids is not None

    def launch(self, i: int) -> None:
        """Queue piece ``i`` on the stream given at construction.

        Raises:
            TransportError: the launch failed.
        """
        if self._ids is not None:
            self._ids.launch(i)
            return
        if self._mem is None:
            return
        with cupy().cuda.Device(self._dev):
            self._pl.launch_global(int(self._mem.ptr), self._cstream, self._bounds[i])


def prepare_pairs(bp: BlockPairs, src: Any, dst: Any, *, buffer_side: int = BUF_NONE, device: int | None = None,
                  spec: KernelSpec = PAIRS_KERNEL, max_warps: int | None = None, rows_inner: bool | None = None,
                  inline: bool | None = None) -> PreparedPairs:
    """Resolve and upload (synchronously) a block-pair copy, gather (``buffer_side=BUF_DST``:
    ``dst`` is the buffer) or scatter (``BUF_SRC``: ``src`` is the buffer) for repeated launches.
    ``inline``: None keeps records that fit in the launch's parameters; False forces device
    memory; True requires the parameters (ValueError when the records do not fit). Inline
    records apply to the default kernel (:data:`PAIRS_KERNEL`); another ``spec`` uploads.

    Raises:
        ValueError: ``inline=True`` and the records exceed the parameters.
        TransportError, KernelCompileError, BackendUnavailableError: as :func:`copy_block_pairs`.
    """
    return PreparedPairs(_resolve(bp, src, dst, buffer_side, None, device, spec, max_warps, rows_inner, inline)._pl)
