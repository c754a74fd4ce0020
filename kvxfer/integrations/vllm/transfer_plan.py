"""What a vLLM worker reads from its remote peer ranks for one request: the model-specific part.

Layer: engine integration, pure (no vLLM, torch or I/O). Each worker rank describes its KV cache
once, at first contact, as a :class:`KVSpec` (model, dtypes, tensor parallelism, block size,
heads, order, and its KV-cache groups). From the remote spec, the local spec and one request's
block ids per group, :func:`plan_group_reads` lists the reads this rank makes, one per remote
rank (and per run of tokens both sides still hold): the remote rank, the remote blocks, the
local blocks, and the :class:`~kvxfer.reshard.HeadReshard` that maps heads and tokens between
them, or None where the blocks are byte-identical and a plain block read does.

Conventions (vLLM's):

* Every rank of an engine holds the same block ids for a request (one scheduler per engine).
* A group's block list covers the request from token 0: token ``t`` is in block
  ``t // block_size``. Tokens ``[num_cached, num_tokens)`` are read: the remote computed
  ``num_tokens``, the local side already holds the first ``num_cached`` (prefix cache).
* Block id ``null_block`` (0: vLLM's null block) holds nothing. Sliding-window groups put it
  where blocks left the window; only tokens whose blocks are real on *both* sides are read.
* KV heads are sharded as :func:`kvxfer.reshard.tp_kv_heads` says (GQA replication when there
  are fewer KV heads than ranks); MLA's latent is on every rank (``mla=True``) and each local
  rank reads it from one remote rank.
* Mamba (state) groups are copied block to block, between ranks of the same index only.
* Tensors are registered in their physical order, with the spec's ``order`` saying which.
  vLLM 0.33's standardized layouts (``KVCacheLayout``) give each layer a logical view
  ``[blocks, heads, block_size, content]`` whose strides follow the physical order; register
  ``view.permute(*layout.layer_view_order)`` and take the order from
  :func:`vllm_layout_order`. There a block holds one piece and ``content`` is K then V
  (``2 * head_size``): the spec's ``head_dim`` is the content width (MLA: the latent, 576).
  Older layouts (``[2, blocks, block_size, heads, head_size]``, FlashInfer's ``[blocks, 2,
  heads, block_size, head_size]``) hold two pieces per block (K, V) and ``head_dim`` is the
  head size.
* Push mode (the producer writes): :func:`plan_writes` gives a producer rank the copies one
  consumer rank needs from it; they are that consumer's reads, issued as writes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from ...errors import BlockIdError, LayoutError, LayoutMismatchError, RemoteProtocolError
from ...reshard import BlockFormat, HeadOrder, HeadReshard, tp_consumers, tp_kv_heads, tp_sources

__all__ = ["GroupKind", "KVGroupSpec", "KVSpec", "RemoteRead", "consumer_ranks", "plan_group_reads", "plan_reads",
           "plan_writes", "vllm_layout_order"]


class GroupKind(enum.Enum):
    """What one KV-cache group holds."""

    FULL = "full"  # full attention
    SLIDING_WINDOW = "sliding_window"  # attention over the last ``sliding_window`` tokens
    MAMBA = "mamba"  # recurrent state (Mamba / SSM / linear attention): whole blocks, no tokens

    @property
    def attention(self) -> bool:
        return self is not GroupKind.MAMBA


_LAYOUT_ORDERS = {"LBNHC": HeadOrder.NHD, "BLNHC": HeadOrder.NHD, "NHD": HeadOrder.NHD,
                  "LBHNC": HeadOrder.HND, "BLHNC": HeadOrder.HND, "HND": HeadOrder.HND}


def vllm_layout_order(layout: str) -> HeadOrder:
    """The :class:`HeadOrder` of a layer's blocks under vLLM's KV-cache layout ``layout`` (a
    ``KVCacheLayout`` member name, or the legacy aliases ``NHD`` / ``HND``): tokens then heads
    (``LBNHC``, ``BLNHC``) or heads then tokens (``LBHNC``, ``BLHNC``).

    Raises:
        LayoutError: a layout that puts heads outside a layer's block (``LHBNC``, ``BHLNC``: a
            block's heads are not one run, which head slicing and token mapping need), or an
            unknown name.
    """
    name = getattr(layout, "name", layout)
    try:
        return _LAYOUT_ORDERS[str(name).upper()]
    except KeyError:
        raise LayoutError(
            f"KV-cache layout {name!r} is not supported for resharding: a layer's block must hold its heads "
            f"and tokens in one run (supported: {', '.join(_LAYOUT_ORDERS)})"
        ) from None


@dataclass(frozen=True, slots=True)
class KVGroupSpec:
    """One KV-cache group of a rank: its kind and layers (vLLM's ``KVCacheGroupSpec``).

    ``block_size``: tokens per block of this group, None for the spec's ``block_size``.
    ``sliding_window``: the window in tokens, for :attr:`GroupKind.SLIDING_WINDOW`.
    """

    kind: GroupKind
    layer_names: tuple[str, ...]
    block_size: int | None = None
    sliding_window: int | None = None

    def to_wire(self) -> dict:
        return {"kind": self.kind.value, "layers": list(self.layer_names), "block_size": self.block_size,
                "window": self.sliding_window}

    @classmethod
    def from_wire(cls, obj: object) -> KVGroupSpec:
        """Parse a peer's group description. Raises RemoteProtocolError when malformed."""
        if not isinstance(obj, Mapping) or set(obj) != {"kind", "layers", "block_size", "window"}:
            raise RemoteProtocolError(f"malformed KV-cache group description: {obj!r:.200}")
        try:
            kind = GroupKind(obj["kind"])
        except (ValueError, TypeError):
            raise RemoteProtocolError(f"unknown KV-cache group kind {obj['kind']!r:.50}") from None
        layers = obj["layers"]
        if not (isinstance(layers, list) and all(isinstance(x, str) for x in layers)):
            raise RemoteProtocolError("KV-cache group layers must be a list of names")
        for k in ("block_size", "window"):
            if obj[k] is not None and not _positive(obj[k]):
                raise RemoteProtocolError(f"KV-cache group {k} must be a positive int or None; got {obj[k]!r:.50}")
        return cls(kind, tuple(layers), obj["block_size"], obj["window"])


def _positive(v: object) -> bool:
    return type(v) is int and 0 < v < 1 << 40


@dataclass(frozen=True, slots=True)
class KVSpec:
    """One worker rank's KV cache as peers exchange it at first contact.

    ``num_kv_heads`` is the model's total (not the rank's share); ``head_dim`` the elements of
    one head of one token in one piece (vLLM 0.33's K-then-V content: ``2 * head_size``; the
    older two-piece layouts: ``head_size``; MLA: the latent width, e.g. 576); ``itemsize`` the
    bytes of one KV-cache element; ``order`` how a piece orders tokens and heads (see the
    module notes and :func:`vllm_layout_order`; MLA's ``[blocks, block_size, 576]`` is NHD
    with one head).
    ``groups`` defaults to one full-attention group with no layer names.
    """

    model: str
    dtype: str
    kv_cache_dtype: str
    tp_size: int
    tp_rank: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    order: HeadOrder = HeadOrder.NHD
    mla: bool = False
    itemsize: int = 2
    groups: tuple[KVGroupSpec, ...] = (KVGroupSpec(GroupKind.FULL, ()),)

    def __post_init__(self) -> None:
        for name in ("tp_size", "block_size", "num_kv_heads", "head_dim", "itemsize"):
            if not _positive(getattr(self, name)):
                raise LayoutError(f"KVSpec.{name} must be a positive int; got {getattr(self, name)!r}")
        if type(self.tp_rank) is not int or not 0 <= self.tp_rank < self.tp_size:
            raise LayoutError(f"KVSpec.tp_rank {self.tp_rank!r} out of range for tp_size {self.tp_size}")
        if not isinstance(self.order, HeadOrder):
            raise LayoutError(f"KVSpec.order must be a HeadOrder; got {self.order!r}")
        if not self.groups:
            raise LayoutError("KVSpec.groups must hold at least one KV-cache group")

    @property
    def local_heads(self) -> tuple[int, int]:
        """Global KV heads ``[h0, h1)`` this rank holds. Raises LayoutError when they do not divide."""
        return tp_kv_heads(self.num_kv_heads, self.tp_size, self.tp_rank, replicated=self.mla)

    def group_block_size(self, group: int) -> int:
        """Tokens per block of group ``group``."""
        return self.groups[group].block_size or self.block_size

    def block_format(self, group: int = 0) -> BlockFormat:
        """The :class:`BlockFormat` of one piece (K or V of one block) of an attention group."""
        h0, h1 = self.local_heads
        return BlockFormat(self.order, self.group_block_size(group), h1 - h0, self.head_dim, self.itemsize)

    def check_compatible(self, remote: KVSpec) -> None:
        """Whether this rank can exchange KV blocks with ``remote`` (any rank of the peer engine).

        Block sizes and head orders may differ; tensor parallelism may differ where the KV heads
        divide on both sides (Mamba groups need equal TP).

        Raises:
            LayoutMismatchError: naming the first field that differs and both values.
        """
        def differ(field: str, mine: object, theirs: object) -> LayoutMismatchError:
            return LayoutMismatchError(f"KV cache {field} differs: remote {theirs!r}, local {mine!r}")

        for f in ("model", "dtype", "kv_cache_dtype", "mla", "num_kv_heads", "head_dim", "itemsize"):
            if getattr(self, f) != getattr(remote, f):
                raise differ(f, getattr(self, f), getattr(remote, f))
        if len(self.groups) != len(remote.groups):
            raise differ("number of KV-cache groups", len(self.groups), len(remote.groups))
        for i, (g, r) in enumerate(zip(self.groups, remote.groups)):
            for f, mine, theirs in (("kind", g.kind, r.kind), ("layer_names", g.layer_names, r.layer_names),
                                    ("sliding_window", g.sliding_window, r.sliding_window)):
                if mine != theirs:
                    raise differ(f"group {i} {f}", mine.value if f == "kind" else mine,
                                 theirs.value if f == "kind" else theirs)
            if g.kind is GroupKind.MAMBA and self.tp_size != remote.tp_size:
                raise differ(f"tp_size (group {i} is a Mamba group, copied between equal ranks only)",
                             self.tp_size, remote.tp_size)
        for spec, side in ((self, "local"), (remote, "remote")):
            try:
                spec.local_heads
            except LayoutError as exc:
                raise LayoutMismatchError(f"KV cache tp_size: {side} side: {exc}") from None

    def to_wire(self) -> dict:
        """msgpack-able form, read by :meth:`from_wire`."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["order"] = self.order.value
        out["groups"] = [g.to_wire() for g in self.groups]
        return out

    @classmethod
    def from_wire(cls, obj: object) -> KVSpec:
        """Parse a peer's spec. Raises RemoteProtocolError when malformed."""
        names = {f.name for f in fields(cls)}
        if not isinstance(obj, Mapping) or set(obj) != names:
            raise RemoteProtocolError(f"malformed KV spec: expected the fields {sorted(names)}")
        for k in ("model", "dtype", "kv_cache_dtype"):
            if not isinstance(obj[k], str) or len(obj[k]) > 4096:
                raise RemoteProtocolError(f"KV spec field {k!r} must be a string")
        if type(obj["mla"]) is not bool:
            raise RemoteProtocolError("KV spec field 'mla' must be a bool")
        try:
            order = HeadOrder(obj["order"])
        except (ValueError, TypeError):
            raise RemoteProtocolError(f"unknown head order {obj['order']!r:.50} in a KV spec") from None
        if not isinstance(obj["groups"], list) or len(obj["groups"]) > 1024:
            raise RemoteProtocolError("KV spec field 'groups' must be a list")
        groups = tuple(KVGroupSpec.from_wire(g) for g in obj["groups"])
        ints = {k: obj[k] for k in ("tp_size", "tp_rank", "block_size", "num_kv_heads", "head_dim", "itemsize")}
        if not all(type(v) is int for v in ints.values()):
            raise RemoteProtocolError("KV spec sizes must be ints")
        try:
            return cls(obj["model"], obj["dtype"], obj["kv_cache_dtype"], order=order, mla=obj["mla"],
                       groups=groups, **ints)
        except LayoutError as exc:
            raise RemoteProtocolError(f"malformed KV spec: {exc}") from None


@dataclass(frozen=True, slots=True)
class RemoteRead:
    """One read of group ``group`` from remote rank ``src_rank``: its ``src_blocks`` into our
    ``dst_blocks`` with ``reshard`` (pass to ``Connector.read(..., reshard=)``), or a plain block
    read of equal-length lists when ``reshard`` is None (the blocks are byte-identical; a plain
    read moves whole blocks, the slots past the last token of a partial last block too)."""

    group: int
    src_rank: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    reshard: HeadReshard | None


def _real_ranges(blocks: Sequence[int], block_size: int, null_block: int) -> list[tuple[int, int]]:
    """Token ranges ``[a, b)`` covered by runs of real (not null) blocks."""
    out: list[tuple[int, int]] = []
    for i, b in enumerate(blocks):
        if b == null_block:
            continue
        lo, hi = i * block_size, (i + 1) * block_size
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _ids(blocks: Sequence[int], what: str) -> list[int]:
    try:
        out = [int(b) for b in blocks]
    except (TypeError, ValueError):
        raise BlockIdError(f"{what} must be a list of block ids") from None
    if any(b < 0 for b in out):
        raise BlockIdError(f"{what} holds negative block ids")
    return out


def plan_group_reads(remote: KVSpec, local: KVSpec, group: int, remote_blocks: Sequence[int],
                     local_blocks: Sequence[int], num_tokens: int, num_cached: int = 0, *,
                     null_block: int = 0) -> list[RemoteRead]:
    """The reads that fill group ``group`` of one request on this rank (``local``) from the
    remote engine's ranks (``remote``: the spec of any of its ranks), tokens
    ``[num_cached, num_tokens)``, in remote-rank order.

    ``remote_blocks`` / ``local_blocks``: the request's block ids of this group on each side,
    from token 0 (longer lists are fine: only the blocks holding the tokens are read). Attention
    groups get one read per remote rank that holds some of our heads (per run of tokens real on
    both sides: one run except where a sliding window left holes); Mamba groups one block-to-
    block read from the remote rank of our index, of the positions real on both sides.

    Raises:
        LayoutMismatchError: the specs are not compatible (:meth:`KVSpec.check_compatible`).
        BlockIdError: a list too short for ``num_tokens``, a null block inside a full-attention
            group's tokens, Mamba lists of different lengths, or token counts out of order.
    """
    local.check_compatible(remote)
    if not 0 <= group < len(local.groups):
        raise LayoutError(f"group {group} out of range; the spec has {len(local.groups)} groups")
    if not (type(num_tokens) is int and type(num_cached) is int and 0 <= num_cached <= num_tokens):
        raise BlockIdError(f"need 0 <= num_cached <= num_tokens (ints); got {num_cached!r} and {num_tokens!r}")
    rb, lb = _ids(remote_blocks, "remote block ids"), _ids(local_blocks, "local block ids")
    g = local.groups[group]
    if num_cached == num_tokens:
        return []
    if g.kind is GroupKind.MAMBA:
        if len(rb) != len(lb):
            raise BlockIdError(f"Mamba group {group}: {len(rb)} remote blocks but {len(lb)} local blocks; "
                               f"state blocks are copied one to one")
        pairs = [(s, d) for s, d in zip(rb, lb) if s != null_block and d != null_block]
        if not pairs:
            return []
        return [RemoteRead(group, local.tp_rank, tuple(s for s, _ in pairs), tuple(d for _, d in pairs), None)]

    bs, bd = remote.group_block_size(group), local.group_block_size(group)
    for blocks, b, side in ((rb, bs, "remote"), (lb, bd, "local")):
        need = -(-num_tokens // b)
        if len(blocks) < need:
            raise BlockIdError(f"group {group}: {num_tokens} tokens need {need} {side} blocks of {b} tokens; "
                               f"the {side} list holds {len(blocks)}")
    if g.kind is GroupKind.SLIDING_WINDOW:
        ranges = _intersect(_real_ranges(rb, bs, null_block), _real_ranges(lb, bd, null_block))
        ranges = [(max(a, num_cached), min(b, num_tokens)) for a, b in ranges]
        ranges = [(a, b) for a, b in ranges if a < b]
    else:
        for blocks, b, side in ((rb, bs, "remote"), (lb, bd, "local")):
            lo, hi = num_cached // b, -(-num_tokens // b)
            if null_block in blocks[lo:hi]:
                raise BlockIdError(f"full-attention group {group}: the {side} blocks of tokens "
                                   f"[{num_cached}, {num_tokens}) include the null block {null_block}")
        ranges = [(num_cached, num_tokens)]

    src_fmt = BlockFormat(remote.order, bs, _nheads(remote), remote.head_dim, remote.itemsize)
    dst_fmt = local.block_format(group)
    sources = tp_sources(local.num_kv_heads, remote.tp_size, local.tp_size, local.tp_rank, replicated=local.mla)
    reads: list[RemoteRead] = []
    for hs in sources:
        whole = hs.src_heads == (0, src_fmt.num_heads) and hs.dst_head_start == 0
        for a, b in ranges:
            s0, s1 = a // bs, -(-b // bs)
            d0, d1 = a // bd, -(-b // bd)
            if whole and src_fmt == dst_fmt and a % bs == 0:
                # byte-identical blocks, from a block boundary: a plain read of whole blocks
                reshard = None
            else:
                reshard = HeadReshard(src_fmt, dst_fmt, hs.src_heads, hs.dst_head_start,
                                      num_tokens=b - a, src_start=a % bs, dst_start=a % bd)
            reads.append(RemoteRead(group, hs.src_rank, tuple(rb[s0:s1]), tuple(lb[d0:d1]), reshard))
    return reads


def _nheads(spec: KVSpec) -> int:
    h0, h1 = spec.local_heads
    return h1 - h0


def plan_reads(remote: KVSpec, local: KVSpec, remote_blocks: Sequence[Sequence[int]],
               local_blocks: Sequence[Sequence[int]], num_tokens: int, num_cached: int = 0, *,
               null_block: int = 0) -> list[RemoteRead]:
    """:func:`plan_group_reads` of every group (``remote_blocks[g]`` / ``local_blocks[g]``: vLLM's
    ``get_block_ids()`` of the request on each side), group by group.

    Raises:
        BlockIdError: not one block list per group; otherwise as :func:`plan_group_reads`.
    """
    n = len(local.groups)
    if len(remote_blocks) != n or len(local_blocks) != n:
        raise BlockIdError(f"need one block list per KV-cache group ({n}); got {len(remote_blocks)} remote "
                           f"and {len(local_blocks)} local lists")
    out: list[RemoteRead] = []
    for g in range(n):
        out += plan_group_reads(remote, local, g, remote_blocks[g], local_blocks[g], num_tokens, num_cached,
                                null_block=null_block)
    return out


def plan_writes(producer: KVSpec, consumer: KVSpec, producer_blocks: Sequence[Sequence[int]],
                consumer_blocks: Sequence[Sequence[int]], num_tokens: int, num_cached: int = 0, *,
                null_block: int = 0) -> list[RemoteRead]:
    """Push mode: what rank ``producer.tp_rank`` writes into rank ``consumer.tp_rank`` of the
    consumer (its reads from this rank, every group): pass each as ``Connector.write(peer,
    src_blocks, dst_blocks, reshard=reshard)``. Empty when that consumer rank needs nothing
    from this one (see :func:`consumer_ranks`).

    Raises:
        as :func:`plan_reads`.
    """
    reads = plan_reads(producer, consumer, producer_blocks, consumer_blocks, num_tokens, num_cached,
                       null_block=null_block)
    return [r for r in reads if r.src_rank == producer.tp_rank]


def consumer_ranks(producer: KVSpec, consumer: KVSpec) -> list[int]:
    """The consumer engine's ranks that read from ``producer``'s rank (``consumer``: the spec of
    any of its ranks): the producer frees a request's blocks once all of them confirmed (none
    listed: no rank reads from this one, it may free at once).

    Raises:
        LayoutMismatchError: the specs are not compatible.
    """
    producer.check_compatible(consumer)
    return tp_consumers(producer.num_kv_heads, producer.tp_size, consumer.tp_size, producer.tp_rank,
                        replicated=producer.mla)
