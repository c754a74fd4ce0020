"""A tiny decoder-only transformer with a paged KV cache, for the disaggregated-serving demo.

Layer: example (engine side). Nothing here knows about kvxfer: this is the "engine" whose KV
cache the prefill and decode workers hand to each other. Grouped-query attention (fewer K/V
heads than query heads), rotary position embeddings, RMSNorm, a SwiGLU MLP; weights are random
from a fixed seed (drawn on the CPU, then moved, so every device holds the same numbers).

The KV cache is paged: one tensor per layer, ``[2 (K/V), num_blocks, block_size, kv_heads,
head_dim]``, a block table per request, blocks taken from a :class:`BlockAllocator` whose free
list starts shuffled, so a request's blocks are scattered through the cache as in a real engine.

Every request is computed on its own (no cross-request batching), so the arithmetic of a token
never depends on what else runs: a worker and the one-process reference produce bit-identical
logits, which is what lets the demo compare tokens exactly.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "BlockAllocator",
    "ModelConfig",
    "OutOfBlocksError",
    "PagedKVCache",
    "TinyDecoder",
    "blocks_for",
    "reference_generate",
]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of the model and of its KV blocks; both workers must use the same one."""

    vocab: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn: int = 256
    block_size: int = 16
    rope: bool = True
    rope_theta: float = 10000.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope and self.head_dim % 2:
            raise ValueError("rotary embeddings need an even head_dim")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers (float32)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


def blocks_for(n_tokens: int, block_size: int) -> int:
    """Number of blocks that hold ``n_tokens`` tokens."""
    return -(-n_tokens // block_size)


class OutOfBlocksError(RuntimeError):
    """The allocator has fewer free blocks than asked for."""


class BlockAllocator:
    """A free list of KV blocks. Thread-safe; refuses double frees and foreign ids.

    The free list starts shuffled (``seed``) and takes freed blocks back at its end, so blocks of
    one request are neither contiguous nor in order.
    """

    def __init__(self, num_blocks: int, seed: int = 0):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))
        random.Random(seed).shuffle(self._free)
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks. Raises OutOfBlocksError when fewer are free."""
        with self._lock:
            if n > len(self._free):
                raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} of {self.num_blocks} free")
            out, self._free = self._free[:n], self._free[n:]
            self._used.update(out)
            return out

    def free(self, blocks: Sequence[int]) -> None:
        """Give blocks back. Raises ValueError on a block that is not allocated."""
        with self._lock:
            for b in blocks:
                if b not in self._used:
                    raise ValueError(f"block {b} freed but not allocated (double free?)")
                self._used.remove(b)
                self._free.append(b)

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    def is_whole(self) -> bool:
        """True when every block is free again, each exactly once."""
        with self._lock:
            return not self._used and sorted(self._free) == list(range(self.num_blocks))


class PagedKVCache:
    """Per-layer K/V tensors ``[2, num_blocks, block_size, kv_heads, head_dim]`` (float32)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.layers = [torch.zeros(2, num_blocks, cfg.block_size, cfg.n_kv_heads, cfg.head_dim, device=device)
                       for _ in range(cfg.n_layers)]

    def _slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bs = self.cfg.block_size
        return table[positions // bs] * bs + positions % bs

    def write(self, layer: int, table: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V ``[T, kv_heads, head_dim]`` of ``positions`` through the block table."""
        flat = self.layers[layer].view(2, -1, self.cfg.n_kv_heads, self.cfg.head_dim)
        slots = self._slots(table, positions)
        flat[0, slots] = k
        flat[1, slots] = v

    def read(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``0..length-1``, gathered from the request's blocks."""
        flat = self.layers[layer].view(2, -1, self.cfg.n_kv_heads, self.cfg.head_dim)
        slots = self._slots(table, torch.arange(length, device=table.device))
        return flat[0, slots], flat[1, slots]


class TinyDecoder:
    """The model: weights and the two forward passes (prefill a prompt, decode one token)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(cfg.seed)

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) / math.sqrt(shape[0])).to(self.device)

        d, hd = cfg.d_model, cfg.head_dim
        self.embed = torch.randn(cfg.vocab, d, generator=g).to(self.device)
        self.blocks = [{"wq": w(d, cfg.n_heads * hd), "wk": w(d, cfg.n_kv_heads * hd), "wv": w(d, cfg.n_kv_heads * hd),
                        "wo": w(cfg.n_heads * hd, d), "w_gate": w(d, cfg.ffn), "w_up": w(d, cfg.ffn),
                        "w_down": w(cfg.ffn, d), "n1": torch.ones(d, device=self.device),
                        "n2": torch.ones(d, device=self.device)}
                       for _ in range(cfg.n_layers)]
        self.norm = torch.ones(d, device=self.device)
        self.lm_head = w(d, cfg.vocab)
        self.inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=self.device) / hd)

    # -- pieces ---------------------------------------------------------------------------
    @staticmethod
    def _rmsnorm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.cfg.rope:
            return x
        ang = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]      # [T, hd/2]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int) -> torch.Tensor:
        """Causal GQA: q ``[T, H, hd]`` at positions q_start.., k/v ``[S, KVH, hd]`` at 0..S-1."""
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(self.cfg.head_dim)
        t, s = q.shape[0], k.shape[0]
        if t > 1:
            qpos = torch.arange(q_start, q_start + t, device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(s, device=q.device)[None, :] > qpos, float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v)
        return out.reshape(t, -1)

    def _layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
               table: torch.Tensor) -> torch.Tensor:
        p, cfg = self.blocks[i], self.cfg
        h = self._rmsnorm(x, p["n1"])
        q = self._rope((h @ p["wq"]).view(-1, cfg.n_heads, cfg.head_dim), positions)
        k = self._rope((h @ p["wk"]).view(-1, cfg.n_kv_heads, cfg.head_dim), positions)
        v = (h @ p["wv"]).view(-1, cfg.n_kv_heads, cfg.head_dim)
        cache.write(i, table, positions, k, v)
        start = int(positions[0])
        if start == 0:   # prefill: attend over the fresh K/V (the cache holds the same values)
            kk, vv = k, v
        else:            # decode: everything before comes from the (possibly transferred) cache
            kk, vv = cache.read(i, table, start + x.shape[0])
        x = x + self._attend(q, kk, vv, start) @ p["wo"]
        h = self._rmsnorm(x, p["n2"])
        return x + (torch.nn.functional.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]

    def _next_token(self, x_last: torch.Tensor) -> int:
        return int(torch.argmax(self._rmsnorm(x_last, self.norm) @ self.lm_head))

    # -- forward passes ---------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, cache: PagedKVCache, table: torch.Tensor, tokens: Sequence[int],
                on_layer_done: Callable[[int], None] | None = None) -> int:
        """Run the prompt, fill its K/V into ``table``'s blocks, return the first generated token.

        ``on_layer_done(i)`` runs once layer ``i``'s K/V is in the cache (push mode sends it).
        """
        x = self.embed[torch.as_tensor(list(tokens), device=self.device)]
        positions = torch.arange(len(tokens), device=self.device)
        for i in range(self.cfg.n_layers):
            x = self._layer(i, x, positions, cache, table)
            if on_layer_done is not None:
                on_layer_done(i)
        return self._next_token(x[-1])

    @torch.inference_mode()
    def decode_step(self, cache: PagedKVCache, table: torch.Tensor, token: int, position: int) -> int:
        """Feed ``token`` at ``position`` (K/V of 0..position-1 already cached); next token."""
        x = self.embed[torch.tensor([token], device=self.device)]
        positions = torch.tensor([position], device=self.device)
        for i in range(self.cfg.n_layers):
            x = self._layer(i, x, positions, cache, table)
        return self._next_token(x[-1])

    def table(self, blocks: Sequence[int]) -> torch.Tensor:
        """A block table tensor on this model's device."""
        return torch.tensor(list(blocks), dtype=torch.long, device=self.device)


def reference_generate(cfg: ModelConfig, prompts: Sequence[Sequence[int]], n_new: int,
                       device: str = "cpu", num_blocks: int = 256) -> list[list[int]]:
    """The one-process run: prefill and decode every prompt in a single cache; ``n_new`` tokens each."""
    model = TinyDecoder(cfg, device)
    cache = PagedKVCache(cfg, num_blocks, device)
    alloc = BlockAllocator(num_blocks, seed=cfg.seed + 99)
    out = []
    for prompt in prompts:
        blocks = alloc.allocate(blocks_for(len(prompt) + n_new, cfg.block_size))
        table = model.table(blocks)
        toks = [model.prefill(cache, table, prompt)]
        while len(toks) < n_new:
            toks.append(model.decode_step(cache, table, toks[-1], len(prompt) + len(toks) - 1))
        alloc.free(blocks)
        out.append(toks)
    if not alloc.is_whole():
        raise AssertionError("reference run leaked KV blocks")
    return out
