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
    """

    model: str
    dtype: str
    kv_cache_dtype: str
    layout: str
    groups: tuple[tuple[Any, ...], ...] = ()

    def to_params(self) -> dict[str, Any]:
        """The msgpack/JSON-able form carried in ``kv_transfer_params``."""
        return {"model": self.model, "dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype,
                "layout": self.layout, "groups": [list(g) for g in self.groups]}

    def mismatch(self, theirs: Any) -> str:
        """Why the producer's spec ``theirs`` (its :meth:`to_params` form) cannot be loaded
        here, naming the first field that differs; "" when it can."""
        if not isinstance(theirs, Mapping):
            return f"the producer sent no usable kvxfer_spec ({type(theirs).__name__}); expected a mapping"
        mine = self.to_params()
        for f in fields(self):
            a, b = mine[f.name], theirs.get(f.name)
            if f.name == "groups":
                b = [list(g) for g in b] if isinstance(b, (list, tuple)) else b
                if isinstance(b, list) and len(a) == len(b):
                    for i, (ga, gb) in enumerate(zip(a, b)):
                        for name, va, vb in zip(("kind", "block_size", "window", "layers", "page_bytes"), ga, gb):
                            if va != vb:
                                return (f"KV-cache group {i} {name} differs: producer {vb!r}, "
                                        f"consumer {va!r}")
                    continue
                return (f"KV-cache groups differ: producer {len(b) if isinstance(b, list) else b!r} groups, "
                        f"consumer {len(a)}")
            if a != b:
                return f"{f.name} differs: producer {b!r}, consumer {a!r}"
        return ""
