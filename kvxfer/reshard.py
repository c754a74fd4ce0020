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
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BlockIdError, LayoutError
from .layout import LayoutGeometry, TensorGeometry
from .plan import JOB_DTYPE, TransferPlan, as_block_ids, validate_block_ids

__all__ = ["HeadOrder", "BlockFormat", "HeadReshard", "tp_head_range", "plan_reshard"]


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
    return np.asarray(out, dtype=np.int64)


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
    h0, h1 = (0, src_format.num_heads) if src_heads is None else src_heads
    n = h1 - h0
    if not (0 <= h0 < h1 <= src_format.num_heads):
        raise LayoutError(f"source heads [{h0}, {h1}) out of range for {src_format.num_heads} heads")
    if not 0 <= dst_head_start <= dst_format.num_heads - n:
        raise LayoutError(f"{n} heads from destination head {dst_head_start} do not fit {dst_format.num_heads} heads")
    tensor_ids = range(len(src.tensors)) if layers is None else [int(t) for t in layers]
    if any(not 0 <= t < len(src.tensors) for t in tensor_ids):
        raise LayoutError(f"layers {list(tensor_ids)} out of range; valid are 0..{len(src.tensors) - 1}")

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


@dataclass(frozen=True, slots=True)
class HeadReshard:
    """A transfer that changes head sharding or order: heads ``src_heads`` of the source's
    blocks (formatted as ``src_format``) go to heads from ``dst_head_start`` on of the
    destination's blocks (``dst_format``). Pass to ``Connector.read``/``write`` as ``reshard=``.
    """

    src_format: BlockFormat
    dst_format: BlockFormat
    src_heads: tuple[int, int] | None = None
    dst_head_start: int = 0

    def plan(self, src: LayoutGeometry, dst: LayoutGeometry, src_blocks: np.ndarray, dst_blocks: np.ndarray,
             layers: np.ndarray | None) -> TransferPlan:
        """The copy jobs of this reshard (see :func:`plan_reshard`, which says what is raised)."""
        return plan_reshard(src, self.src_format, dst, self.dst_format, src_blocks, dst_blocks,
                            src_heads=self.src_heads, dst_head_start=self.dst_head_start, layers=layers)

    def to_wire(self) -> list:
        f = lambda b: [b.order.value, b.block_size, b.num_heads, b.head_dim, b.itemsize]  # noqa: E731
        return [f(self.src_format), f(self.dst_format), None if self.src_heads is None else list(self.src_heads),
                self.dst_head_start]

    @classmethod
    def from_wire(cls, obj: object) -> HeadReshard:
        """Parse a peer's reshard description. Raises LayoutError when malformed."""

        def fmt(v: object) -> BlockFormat:
            if not (isinstance(v, list) and len(v) == 5 and all(type(x) is int and 0 < x < 1 << 31 for x in v[1:])):
                raise LayoutError("malformed block format in a reshard request")
            try:
                order = HeadOrder(v[0])
            except ValueError:
                raise LayoutError(f"unknown head order {v[0]!r} in a reshard request") from None
            return BlockFormat(order, *v[1:])

        if not (isinstance(obj, list) and len(obj) == 4 and type(obj[3]) is int and obj[3] >= 0):
            raise LayoutError("malformed reshard request")
        heads = obj[2]
        if heads is not None and not (isinstance(heads, list) and len(heads) == 2 and all(type(h) is int for h in heads)):
            raise LayoutError("malformed head range in a reshard request")
        return cls(fmt(obj[0]), fmt(obj[1]), None if heads is None else (heads[0], heads[1]), obj[3])
