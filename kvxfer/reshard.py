"""Layout changes between peers: head slices and NHD <-> HND, as copy jobs.

Layer: planning (pure numpy), beside :mod:`kvxfer.plan`. When prefill and decode shard or
order a KV block differently (prefill with TP=1 feeding decode ranks with TP=2; one engine
storing ``[block_size, heads, dim]`` (NHD), the other ``[heads, block_size, dim]`` (HND)), the
blocks are not byte-for-byte interchangeable, but every change is still a list of two-level
strided jobs (JOB_DTYPE) that the same kernel (and the numpy reference) executes.

A block of a registered tensor holds one or more *pieces*: a ``[block_size, heads, dim]`` or
``[heads, block_size, dim]`` array of one K or V cache (e.g. ``[2, num_blocks, 16, 8, 128]``
with ``block_dim=1`` has two pieces per block, K then V). :class:`BlockFormat` says how a piece
is ordered and shaped; the pieces themselves are found from the tensor's segments.

Stream order (what gather/scatter put on the wire) is, per tensor, per piece, per block:
tokens then heads when both sides share an order (one job per block and piece), or one job per
head (tokens in order) when the orders differ.

A reshard that *maps tokens* (``HeadReshard(num_tokens=...)``) lets the two sides use different
block sizes (16 -> 64, 64 -> 16, 16 -> 48, ...): token ``t`` lives at slot ``src_start + t`` of
the concatenated source blocks and ``dst_start + t`` of the destination blocks, and the plan
moves chunks of tokens that are contiguous on both sides (one job per chunk, piece and head
group; a partial block moves only its tokens). :func:`tp_sources` / :func:`tp_consumers` say
which ranks of one tensor-parallel size feed which ranks of another.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BlockIdError, LayoutError
from .layout import LayoutGeometry, TensorGeometry
from .plan import JOB_DTYPE, TransferPlan, as_block_ids, validate_block_ids

__all__ = ["HeadOrder", "BlockFormat", "HeadReshard", "HeadSource", "tp_head_range", "tp_kv_heads", "tp_sources",
           "tp_consumers", "plan_reshard", "plan_token_reshard"]


class HeadOrder(enum.Enum):
    """How one piece of a KV block orders its tokens and heads."""

    NHD = "nhd"  # [block_size, heads, head_dim]
    HND = "hnd"  # [heads, block_size, head_dim]


@dataclass(frozen=True, slots=True)
class BlockFormat:
    """Shape and order of one piece (K or V of one block) of a KV tensor."""

    order: HeadOrder
    block_size: int
    num_heads: int
    head_dim: int
    itemsize: int

    def __post_init__(self) -> None:
        if min(self.block_size, self.num_heads, self.head_dim, self.itemsize) < 1:
            raise LayoutError(f"block format {self} has a non-positive dimension")

    @property
    def head_nbytes(self) -> int:
        """Bytes of one head of one token."""
        return self.head_dim * self.itemsize

    @property
    def piece_nbytes(self) -> int:
        return self.block_size * self.num_heads * self.head_nbytes

    def head_side(self, h0: int, nheads: int) -> tuple[int, int, int, int]:
        """(offset in piece, run, count, stride) of heads ``[h0, h0 + nheads)``, tokens then heads.

        Contiguous in HND only for one head, or for several heads when read head by head.
        """
        hb = self.head_nbytes
        if self.order is HeadOrder.NHD:
            return h0 * hb, nheads * hb, self.block_size, self.num_heads * hb
        # HND: heads [h0, h0+n) are one contiguous range, stored head-major
        return h0 * self.block_size * hb, nheads * self.block_size * hb, 1, 0


def tp_head_range(num_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Heads ``[h0, h1)`` held by ``tp_rank`` of ``tp_size`` when ``num_heads`` are split evenly.

    Raises:
        LayoutError: the heads do not split evenly, or the rank is out of range.
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size or num_heads % tp_size:
        raise LayoutError(f"cannot give rank {tp_rank} of {tp_size} an even share of {num_heads} heads")
    n = num_heads // tp_size
    return tp_rank * n, (tp_rank + 1) * n


def _piece_offsets(t: TensorGeometry, fmt: BlockFormat, what: str) -> np.ndarray:
    """Byte offsets, from a block's first byte, of every piece of that block (in order)."""
    return _piece_offsets_of(t, fmt, what)


@functools.lru_cache(maxsize=1024)
def _piece_offsets_of(t: TensorGeometry, fmt: BlockFormat, what: str) -> np.ndarray:
    if t.itemsize != fmt.itemsize:
        raise LayoutError(f"{what}: tensor itemsize {t.itemsize} but block format says {fmt.itemsize}")
    pb = fmt.piece_nbytes
    out: list[int] = []
    for s in t.segments:
        if s.run % pb:
            raise LayoutError(
                f"{what}: segment runs of {s.run} B are not whole pieces of {pb} B "
                f"({fmt.order.name} {fmt.block_size}x{fmt.num_heads}x{fmt.head_dim}); check the block format"
            )
        for i in range(s.count):
            out.extend(s.offset + i * s.stride + k * pb for k in range(s.run // pb))
    arr = np.asarray(out, dtype=np.int64)
    arr.flags.writeable = False
    return arr



def _heads_and_tensors(src: LayoutGeometry, src_format: BlockFormat, dst_format: BlockFormat,
                       src_heads: tuple[int, int] | None, dst_head_start: int,
                       layers: np.ndarray | Sequence[int] | None) -> tuple[int, int, Sequence[int]]:
    """(first source head, heads moved, tensor indices) of a reshard, each checked against the formats.

    Raises:
        LayoutError: head ranges out of bounds, or layers out of range.
    """
    h0, h1 = (0, src_format.num_heads) if src_heads is None else src_heads
    n = h1 - h0
    if not (0 <= h0 < h1 <= src_format.num_heads):
        raise LayoutError(f"source heads [{h0}, {h1}) out of range for {src_format.num_heads} heads")
    if not 0 <= dst_head_start <= dst_format.num_heads - n:
        raise LayoutError(f"{n} heads from destination head {dst_head_start} do not fit {dst_format.num_heads} heads")
    tensor_ids = range(len(src.tensors)) if layers is None else [int(t) for t in layers]
    if any(not 0 <= t < len(src.tensors) for t in tensor_ids):
        raise LayoutError(f"layers {list(tensor_ids)} out of range; valid are 0..{len(src.tensors) - 1}")
    return h0, n, tensor_ids


def plan_reshard(
    src: LayoutGeometry,
    src_format: BlockFormat,
    dst: LayoutGeometry,
    dst_format: BlockFormat,
    src_blocks: Sequence[int] | np.ndarray,
    dst_blocks: Sequence[int] | np.ndarray,
    *,
    src_heads: tuple[int, int] | None = None,
    dst_head_start: int = 0,
    layers: np.ndarray | Sequence[int] | None = None,
) -> TransferPlan:
    """Jobs copying heads ``src_heads`` of source blocks into heads from ``dst_head_start`` on of
    destination blocks, converting between NHD and HND when the two formats differ.

    ``src_heads`` defaults to all source heads. Slicing (``[h0, h1)`` of H heads into a block of
    ``h1 - h0`` heads: prefill TP=1 -> decode TP=2) and assembling (a rank's heads into part of a
    wider block) are the same call. ``layers`` holds tensor indices present on both sides.

    Raises:
        BlockIdError: block lists of different lengths, ids out of range, duplicate destinations.
        LayoutError: tensors or formats that disagree (tensor count, itemsize, block size, head
            size, pieces per block), or head ranges out of bounds.
    """
    s = as_block_ids(src_blocks, "source block ids")
    d = as_block_ids(dst_blocks, "destination block ids")
    if s.size != d.size:
        raise BlockIdError(f"{s.size} source blocks but {d.size} destination blocks; the lists must have equal length")
    validate_block_ids(s, src.num_blocks, "source block ids", unique=False)
    validate_block_ids(d, dst.num_blocks, "destination block ids", unique=True)
    if len(src.tensors) != len(dst.tensors):
        raise LayoutError(f"layouts have {len(src.tensors)} and {len(dst.tensors)} tensors; they must match")
    if (src_format.block_size, src_format.head_dim, src_format.itemsize) != (
        dst_format.block_size, dst_format.head_dim, dst_format.itemsize
    ):
        raise LayoutError(f"block formats differ beyond heads and order: {src_format} vs {dst_format}")
    h0, n, tensor_ids = _heads_and_tensors(src, src_format, dst_format, src_heads, dst_head_start, layers)

    same = src_format.order is dst_format.order
    # head groups moved by one job each: all heads at once when orders agree, else one by one
    groups = [(h0, dst_head_start, n)] if same else [(h0 + k, dst_head_start + k, 1) for k in range(n)]
    parts: list[np.ndarray] = []
    for t in tensor_ids:
        st, dt = src.tensors[t], dst.tensors[t]
        sp = _piece_offsets(st, src_format, f"source tensor {t}")
        dp = _piece_offsets(dt, dst_format, f"destination tensor {t}")
        if sp.size != dp.size:
            raise LayoutError(f"tensor {t}: {sp.size} pieces per source block but {dp.size} per destination block")
        for soff_p, doff_p in zip(sp.tolist(), dp.tolist()):
            for sh, dh, nh in groups:
                so, sr, sc, ss = src_format.head_side(sh, nh)
                do, dr, dc, ds = dst_format.head_side(dh, nh)
                if same and src_format.order is HeadOrder.NHD and n == src_format.num_heads == dst_format.num_heads:
                    # whole pieces in NHD: one contiguous run each side
                    sr, sc, ss = src_format.piece_nbytes, 1, 0
                    dr, dc, ds = dst_format.piece_nbytes, 1, 0
                job = np.empty(s.size, dtype=JOB_DTYPE)
                job["src_t"] = t
                job["dst_t"] = t
                job["src_off"] = s * st.block_stride + soff_p + so
                job["dst_off"] = d * dt.block_stride + doff_p + do
                job["src_run"], job["src_count"], job["src_stride"] = sr, sc, ss
                job["dst_run"], job["dst_count"], job["dst_stride"] = dr, dc, ds
                parts.append(job)
    jobs = np.concatenate(parts) if parts else np.zeros(0, dtype=JOB_DTYPE)
    offsets = np.zeros(jobs.size + 1, dtype=np.int64)
    np.cumsum(jobs["src_run"] * jobs["src_count"], out=offsets[1:])
    return TransferPlan(jobs=jobs, stream_offsets=offsets, dst_blocks=d)


def _token_side(fmt: BlockFormat, h0: int, nheads: int, tok: np.ndarray, ntok: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(offset in piece, run, count, stride) arrays of heads ``[h0, h0 + nheads)`` of tokens
    ``[tok, tok + ntok)`` of one piece, in stream order (tokens then heads in NHD, heads then
    tokens in HND). Contiguous runs are merged into one."""
    hb = fmt.head_nbytes
    if fmt.order is HeadOrder.NHD:
        off = tok * (fmt.num_heads * hb) + h0 * hb
        if nheads == fmt.num_heads:  # whole tokens: one run
            return off, ntok * (nheads * hb), np.ones_like(ntok), np.zeros_like(ntok)
        return off, np.full_like(ntok, nheads * hb), ntok, np.full_like(ntok, fmt.num_heads * hb)
    off = h0 * (fmt.block_size * hb) + tok * hb
    run = ntok * hb
    if nheads == 1:
        return off, run, np.ones_like(ntok), np.zeros_like(ntok)
    stride = fmt.block_size * hb
    whole = run == stride  # whole blocks: the heads are back to back
    return (off, np.where(whole, run * nheads, run), np.where(whole, 1, nheads),
            np.where(whole, 0, stride))


def _covering_blocks(start: int, num_tokens: int, block_size: int) -> int:
    return -(-(start + num_tokens) // block_size) if num_tokens else 0


def _check_cover(ids: np.ndarray, start: int, num_tokens: int, block_size: int, what: str) -> None:
    """The list holds exactly the blocks of slots ``[start, start + num_tokens)``."""
    if num_tokens == 0:
        if ids.size:
            raise BlockIdError(f"the reshard maps 0 tokens, so the {what} list must be empty; got {ids.size} blocks")
        return
    if not 0 <= start < block_size:
        raise BlockIdError(
            f"{what} start slot {start} must lie in the first block (0..{block_size - 1} for block size "
            f"{block_size}); drop the blocks before it from the list"
        )
    need = _covering_blocks(start, num_tokens, block_size)
    if ids.size != need:
        raise BlockIdError(
            f"{num_tokens} tokens from {what} slot {start} with block size {block_size} cover exactly {need} "
            f"blocks (slots 0..{need * block_size - 1}); the {what} list holds {ids.size}"
        )


def _token_chunks(num_tokens: int, src_start: int, src_bs: int, dst_start: int, dst_bs: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(first token, length) of the maximal token runs that stay in one block on both sides."""
    if num_tokens == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    cuts = np.union1d(np.arange(src_bs - src_start, num_tokens, src_bs, dtype=np.int64),
                      np.arange(dst_bs - dst_start, num_tokens, dst_bs, dtype=np.int64))
    first = np.concatenate([np.zeros(1, dtype=np.int64), cuts])
    return first, np.diff(first, append=num_tokens)


def plan_token_reshard(
    src: LayoutGeometry,
    src_format: BlockFormat,
    dst: LayoutGeometry,
    dst_format: BlockFormat,
    src_blocks: Sequence[int] | np.ndarray,
    dst_blocks: Sequence[int] | np.ndarray,
    *,
    num_tokens: int,
    src_start: int = 0,
    dst_start: int = 0,
    src_heads: tuple[int, int] | None = None,
    dst_head_start: int = 0,
    layers: np.ndarray | Sequence[int] | None = None,
) -> TransferPlan:
    """Jobs copying ``num_tokens`` tokens, mapped by position: token ``t`` is at slot
    ``src_start + t`` of the concatenated ``src_blocks`` (blocks of ``src_format.block_size``
    tokens) and goes to slot ``dst_start + t`` of the concatenated ``dst_blocks``; heads
    ``src_heads`` of it go to heads from ``dst_head_start`` on, converting NHD <-> HND.

    Block sizes may differ (any ratio, either way). Each list must hold exactly the blocks its
    slots fall in (``src_start`` / ``dst_start`` in its first block). One job per chunk of tokens
    contiguous on both sides, per piece, per head group (all heads when the orders agree, one
    head at a time when they differ); a partial block moves only its tokens.

    Raises:
        BlockIdError: a list that does not cover its slots exactly, ids out of range, duplicate
            destination blocks, a negative token count or start.
        LayoutError: tensors or formats that disagree (tensor count, itemsize, head size, pieces
            per block), or head ranges out of bounds.
    """
    s = as_block_ids(src_blocks, "source block ids")
    d = as_block_ids(dst_blocks, "destination block ids")
    for name, v in (("num_tokens", num_tokens), ("src_start", src_start), ("dst_start", dst_start)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise BlockIdError(f"{name} must be a non-negative int; got {v!r}")
    num_tokens, src_start, dst_start = int(num_tokens), int(src_start), int(dst_start)
    _check_cover(s, src_start, num_tokens, src_format.block_size, "source")
    _check_cover(d, dst_start, num_tokens, dst_format.block_size, "destination")
    validate_block_ids(s, src.num_blocks, "source block ids", unique=False)
    validate_block_ids(d, dst.num_blocks, "destination block ids", unique=True)
    if len(src.tensors) != len(dst.tensors):
        raise LayoutError(f"layouts have {len(src.tensors)} and {len(dst.tensors)} tensors; they must match")
    if (src_format.head_dim, src_format.itemsize) != (dst_format.head_dim, dst_format.itemsize):
        raise LayoutError(f"block formats differ in head size or itemsize: {src_format} vs {dst_format}")
    h0, n, tensor_ids = _heads_and_tensors(src, src_format, dst_format, src_heads, dst_head_start, layers)

    first, ntok = _token_chunks(num_tokens, src_start, src_format.block_size, dst_start, dst_format.block_size)
    sslot, dslot = first + src_start, first + dst_start
    sblk, stok = s[sslot // src_format.block_size], sslot % src_format.block_size
    dblk, dtok = d[dslot // dst_format.block_size], dslot % dst_format.block_size
    same = src_format.order is dst_format.order
    groups = [(h0, dst_head_start, n)] if same else [(h0 + k, dst_head_start + k, 1) for k in range(n)]
    # per head group and chunk: (offset in piece, run, count, stride) of each side, [groups, chunks]
    sg = [np.stack(_token_side(src_format, sh, nh, stok, ntok)) for sh, _, nh in groups]
    dg = [np.stack(_token_side(dst_format, dh, nh, dtok, ntok)) for _, dh, nh in groups]
    sside, dside = np.stack(sg, axis=1), np.stack(dg, axis=1)  # [4, groups, chunks]
    # per (tensor, piece): tensor index, block strides, piece offsets, [pieces]
    rows: list[tuple[int, int, int, int, int]] = []
    for t in tensor_ids:
        st, dt = src.tensors[t], dst.tensors[t]
        sp = _piece_offsets(st, src_format, f"source tensor {t}")
        dp = _piece_offsets(dt, dst_format, f"destination tensor {t}")
        if sp.size != dp.size:
            raise LayoutError(f"tensor {t}: {sp.size} pieces per source block but {dp.size} per destination block")
        rows += [(t, st.block_stride, dt.block_stride, a, b) for a, b in zip(sp.tolist(), dp.tolist())]
    if not rows or first.size == 0:
        jobs = np.zeros(0, dtype=JOB_DTYPE)
    else:
        pt, psb, pdb, pso, pdo = (np.asarray(c, dtype=np.int64)[:, None, None] for c in zip(*rows))
        shape = (len(rows), len(groups), first.size)  # stream order: tensor, piece, head group, chunk
        grid = np.empty(shape, dtype=JOB_DTYPE)
        grid["src_t"] = pt
        grid["dst_t"] = pt
        grid["src_off"] = sblk * psb + pso + sside[0]
        grid["dst_off"] = dblk * pdb + pdo + dside[0]
        grid["src_run"], grid["src_count"], grid["src_stride"] = sside[1], sside[2], sside[3]
        grid["dst_run"], grid["dst_count"], grid["dst_stride"] = dside[1], dside[2], dside[3]
        jobs = grid.reshape(-1)
    offsets = np.zeros(jobs.size + 1, dtype=np.int64)
    np.cumsum(jobs["src_run"] * jobs["src_count"], out=offsets[1:])
    return TransferPlan(jobs=jobs, stream_offsets=offsets, dst_blocks=d)


@dataclass(frozen=True, slots=True)
class HeadReshard:
    """A transfer that changes head sharding, order or block size: heads ``src_heads`` of the
    source's blocks (formatted as ``src_format``) go to heads from ``dst_head_start`` on of the
    destination's blocks (``dst_format``). Pass to ``Connector.read``/``write`` as ``reshard=``.

    Block-mapped (``num_tokens`` None): block ``src_blocks[i]`` goes to ``dst_blocks[i]``; the
    lists have equal length and both formats the same block size.

    Token-mapped (``num_tokens`` set): token ``t`` (``0 <= t < num_tokens``) is at slot
    ``src_start + t`` of the concatenated source blocks and goes to slot ``dst_start + t`` of
    the concatenated destination blocks; the block sizes may differ and each list holds exactly
    the blocks its slots fall in (see :func:`plan_token_reshard`). A prefix already cached on
    the destination is skipped by starting past it, mid-block on either side.
    """

    src_format: BlockFormat
    dst_format: BlockFormat
    src_heads: tuple[int, int] | None = None
    dst_head_start: int = 0
    num_tokens: int | None = None
    src_start: int = 0
    dst_start: int = 0

    @property
    def maps_tokens(self) -> bool:
        """Whether blocks are matched by token positions (lists of different lengths allowed)."""
        return self.num_tokens is not None

    def plan(self, src: LayoutGeometry, dst: LayoutGeometry, src_blocks: np.ndarray, dst_blocks: np.ndarray,
             layers: np.ndarray | None) -> TransferPlan:
        """The copy jobs of this reshard (see :func:`plan_reshard` and :func:`plan_token_reshard`,
        which say what is raised)."""
        if self.num_tokens is None:
            if self.src_start or self.dst_start:
                raise LayoutError("src_start / dst_start need num_tokens (a token-mapped reshard)")
            return plan_reshard(src, self.src_format, dst, self.dst_format, src_blocks, dst_blocks,
                                src_heads=self.src_heads, dst_head_start=self.dst_head_start, layers=layers)
        return plan_token_reshard(src, self.src_format, dst, self.dst_format, src_blocks, dst_blocks,
                                  num_tokens=self.num_tokens, src_start=self.src_start, dst_start=self.dst_start,
                                  src_heads=self.src_heads, dst_head_start=self.dst_head_start, layers=layers)

    def to_wire(self) -> list:
        """msgpack-able form: ``[src format, dst format, heads, dst head start]``, followed by
        ``num_tokens, src_start, dst_start`` when token-mapped."""
        f = lambda b: [b.order.value, b.block_size, b.num_heads, b.head_dim, b.itemsize]  # noqa: E731
        out = [f(self.src_format), f(self.dst_format), None if self.src_heads is None else list(self.src_heads),
               self.dst_head_start]
        if self.num_tokens is not None:
            out += [self.num_tokens, self.src_start, self.dst_start]
        return out

    @classmethod
    def from_wire(cls, obj: object) -> HeadReshard:
        """Parse a peer's reshard description. Raises LayoutError when malformed."""

        def fmt(v: object) -> BlockFormat:
            if not (isinstance(v, list) and len(v) == 5 and all(type(x) is int and 0 < x < 1 << 31 for x in v[1:])):
                raise LayoutError("malformed block format in a reshard request")
            try:
                order = HeadOrder(v[0])
            except (ValueError, TypeError):
                raise LayoutError(f"unknown head order {v[0]!r} in a reshard request") from None
            return BlockFormat(order, *v[1:])

        ok = lambda x: type(x) is int and 0 <= x < 1 << 40  # noqa: E731
        if not (isinstance(obj, list) and len(obj) in (4, 7) and all(ok(x) for x in obj[3:])):
            raise LayoutError("malformed reshard request")
        heads = obj[2]
        if heads is not None and not (isinstance(heads, list) and len(heads) == 2 and all(ok(h) for h in heads)):
            raise LayoutError("malformed head range in a reshard request")
        tokens = {} if len(obj) == 4 else {"num_tokens": obj[4], "src_start": obj[5], "dst_start": obj[6]}
        return cls(fmt(obj[0]), fmt(obj[1]), None if heads is None else (heads[0], heads[1]), obj[3], **tokens)


@dataclass(frozen=True, slots=True)
class HeadSource:
    """Where one destination rank's heads come from: heads ``src_heads`` (``[h0, h1)`` in the
    source rank's local numbering) of rank ``src_rank`` go to local heads from
    ``dst_head_start`` on of the destination rank."""

    src_rank: int
    src_heads: tuple[int, int]
    dst_head_start: int

    @property
    def num_heads(self) -> int:
        return self.src_heads[1] - self.src_heads[0]


def tp_kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int, *, replicated: bool = False) -> tuple[int, int]:
    """Global KV heads ``[h0, h1)`` that rank ``tp_rank`` of ``tp_size`` holds, as vLLM shards them.

    ``num_kv_heads >= tp_size``: an even split. Fewer heads than ranks (GQA): each rank holds one
    head, rank ``r`` head ``r * num_kv_heads // tp_size`` (``tp_size`` must be a multiple of
    ``num_kv_heads``). ``replicated`` (MLA's latent): every rank holds all heads.

    Raises:
        LayoutError: the heads do not divide among the ranks, or the rank is out of range.
    """
    for name, v in (("num_kv_heads", num_kv_heads), ("tp_size", tp_size)):
        if type(v) is not int or v < 1:
            raise LayoutError(f"{name} must be a positive int; got {v!r}")
    if type(tp_rank) is not int or not 0 <= tp_rank < tp_size:
        raise LayoutError(f"tp_rank {tp_rank!r} out of range for tp_size {tp_size}")
    if replicated:
        return 0, num_kv_heads
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise LayoutError(f"{num_kv_heads} KV heads do not split evenly over tp_size {tp_size}")
        n = num_kv_heads // tp_size
        return tp_rank * n, (tp_rank + 1) * n
    if tp_size % num_kv_heads:
        raise LayoutError(
            f"{num_kv_heads} KV heads cannot be replicated evenly over tp_size {tp_size}: "
            f"tp_size must be a multiple of the head count"
        )
    h = tp_rank * num_kv_heads // tp_size
    return h, h + 1


def tp_sources(num_kv_heads: int, src_tp: int, dst_tp: int, dst_rank: int, *,
               replicated: bool = False) -> list[HeadSource]:
    """The source ranks (of ``src_tp``) that destination rank ``dst_rank`` (of ``dst_tp``) reads
    its KV heads from, with the head ranges in each side's local numbering, in destination-head
    order. Every head the destination holds is read exactly once.

    Where a head is held by several source ranks (GQA replication, or ``replicated`` for MLA,
    where each rank holds the whole latent), the destination ranks are spread over the replicas
    (``dst_rank % replicas``), so each destination reads from one source and the sources share
    the load.

    Raises:
        LayoutError: the heads do not divide among either side's ranks, or a rank is out of range.
    """
    tp_kv_heads(num_kv_heads, src_tp, 0, replicated=replicated)  # validates the source side
    d0, d1 = tp_kv_heads(num_kv_heads, dst_tp, dst_rank, replicated=replicated)
    if replicated:
        return [HeadSource(dst_rank % src_tp, (0, num_kv_heads), 0)]
    out: list[HeadSource] = []
    for g in range(d0, d1):
        if num_kv_heads >= src_tp:
            per = num_kv_heads // src_tp
            rank, local = g // per, g % per
        else:
            replicas = src_tp // num_kv_heads  # ranks [g * replicas, (g + 1) * replicas) hold head g
            rank, local = g * replicas + dst_rank % replicas, 0
        last = out[-1] if out else None
        if last is not None and last.src_rank == rank and last.src_heads[1] == local:
            out[-1] = HeadSource(rank, (last.src_heads[0], local + 1), last.dst_head_start)
        else:
            out.append(HeadSource(rank, (local, local + 1), g - d0))
    return out


def tp_consumers(num_kv_heads: int, src_tp: int, dst_tp: int, src_rank: int, *,
                 replicated: bool = False) -> list[int]:
    """The destination ranks (of ``dst_tp``) that read from source rank ``src_rank`` under
    :func:`tp_sources`, ascending: a producer frees a request's blocks once all of them confirmed
    (an empty list: no rank reads from it, e.g. a GQA replica that no destination picked).

    Raises:
        LayoutError: as :func:`tp_sources`, or ``src_rank`` out of range.
    """
    tp_kv_heads(num_kv_heads, src_tp, src_rank, replicated=replicated)
    return [r for r in range(dst_tp)
            if any(h.src_rank == src_rank for h in tp_sources(num_kv_heads, src_tp, dst_tp, r, replicated=replicated))]
