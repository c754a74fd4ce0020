"""The compatibility check at first contact: is the producer's KV what this consumer expects?

Layer: engine integration, no vLLM import. The producer's scheduler side puts its
:class:`EngineSpec` into the ``kv_transfer_params`` it hands back (``kvxfer_spec``); the
consumer's scheduler side compares it with its own before it plans any load. A mismatch fails
the load with a message naming the field (the worker side reports every block of the request
as a load error, so vLLM's ``kv_load_failure_policy`` decides: recompute or fail).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .transfer_plan import GroupKind

__all__ = ["EngineSpec"]


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What both sides of a transfer must agree on.

    model: the model's name or path as vLLM was given it.
    dtype: the model's dtype (``torch.float16`` ...).
    kv_cache_dtype: vLLM's ``cache_dtype`` (``auto``, ``fp8`` ...).
    layout: vLLM's KV-cache layout (``NHD``, ``HND``, ``LBNHC`` ...).
    groups: per KV-cache group that transfers, ``[kind, block_size, window, layers, page_bytes]``
        (:meth:`~.groups.GroupInfo.describe`).
    tp_size: the engine's tensor-parallel size.
    kv: rank 0's ``KVSpec.to_wire()`` (heads, head size, order, MLA): what a consumer of another
        TP or block size plans its token-mapped reads from; None when it cannot be described.

    Equal TP, block sizes and layout: blocks move as they are. Otherwise (both sides with a
    ``kv``) full-attention, MLA and sliding-window groups are resharded (heads and token
    ranges; a window moves the tokens both sides' windows hold), and a state (Mamba) group's
    block moves as it is where TP is equal (the attention block size, hence the padded
    state page, may differ); another TP refuses for a state group, naming it.
    """

    model: str
    dtype: str
    kv_cache_dtype: str
    layout: str
    groups: tuple[tuple[Any, ...], ...] = ()
    tp_size: int = 1
    kv: dict[str, Any] | None = None

    def to_params(self) -> dict[str, Any]:
        """The msgpack/JSON-able form carried in ``kv_transfer_params``."""
        return {"model": self.model, "dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype,
                "layout": self.layout, "groups": [list(g) for g in self.groups], "tp_size": self.tp_size,
                "kv": self.kv}

    def needs_reshard(self, theirs: Mapping[str, Any]) -> bool:
        """Whether blocks from ``theirs`` must be resharded here (TP, block size or layout differ)."""
        mine = self.to_params()
        if mine["tp_size"] != theirs.get("tp_size") or mine["layout"] != theirs.get("layout"):
            return True
        groups = theirs.get("groups")
        return isinstance(groups, list) and any(
            isinstance(g, (list, tuple)) and len(g) == 5 and list(g)[1] != ga[1] for g, ga in zip(groups, mine["groups"]))

    def mismatch(self, theirs: Any) -> str:
        """Why the producer's spec ``theirs`` (its :meth:`to_params` form) cannot be loaded
        here, naming the first field that differs; "" when it can."""
        if not isinstance(theirs, Mapping):
            return f"the producer sent no usable kvxfer_spec ({type(theirs).__name__}); expected a mapping"
        mine = self.to_params()
        reshard = self.needs_reshard(theirs)
        if reshard and (self.kv is None or not isinstance(theirs.get("kv"), Mapping)):
            return ("tp_size, block_size or layout differs and a side cannot describe its heads for resharding: "
                    f"producer tp {theirs.get('tp_size')!r} layout {theirs.get('layout')!r}, "
                    f"consumer tp {self.tp_size!r} layout {self.layout!r}")
        for name in ("model", "dtype", "kv_cache_dtype") + (() if reshard else ("layout", "tp_size")):
            if mine[name] != theirs.get(name):
                return f"{name} differs: producer {theirs.get(name)!r}, consumer {mine[name]!r}"
        a, b = mine["groups"], theirs.get("groups")
        b = [list(g) for g in b] if isinstance(b, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in b) else b
        if not isinstance(b, list) or len(a) != len(b):
            return f"KV-cache groups differ: producer {len(b) if isinstance(b, list) else b!r} groups, consumer {len(a)}"
        for i, (ga, gb) in enumerate(zip(a, b)):
            for name, va, vb in zip(("kind", "block_size", "window", "layers", "page_bytes"), ga, gb):
                if reshard and name in ("block_size", "page_bytes"):
                    continue
                if va != vb:
                    return f"KV-cache group {i} {name} differs: producer {vb!r}, consumer {va!r}"
            if reshard and ga[0] == GroupKind.MAMBA.value:
                # one state block per request, sharded by heads in a way no spec describes:
                # it moves as it is, between equal TP only (the page may differ: vLLM pads
                # it to the attention page; the Connector's layout check compares the state)
                if theirs.get("tp_size") != self.tp_size:
                    return (f"KV-cache group {i} (state) moves between equal tp_size only (state sharding "
                            f"by heads is not described): producer tp {theirs.get('tp_size')!r}, "
                            f"consumer tp {self.tp_size!r}")
        return ""
