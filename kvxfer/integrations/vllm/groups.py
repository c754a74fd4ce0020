"""Which blocks of each KV-cache group a request's transfer covers (no vLLM import).

Layer: engine integration. vLLM's hybrid KV-cache manager gives a request one block list per
KV-cache group; a block id belongs to one group at a time, and each group has its own layers:

* full attention: every prompt block, ``ceil(prompt / block_size)`` of them;
* sliding window: only the prompt blocks the window still holds once the prompt is computed,
  the blocks holding a token at or after ``prompt - window + 1`` (vLLM has already replaced the
  earlier ones by its null block on the producer, and the consumer never reads them);
* state (Mamba and other per-request states): the block holding the state after the prompt,
  block to block: the last real block among the positions the prompt covers (vLLM nulls the
  earlier ones once the prompt is computed; while it is computed they are still real).

Both sides compute the same positions from the prompt length and their group specs (which the
compatibility check makes equal), so a publication and a load name the same number of blocks
without the producer telling the consumer its block lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import LayoutError
from .transfer_plan import GroupKind

__all__ = ["NULL_BLOCK", "GroupKind", "GroupInfo", "transfer_slice"]

#: vLLM's null block (the block pool's first block, id 0) fills positions a group no longer holds
NULL_BLOCK = 0


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One KV-cache group as the connector sees it.

    index: the group's position in vLLM's ``kv_cache_groups`` (its block list's index).
    kind: how its positions map to blocks.
    block_size: tokens per block (a state group's block size is not used).
    window: the sliding window in tokens (0 unless ``kind`` is SLIDING_WINDOW).
    layers: the group's layer names.
    page_bytes: bytes per block and layer.
    """

    index: int
    kind: GroupKind
    block_size: int
    window: int = 0
    layers: tuple[str, ...] = ()
    page_bytes: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise LayoutError(f"KV-cache group {self.index}: block_size={self.block_size}; expected > 0")
        if self.kind is GroupKind.SLIDING_WINDOW and self.window <= 0:
            raise LayoutError(f"KV-cache group {self.index}: sliding window {self.window}; expected > 0 tokens")

    def describe(self) -> list:
        """The fields a peer must match, as a msgpack-able list (kind, block size, window, layers, page)."""
        return [self.kind.value, self.block_size, self.window, len(self.layers), self.page_bytes]


def transfer_slice(info: GroupInfo, num_prompt_tokens: int, block_ids: Sequence[int]) -> tuple[int, list[int]]:
    """(first position, block ids) of ``block_ids`` that a request's transfer covers in this group.

    ``block_ids`` is the request's block list for the group (null blocks included). For a state
    group: the position of the state block and that block.

    Raises:
        LayoutError: the list is shorter than the prompt needs, or a position the transfer
            covers holds vLLM's null block.
    """
    n = -(-num_prompt_tokens // info.block_size)
    if info.kind is GroupKind.MAMBA:
        real = [i for i, b in enumerate(block_ids[:max(1, n)]) if b != NULL_BLOCK]
        if not real:
            raise LayoutError(f"KV-cache group {info.index} (state) holds no state block for the prompt")
        return real[-1], [int(block_ids[real[-1]])]
    start = 0
    if info.kind is GroupKind.SLIDING_WINDOW:
        start = max(0, num_prompt_tokens - info.window + 1) // info.block_size
    if len(block_ids) < n:
        raise LayoutError(f"KV-cache group {info.index}: {len(block_ids)} blocks for a prompt of "
                          f"{num_prompt_tokens} tokens; expected {n}")
    ids = [int(b) for b in block_ids[start:n]]
    if NULL_BLOCK in ids:
        raise LayoutError(f"KV-cache group {info.index}: position {start + ids.index(NULL_BLOCK)} of the "
                          f"transfer holds the null block (the window no longer holds it)")
    return start, ids
