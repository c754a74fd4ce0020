"""What the scheduler side tells the worker side each step, and the request parameters.

Layer: engine integration, no vLLM import. The scheduler builds one :class:`StepPlan` per engine
step; it crosses to the worker processes as msgpack bytes inside vLLM's connector metadata
(whatever vLLM uses to ship its SchedulerOutput, kvxfer's part is never pickled), and the
worker parses it back with every field type-checked.

``kv_transfer_params`` (the dict a proxy carries from the prefill to the decode instance):

* to the prefill instance: ``{"do_remote_decode": true, "kvxfer_id": ID}`` (``kvxfer_id`` is
  optional in pull mode: the prefill side then names the transfer after its own request id);
* from the prefill instance (``request_finished``) and to the decode instance:
  ``{"do_remote_prefill": true, "kvxfer_id": ID, "kvxfer_spec": {...}}``; ``kvxfer_spec``
  (:class:`~.compat.EngineSpec`) describes the producer's model and KV layout, which the
  consumer checks against its own before it loads anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from ...errors import LocalProtocolError

__all__ = [
    "PARAM_ID",
    "PARAM_REMOTE_DECODE",
    "PARAM_REMOTE_PREFILL",
    "PARAM_SPEC",
    "LoadSpec",
    "PublishSpec",
    "PushSpec",
    "StepPlan",
    "transfer_id_of",
]

PARAM_ID = "kvxfer_id"
PARAM_REMOTE_DECODE = "do_remote_decode"
PARAM_REMOTE_PREFILL = "do_remote_prefill"
PARAM_SPEC = "kvxfer_spec"

_PLAN_VERSION = 4  # 2: loads carry ``skip``; 3: specs name their KV-cache group, loads a refusal; 4: resharded loads
_MAX_ID_LEN = 512


def transfer_id_of(params: Mapping[str, Any] | None, flag: str) -> str | None:
    """The transfer id a request's ``kv_transfer_params`` asks for under ``flag``, else None.

    Returns "" when ``flag`` is set but no id is given (the caller picks one).
    """
    if not params or not params.get(flag):
        return None
    xid = params.get(PARAM_ID) or ""
    if not isinstance(xid, str) or len(xid) > _MAX_ID_LEN:
        return None
    return xid


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Consumer: bring transfer ``key`` into ``dst_blocks`` of KV-cache group ``group`` for vLLM
    request ``req_id``, all but the first ``skip`` blocks (a local prefix-cache hit already
    holds them). A non-empty ``refuse`` says why the load must fail at once (the compatibility
    check found the producer's model or layout different): the worker reports every block.

    ``remote``: the producer's per-rank KV description (``KVSpec.to_wire()``) when the two sides
    differ in tensor parallelism or block size; each worker rank then plans its reads of the
    ``num_tokens`` prompt tokens from the producer ranks that hold its heads (token-mapped)."""

    req_id: str
    key: str
    dst_blocks: tuple[int, ...]
    skip: int = 0
    group: int = 0
    refuse: str = ""
    num_tokens: int = 0
    remote: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PublishSpec:
    """Producer, pull mode: ``src_blocks`` (of KV-cache group ``group``) of ``req_id`` hold
    transfer ``key`` for ``ttl_s``."""

    req_id: str
    key: str
    src_blocks: tuple[int, ...]
    ttl_s: float
    group: int = 0


@dataclass(frozen=True, slots=True)
class PushSpec:
    """Producer, push mode: this step completes ``req_id``'s prefill; write ``src_blocks`` (of
    KV-cache group ``group``) layer by layer."""

    req_id: str
    key: str
    src_blocks: tuple[int, ...]
    group: int = 0


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Everything the workers start in one engine step."""

    loads: tuple[LoadSpec, ...] = ()
    publishes: tuple[PublishSpec, ...] = ()
    pushes: tuple[PushSpec, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.loads or self.publishes or self.pushes)

    def to_bytes(self) -> bytes:
        return msgpack.packb([
            _PLAN_VERSION,
            [[s.req_id, s.key, list(s.dst_blocks), s.skip, s.group, s.refuse, s.num_tokens, s.remote]
             for s in self.loads],
            [[s.req_id, s.key, list(s.src_blocks), s.ttl_s, s.group] for s in self.publishes],
            [[s.req_id, s.key, list(s.src_blocks), s.group] for s in self.pushes],
        ])

    @classmethod
    def from_bytes(cls, data: bytes) -> StepPlan:
        """Parse :meth:`to_bytes` output.

        Raises:
            LocalProtocolError: another version, or a malformed field.
        """
        try:
            obj = msgpack.unpackb(data, use_list=True, strict_map_key=True)
            version, loads, pubs, pushes = obj
            if version != _PLAN_VERSION:
                raise LocalProtocolError(f"step plan version {version!r}; this worker reads {_PLAN_VERSION}")
            return cls(
                loads=tuple(_load(*spec) for spec in loads),
                publishes=tuple(PublishSpec(_s(r), _s(k), _ids(b), float(t), _group(g)) for r, k, b, t, g in pubs),
                pushes=tuple(PushSpec(_s(r), _s(k), _ids(b), _group(g)) for r, k, b, g in pushes),
            )
        except LocalProtocolError:
            raise
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise LocalProtocolError(f"malformed step plan: {exc}") from None


def _load(r: Any, k: Any, b: Any, n: Any, g: Any, why: Any, num_tokens: Any, remote: Any) -> LoadSpec:
    ids = _ids(b)
    if type(n) is not int or not 0 <= n <= len(ids):
        raise TypeError(f"skip {n!r} is not a count of 0..{len(ids)} blocks")
    if not isinstance(why, str):
        raise TypeError("a load's refusal must be a string")
    if type(num_tokens) is not int or not 0 <= num_tokens < 1 << 40:
        raise TypeError(f"num_tokens {num_tokens!r} is not a token count")
    if remote is not None and not isinstance(remote, dict):
        raise TypeError("a load's remote KV description must be a map")
    return LoadSpec(_s(r), _s(k), ids, n, _group(g), why, num_tokens, remote)


def _group(g: Any) -> int:
    if type(g) is not int or not 0 <= g < 1024:
        raise TypeError(f"KV-cache group {g!r} is not an index 0..1023")
    return g


def _s(v: Any) -> str:
    if not isinstance(v, str) or len(v) > _MAX_ID_LEN:
        raise TypeError(f"expected an id string, got {type(v).__name__}")
    return v


def _ids(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(type(b) is int and b >= 0 for b in v):
        raise TypeError("expected a list of non-negative block ids")
    return tuple(v)
