"""Scheduler side of the vLLM connector: decides what each engine step transfers.

Layer: engine integration. Runs in vLLM's scheduler process, holds no KV memory and no
sockets: it reads ``kv_transfer_params``, tells vLLM how many prompt tokens will arrive from a
producer, keeps a producer's blocks alive until the consumer confirms (``request_finished``
returns ``delay_free=True``; the worker side reports the request in ``finished_sending`` once
the registry says CONSUMED, FAILED or EXPIRED), and hands the worker side one
:class:`~.metadata.StepPlan` per step.

Block accounting: a transfer covers the request's prompt blocks, ``ceil(prompt / block_size)``
on both sides, so producer and consumer name the same number of blocks. A consumer that already
holds a local prefix-cache hit for the prompt's first blocks skips them in pull mode (the load's
``skip``: those shared blocks are neither rewritten nor moved). In push mode the producer writes
every prompt block, so hit blocks are rewritten with the producer's bytes for the same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vllm.v1.request import RequestStatus

from .config import TransferMode, TransferRole, VllmConnectorConfig
from .metadata import (
    PARAM_ID,
    PARAM_REMOTE_DECODE,
    PARAM_REMOTE_PREFILL,
    LoadSpec,
    PublishSpec,
    PushSpec,
    StepPlan,
    transfer_id_of,
)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["SchedulerSide"]

log = logging.getLogger(__name__)

# a prefill that ended this way computed the whole prompt's KV: worth handing to a decoder
_HANDOFF_STATUSES = frozenset({RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED})


class SchedulerSide:
    """The scheduler-process half of :class:`~.connector.KvxferConnector`.

    ``block_ids_of(req_id)`` returns the request's current block ids (first KV cache group);
    the facade wires it to vLLM's KV cache manager.
    """

    def __init__(self, config: VllmConnectorConfig, role: TransferRole, block_size: int,
                 block_ids_of: Callable[[str], Sequence[int]]):
        self._config = config
        self._role = role
        self._block_size = block_size
        self._block_ids_of = block_ids_of
        self._loads: list[LoadSpec] = []
        self._publishes: list[PublishSpec] = []
        self._loading: set[str] = set()               # consumer: load already planned
        self._local_hit: dict[str, int] = {}          # consumer: prompt tokens found in the local cache
        self._push_wanted: dict[str, tuple[str, Request]] = {}   # producer, push: not yet pushed
        self._pushed: dict[str, str] = {}             # producer, push: req id -> transfer id

    def _prompt_blocks(self, request: Request) -> int:
        return -(-request.num_prompt_tokens // self._block_size)

    @staticmethod
    def _handoff_params(key: str) -> dict[str, Any]:
        return {PARAM_REMOTE_PREFILL: True, PARAM_REMOTE_DECODE: False, PARAM_ID: key}

    # -- consumer ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Prompt tokens a producer will deliver beyond the local hit, loaded asynchronously."""
        if not self._role.consumes or request.request_id in self._loading:
            return 0, False
        if not transfer_id_of(request.kv_transfer_params, PARAM_REMOTE_PREFILL):
            return 0, False
        count = request.num_prompt_tokens - num_computed_tokens
        if count > 0:
            self._local_hit[request.request_id] = num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Consumer: plan the load into the blocks vLLM just allocated. Producer, push mode:
        remember the request until the step that completes its prefill."""
        rid = request.request_id
        params = request.kv_transfer_params
        if self._role.produces and self._config.mode is TransferMode.PUSH and rid not in self._pushed:
            key = transfer_id_of(params, PARAM_REMOTE_DECODE)
            if key == "":
                log.warning("request %s asks for a remote decode in push mode without %r; not pushing", rid, PARAM_ID)
            elif key is not None:
                self._push_wanted[rid] = (key, request)
        hit = self._local_hit.pop(rid, 0) // self._block_size  # whole blocks already in place here
        if num_external_tokens <= 0 or rid in self._loading:
            return
        key = transfer_id_of(params, PARAM_REMOTE_PREFILL)
        if not key:
            return
        dst = tuple(blocks.get_block_ids()[0][: self._prompt_blocks(request)])
        skip = min(hit, len(dst)) if self._config.mode is TransferMode.PULL else 0
        self._loading.add(rid)
        self._loads.append(LoadSpec(rid, key, dst, skip))

    # -- per step ----------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> StepPlan:
        """This step's plan; resets the pending lists."""
        pushes = self._due_pushes(scheduler_output) if self._push_wanted else ()
        plan = StepPlan(loads=tuple(self._loads), publishes=tuple(self._publishes), pushes=pushes)
        self._loads.clear()
        self._publishes.clear()
        return plan

    def _due_pushes(self, out: SchedulerOutput) -> tuple[PushSpec, ...]:
        # tokens computed before this step, for each scheduled request
        before = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        before.update(zip(cached.req_ids, cached.num_computed_tokens))
        due = []
        for rid, (key, request) in list(self._push_wanted.items()):
            n = out.num_scheduled_tokens.get(rid)
            if n is None or rid not in before or before[rid] + n < request.num_prompt_tokens:
                continue
            src = tuple(self._block_ids_of(rid)[: self._prompt_blocks(request)])
            del self._push_wanted[rid]
            self._pushed[rid] = key
            due.append(PushSpec(rid, key, src))
        return tuple(due)

    # -- end of a request --------------------------------------------------------------
    def request_finished(self, request: Request, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        """Producer: keep the blocks (True) until the worker side reports the consumer done,
        and return the ``kv_transfer_params`` for the decode instance. Consumer: nothing held."""
        rid = request.request_id
        self._loading.discard(rid)
        self._local_hit.pop(rid, None)
        self._push_wanted.pop(rid, None)
        if not self._role.produces:
            return False, None
        key = transfer_id_of(request.kv_transfer_params, PARAM_REMOTE_DECODE)
        if key is None:
            return False, None
        if self._config.mode is TransferMode.PUSH:
            pushed = self._pushed.pop(rid, None)
            if pushed is None:
                return False, None  # aborted before its prefill completed: nothing was written
            return True, self._handoff_params(pushed)
        if request.status not in _HANDOFF_STATUSES or not block_ids:
            return False, None
        key = key or rid
        src = tuple(block_ids[: self._prompt_blocks(request)])
        self._publishes.append(PublishSpec(rid, key, src, self._config.ttl_s))
        return True, self._handoff_params(key)
