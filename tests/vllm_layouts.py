"""Test harness: KV caches in vLLM's layouts, filled from one global token array, and the
token-by-token oracle of what a consumer rank must hold after its reads.

Layouts (per layer, as vLLM allocates them):

* ``fa``: FlashAttention, NHD ``[2, num_blocks, block_size, heads, head_dim]`` (``block_dim=1``);
* ``fi``: FlashInfer, HND ``[num_blocks, 2, heads, block_size, head_dim]`` (``block_dim=0``);
* ``mla``: ``[num_blocks, block_size, head_dim]`` (the latent, one "head"; ``block_dim=0``);
* vLLM 0.33's standardized layouts, registered in physical order, K then V in the content:
  ``nhc`` (``LBNHC``) ``[num_blocks, block_size, heads, 2 * head_dim]``, ``hnc`` (``LBHNC``)
  ``[num_blocks, heads, block_size, 2 * head_dim]``, and ``blnhc`` (``BLNHC``): every layer a
  strided view ``big[:, layer]`` of one ``[num_blocks, layers, block_size, heads, 2 * head_dim]``
  allocation (block-major).

A model's KV is ``G[layer, kv, token, global head, dim]`` (uint16 or uint8 items). Each rank of
an engine holds its heads (as :func:`kvxfer.reshard.tp_kv_heads` says) of every token at the
request's block ids (the same ids on every rank, as vLLM's one scheduler gives them);
everything else in a source cache is noise, in a destination cache poison. A :class:`Case` is
deterministic from its fields, so a process can rebuild any other rank's cache and the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvxfer.integrations.vllm.transfer_plan import GroupKind, KVGroupSpec, KVSpec, RemoteRead, plan_reads
from kvxfer.layout import KVLayout
from kvxfer.ops import reference
from kvxfer.plan import plan_transfer
from kvxfer.reshard import HeadOrder, tp_kv_heads

LAYOUTS = ("fa", "fi", "mla")
LAYOUTS_V33 = ("nhc", "hnc", "blnhc")
POISON = 0xA5


def block_dim(layout: str) -> int:
    return 1 if layout == "fa" else 0


def order(layout: str) -> HeadOrder:
    return HeadOrder.HND if layout in ("fi", "hnc") else HeadOrder.NHD


def content(layout: str, dim: int) -> int:
    """The spec's ``head_dim``: K then V side by side in the 0.33 layouts."""
    return 2 * dim if layout in LAYOUTS_V33 else dim


def shape(layout: str, num_blocks: int, block_size: int, heads: int, dim: int) -> tuple[int, ...]:
    """One layer's shape (for ``blnhc``, of its view)."""
    if layout == "fa":
        return (2, num_blocks, block_size, heads, dim)
    if layout == "fi":
        return (num_blocks, 2, heads, block_size, dim)
    if layout in ("nhc", "blnhc"):
        return (num_blocks, block_size, heads, 2 * dim)
    if layout == "hnc":
        return (num_blocks, heads, block_size, 2 * dim)
    assert heads == 1
    return (num_blocks, block_size, dim)


def _split(arr: np.ndarray, shp: tuple[int, ...]) -> np.ndarray:
    v = arr.view()
    v.shape = shp  # raises rather than copies
    return v


def token_view(arr: np.ndarray, layout: str) -> np.ndarray:
    """A writable ``[kv, num_blocks, block_size, heads, dim]`` view of one layer (kv is 1 for MLA)."""
    if layout == "fa":
        return arr
    if layout == "fi":
        return arr.transpose(1, 0, 3, 2, 4)
    if layout in ("nhc", "blnhc"):
        nb, bs, h, c = arr.shape
        return _split(arr, (nb, bs, h, 2, c // 2)).transpose(3, 0, 1, 2, 4)
    if layout == "hnc":
        nb, h, bs, c = arr.shape
        return _split(arr, (nb, h, bs, 2, c // 2)).transpose(3, 0, 2, 1, 4)
    return arr[None, :, :, None, :]


def root_of(a: np.ndarray) -> tuple[np.ndarray, int]:
    """(the contiguous array ``a`` is a view of, ``a``'s first byte's offset in it)."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    assert root.flags.c_contiguous
    return root, a.__array_interface__["data"][0] - root.__array_interface__["data"][0]


def views(arrs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """uint8 arrays over each tensor from its first byte (to its allocation's end)."""
    out = []
    for a in arrs:
        root, off = root_of(a)
        out.append(root.view(np.uint8).reshape(-1)[off:])
    return out


def _slots(blocks: Sequence[int], block_size: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token, block id, offset in block) of tokens ``[lo, hi)``."""
    t = np.arange(lo, hi, dtype=np.int64)
    return t, np.asarray(blocks, dtype=np.int64)[t // block_size], t % block_size


@dataclass(frozen=True)
class Case:
    """One request moved from a ``src_tp`` engine to a ``dst_tp`` engine, every rank's cache."""

    layout: str
    heads: int  # model KV heads (1 for MLA)
    src_tp: int
    dst_tp: int
    bs_src: int
    bs_dst: int
    tokens: int
    cached: int = 0  # tokens the destination holds already
    dim: int = 8
    itemsize: int = 2
    layers: int = 2
    src_nulls: int = 0  # leading null blocks (a sliding window) on each side
    dst_nulls: int = 0
    kind: GroupKind = GroupKind.FULL
    seed: int = 0

    @property
    def dtype(self):
        return np.uint16 if self.itemsize == 2 else np.uint8

    @property
    def groups(self) -> tuple[KVGroupSpec, ...]:
        window = 64 if self.kind is GroupKind.SLIDING_WINDOW else None
        return (KVGroupSpec(self.kind, tuple(f"layer{i}" for i in range(self.layers)), sliding_window=window),)

    def spec(self, side: str, rank: int) -> KVSpec:
        tp, bs = (self.src_tp, self.bs_src) if side == "src" else (self.dst_tp, self.bs_dst)
        mla = self.layout == "mla"
        return KVSpec("test-model", "bfloat16", "auto" if self.itemsize == 2 else "fp8", tp, rank, bs,
                      1 if mla else self.heads, content(self.layout, self.dim), order(self.layout), mla, self.itemsize,
                      self.groups)

    @property
    def num_blocks(self) -> tuple[int, int]:
        return -(-self.tokens // self.bs_src) + 5, -(-self.tokens // self.bs_dst) + 4

    def blocks(self, side: str) -> list[int]:
        """The request's block ids on ``side`` (never 0, vLLM's null block, except the leading nulls)."""
        rng = np.random.default_rng(self.seed + (0 if side == "src" else 1))
        bs, nb, nulls = (self.bs_src, self.num_blocks[0], self.src_nulls) if side == "src" else \
            (self.bs_dst, self.num_blocks[1], self.dst_nulls)
        ids = (rng.permutation(nb - 1)[: -(-self.tokens // bs)] + 1).tolist()
        return [0] * nulls + ids[nulls:]

    def G(self) -> np.ndarray:
        kv, h = (1, 1) if self.layout == "mla" else (2, self.heads)
        top = int(np.iinfo(self.dtype).max) + 1
        return np.random.default_rng(self.seed).integers(0, top, (self.layers, kv, self.tokens, h, self.dim),
                                                         dtype=self.dtype)

    def _heads(self, s: KVSpec) -> tuple[int, int]:
        return (0, 1) if s.mla else tp_kv_heads(s.num_kv_heads, s.tp_size, s.tp_rank)

    def _cache(self, side: str, rank: int, G: np.ndarray, lo: int, hi: int, poison: bool) -> list[np.ndarray]:
        s = self.spec(side, rank)
        h0, h1 = self._heads(s)
        nb = self.num_blocks[0 if side == "src" else 1]
        shp = shape(self.layout, nb, s.block_size, h1 - h0, self.dim)
        rng = np.random.default_rng(self.seed * 1000 + rank + (500 if side == "dst" else 0))
        t, b, o = _slots(self.blocks(side), s.block_size, lo, hi)
        keep = b != 0
        def fill(shp: tuple[int, ...]) -> np.ndarray:
            if poison:
                return np.full(shp, POISON * 0x0101 if self.itemsize == 2 else POISON, dtype=self.dtype)
            return rng.integers(0, int(np.iinfo(self.dtype).max) + 1, shp, dtype=self.dtype)

        if self.layout == "blnhc":  # one block-major allocation, a strided view per layer
            big = fill((shp[0], self.layers, *shp[1:]))
            layers = [big[:, layer] for layer in range(self.layers)]
        else:
            layers = [fill(shp) for _ in range(self.layers)]
        out = []
        for layer, a in enumerate(layers):
            v = token_view(a, self.layout)
            v[:, b[keep], o[keep]] = G[layer, :, t[keep], h0:h1].transpose(1, 0, 2, 3)
            out.append(a)
        return out

    def source(self, rank: int, G: np.ndarray | None = None) -> list[np.ndarray]:
        """Source rank ``rank``'s layers: its heads of every token, noise elsewhere."""
        return self._cache("src", rank, self.G() if G is None else G, 0, self.tokens, False)

    def before(self, rank: int, G: np.ndarray | None = None) -> list[np.ndarray]:
        """Destination rank ``rank``'s layers before the reads: poison, the cached prefix filled."""
        return self._cache("dst", rank, self.G() if G is None else G, 0, self.cached, True)

    def reads(self, rank: int) -> list[RemoteRead]:
        return plan_reads(self.spec("src", 0), self.spec("dst", rank), [self.blocks("src")], [self.blocks("dst")],
                          self.tokens, self.cached)

    def expected(self, rank: int, reads: Sequence[RemoteRead], G: np.ndarray | None = None) -> list[np.ndarray]:
        """The oracle: ``before`` with tokens ``[cached, tokens)`` of this rank's heads written
        where both sides' blocks of the token are real; past the last token of a partial last
        block, a plain read (no reshard) brings the source block's bytes too."""
        G = self.G() if G is None else G
        out = self.before(rank, G)
        s = self.spec("dst", rank)
        h0, h1 = self._heads(s)
        t, db, do = _slots(self.blocks("dst"), self.bs_dst, self.cached, self.tokens)
        _, sb, _ = _slots(self.blocks("src"), self.bs_src, self.cached, self.tokens)
        keep = (db != 0) & (sb != 0)
        plain = [r for r in reads if r.reshard is None]
        tail_lo, tail_hi = self.tokens, -(-self.tokens // self.bs_dst) * self.bs_dst
        for layer, a in enumerate(out):
            v = token_view(a, self.layout)
            v[:, db[keep], do[keep]] = G[layer, :, t[keep], h0:h1].transpose(1, 0, 2, 3)
        for r in plain:
            src = self.source(r.src_rank, G)
            tt, tdb, tdo = _slots(self.blocks("dst"), self.bs_dst, tail_lo, tail_hi)
            _, tsb, tso = _slots(self.blocks("src"), self.bs_src, tail_lo, tail_hi)
            for a, sa in zip(out, src):
                token_view(a, self.layout)[:, tdb, tdo] = token_view(sa, self.layout)[:, tsb, tso]
        return out


def run_reads(reads: Sequence[RemoteRead], sources: Sequence[Sequence[np.ndarray]], source_bd: int,
              dst: Sequence[np.ndarray], dst_bd: int) -> int:
    """Execute ``reads`` with the numpy reference: ``sources[rank]`` are that remote rank's layers.
    Returns the bytes moved."""
    dl = KVLayout.from_tensors(list(dst), block_dim=dst_bd)
    dv = views(dst)
    moved = 0
    for r in reads:
        src = sources[r.src_rank]
        sl = KVLayout.from_tensors(list(src), block_dim=source_bd)
        if r.reshard is None:
            plan = plan_transfer(sl.geometry, dl.geometry, list(r.src_blocks), list(r.dst_blocks))
        else:
            plan = r.reshard.plan(sl.geometry, dl.geometry, np.asarray(r.src_blocks, dtype=np.int64),
                                  np.asarray(r.dst_blocks, dtype=np.int64), None)
        reference.copy_blocks(plan, views(src), dv)
        moved += plan.nbytes
    return moved
