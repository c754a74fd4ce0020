"""Test harness: KV caches in vLLM's layouts, filled from one global token array, and the
token-by-token oracle of what a consumer rank must hold after its reads.

Layouts (per layer, as vLLM allocates them):

* ``fa``: FlashAttention, NHD ``[2, num_blocks, block_size, heads, head_dim]`` (``block_dim=1``);
* ``fi``: FlashInfer, HND ``[num_blocks, 2, heads, block_size, head_dim]`` (``block_dim=0``);
* ``mla``: ``[num_blocks, block_size, head_dim]`` (the latent, one "head"; ``block_dim=0``).

A model's KV is ``G[layer, kv, token, global head, dim]`` (uint16 or uint8 items). Each rank of
an engine holds its heads (as :func:`kvxfer.reshard.tp_kv_heads` says) of every token at the
request's block ids; everything else in its cache is noise (source) or poison (destination).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvxfer.integrations.vllm.transfer_plan import GroupKind, KVGroupSpec, KVSpec, RemoteRead
from kvxfer.layout import KVLayout
from kvxfer.ops import reference
from kvxfer.plan import plan_transfer
from kvxfer.reshard import HeadOrder, tp_kv_heads

LAYOUTS = ("fa", "fi", "mla")
POISON = 0xA5


def block_dim(layout: str) -> int:
    return 1 if layout == "fa" else 0


def order(layout: str) -> HeadOrder:
    return HeadOrder.HND if layout == "fi" else HeadOrder.NHD


def shape(layout: str, num_blocks: int, block_size: int, heads: int, dim: int) -> tuple[int, ...]:
    if layout == "fa":
        return (2, num_blocks, block_size, heads, dim)
    if layout == "fi":
        return (num_blocks, 2, heads, block_size, dim)
    assert heads == 1
    return (num_blocks, block_size, dim)


def token_view(arr: np.ndarray, layout: str) -> np.ndarray:
    """A ``[kv, num_blocks, block_size, heads, dim]`` view of one layer (kv is 1 for MLA)."""
    if layout == "fa":
        return arr
    if layout == "fi":
        return arr.transpose(1, 0, 3, 2, 4)
    return arr[None, :, :, None, :]


def spec(layout: str, tp: int, rank: int, block_size: int, heads: int, dim: int, *, itemsize: int = 2,
         groups: tuple[KVGroupSpec, ...] | None = None) -> KVSpec:
    mla = layout == "mla"
    return KVSpec("test-model", "bfloat16", "auto" if itemsize == 2 else "fp8", tp, rank, block_size,
                  1 if mla else heads, dim, order(layout), mla, itemsize,
                  groups if groups is not None else (KVGroupSpec(GroupKind.FULL, ()),))


def global_kv(layout: str, layers: int, tokens: int, heads: int, dim: int, seed: int, dtype=np.uint16) -> np.ndarray:
    """``G[layer, kv, token, head, dim]`` of the whole model."""
    kv, h = (1, 1) if layout == "mla" else (2, heads)
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(0, int(info.max) + 1, (layers, kv, tokens, h, dim), dtype=dtype)


def rank_cache(layout: str, G: np.ndarray, s: KVSpec, num_blocks: int, blocks: Sequence[int], *,
               fill_tokens: int | None = None, seed: int = 0, poison: bool = False,
               null_block: int = 0) -> list[np.ndarray]:
    """One rank's layers (``num_blocks`` blocks of ``s.block_size``) holding its heads of tokens
    ``[0, fill_tokens)`` (all of G's by default) at ``blocks``; the rest noise, or poison."""
    L, kv, T, H, D = G.shape
    h0, h1 = (0, 1) if s.mla else tp_kv_heads(s.num_kv_heads, s.tp_size, s.tp_rank)
    n = T if fill_tokens is None else fill_tokens
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(L):
        shp = shape(layout, num_blocks, s.block_size, h1 - h0, D)
        if poison:
            a = np.full(shp, POISON, dtype=np.uint8).view(G.dtype) if G.dtype.itemsize == 1 else \
                np.full(shp, POISON * 0x0101, dtype=G.dtype)
        else:
            a = rng.integers(0, int(np.iinfo(G.dtype).max) + 1, shp, dtype=G.dtype)
        v = token_view(a, layout)
        for t in range(n):
            b = blocks[t // s.block_size]
            if b != null_block:
                v[:, b, t % s.block_size] = G[layer, :, t, h0:h1]
        out.append(a)
    return out


def expected(layout: str, G: np.ndarray, s: KVSpec, before: Sequence[np.ndarray], blocks: Sequence[int],
             src_blocks: Sequence[int], src_block_size: int, lo: int, hi: int, *,
             null_block: int = 0) -> list[np.ndarray]:
    """``before`` with tokens ``[lo, hi)`` of this rank's heads written where both this side's
    and the source's block of the token are real (the oracle)."""
    h0, h1 = (0, 1) if s.mla else tp_kv_heads(s.num_kv_heads, s.tp_size, s.tp_rank)
    out = []
    for layer, b in enumerate(before):
        a = b.copy()
        v = token_view(a, layout)
        for t in range(lo, hi):
            d = blocks[t // s.block_size]
            if d != null_block and src_blocks[t // src_block_size] != null_block:
                v[:, d, t % s.block_size] = G[layer, :, t, h0:h1]
        out.append(a)
    return out


def views(arrs: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in arrs]


def run_reads(reads: Sequence[RemoteRead], sources: Sequence[Sequence[np.ndarray]], source_bd: int,
              dst: Sequence[np.ndarray], dst_bd: int) -> int:
    """Execute ``reads`` with the numpy reference: ``sources[rank]`` are that remote rank's layers.
    Returns the bytes moved."""
    dl = KVLayout.from_tensors(list(dst), block_dim=dst_bd)
    dv = [a.view(np.uint8).reshape(-1) for a in dst]
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
