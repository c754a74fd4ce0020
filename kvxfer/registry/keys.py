"""Registry keys of one request's publications: one per producer rank and KV-cache group.

Layer: registry (naming only). A request that moves from several producer ranks (tensor
parallelism) or in several KV-cache groups (a hybrid model: each group has its own block ids
and layers) is published under one key per (rank, group); each consumer rank pulls the keys it
needs, each with its own blocks, reshard and layers.
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["publication_key"]


def publication_key(request_id: str, rank: int, group: int | None = None) -> str:
    """``"<request_id>#tp<rank>"``, with ``"#g<group>"`` appended when ``group`` is given.

    Raises:
        ConfigError: empty request id, or a negative rank or group.
    """
    if not request_id:
        raise ConfigError("request id must not be empty")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"rank={rank!r}; expected a non-negative int (the producer's TP rank)")
    key = f"{request_id}#tp{rank}"
    if group is None:
        return key
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise ConfigError(f"group={group!r}; expected a non-negative int (the KV-cache group) or None")
    return f"{key}#g{group}"
