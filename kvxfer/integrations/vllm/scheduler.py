"""Scheduler side of the vLLM connector: decides what each engine step transfers.

Layer: engine integration. Runs in vLLM's scheduler process, holds no KV memory and no
sockets: it reads ``kv_transfer_params``, tells vLLM how many prompt tokens will arrive from a
producer, keeps a producer's blocks alive until the consumer confirms (``request_finished``
returns ``delay_free=True``; the worker side reports the request in ``finished_sending`` once
the registry says CONSUMED, FAILED or EXPIRED), and hands the worker side one
:class:`~.metadata.StepPlan` per step.

Block accounting: a request moves one transfer per KV-cache group, each over the blocks
:func:`~.groups.transfer_slice` picks (every prompt block of a full-attention group, the blocks a
sliding window still holds, a state group's blocks), the same count on both sides. A consumer
that already holds a local prefix-cache hit for the prompt's first blocks skips them in pull
mode (the load's ``skip``: those shared blocks are neither rewritten nor moved). In push mode the
producer writes every block of the slice, so hit blocks are rewritten with the producer's bytes
for the same tokens.

State groups (Mamba): the decode side must compute the prompt's last token itself from the
state after the others (vLLM recomputes the last prompt token of a fully loaded prompt, which
would advance a finished state twice), so with a state group the prefill side drops the
prompt's last token (``on_new_request``) and the decode side loads the prompt less that token.

Another TP or block size: the loads of attention groups cover the prompt from token 0 (a local
prefix hit is loaded again, with the same bytes; a sliding window: the tokens both windows
hold), as token-mapped reads per producer rank; a state group's block moves as it is.

First contact: the producer's ``kv_transfer_params`` carry its :class:`~.compat.EngineSpec`; a
consumer whose own spec differs plans the load as refused (the worker side then reports every
block as a load error, naming the field, and vLLM's ``kv_load_failure_policy`` applies).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from vllm.v1.request import RequestStatus

from ...errors import LayoutError
from .compat import EngineSpec
from .config import TransferMode, TransferRole, VllmConnectorConfig
from .groups import GroupInfo, GroupKind, transfer_slice
from .metadata import (
    PARAM_ID,
    PARAM_REMOTE_DECODE,
    PARAM_REMOTE_PREFILL,
    PARAM_SPEC,
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
_TRUNCATED = "_kvxfer_truncated"  # kv_transfer_params mark: the prefill side dropped the backoff


class SchedulerSide:
    """The scheduler-process half of :class:`~.connector.KvxferConnector`.

    Args:
        config: the connector settings.
        role: producer, consumer or both.
        groups: the KV-cache groups that transfer (vLLM's ``transfer_groups``).
        spec: this engine's model and layout, sent to consumers and checked against producers.
        block_ids_of: ``block_ids_of(req_id)`` returns the request's current block lists, one
            per KV-cache group (the facade wires it to vLLM's KV cache manager).
    """

    def __init__(self, config: VllmConnectorConfig, role: TransferRole, groups: Sequence[GroupInfo],
                 spec: EngineSpec, block_ids_of: Callable[[str], Sequence[Sequence[int]]]):
        if not groups:
            raise LayoutError("no KV-cache group takes part in transfers")
        self._config = config
        self._role = role
        self._groups = tuple(groups)
        self._spec = spec
        self._block_ids_of = block_ids_of
        self._loads: list[LoadSpec] = []
        self._publishes: list[PublishSpec] = []
        self._loading: set[str] = set()               # consumer: load already planned
        self._local_hit: dict[str, int] = {}          # consumer: prompt tokens found in the local cache
        self._push_wanted: dict[str, tuple[str, Request]] = {}   # producer, push: not yet pushed
        self._pushed: dict[str, str] = {}             # producer, push: req id -> transfer id
        # prompt tokens the decode side computes itself (see the module docstring)
        self._backoff = 1 if any(g.kind is GroupKind.MAMBA for g in self._groups) else 0

    @property
    def groups(self) -> tuple[GroupInfo, ...]:
        return self._groups

    def _handoff_params(self, key: str) -> dict[str, Any]:
        return {PARAM_REMOTE_PREFILL: True, PARAM_REMOTE_DECODE: False, PARAM_ID: key,
                PARAM_SPEC: self._spec.to_params()}

    def _slices(self, num_tokens: int, block_ids: Sequence[Sequence[int]]) -> list[tuple[GroupInfo, int, list[int]]]:
        """Each transfer group's (info, first position, blocks) for a transfer of ``num_tokens``
        prompt tokens; raises LayoutError."""
        return [(g, *transfer_slice(g, num_tokens, block_ids[g.index])) for g in self._groups]

    def _loaded_tokens(self, request: Request) -> int:
        """Consumer: the prompt tokens a producer delivers (all but the backoff)."""
        n = request.num_prompt_tokens
        return n - self._backoff if n > self._backoff else n

    def on_new_request(self, request: Request) -> None:
        """Producer with a state group: drop the prompt's last token, which the decode side
        computes from the state of the others (once per request, also when rescheduled)."""
        params = request.kv_transfer_params
        if (not self._backoff or not self._role.produces or not params or not params.get(PARAM_REMOTE_DECODE)
                or params.get(_TRUNCATED) or request.num_prompt_tokens <= self._backoff
                or request.prompt_token_ids is None):
            return
        del request.prompt_token_ids[-self._backoff:]
        del request._all_token_ids[-self._backoff:]
        request.num_prompt_tokens -= self._backoff
        request.max_tokens = 1
        params[_TRUNCATED] = True

    # -- consumer ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Prompt tokens a producer will deliver beyond the local hit, loaded asynchronously."""
        if not self._role.consumes or request.request_id in self._loading:
            return 0, False
        if not transfer_id_of(request.kv_transfer_params, PARAM_REMOTE_PREFILL):
            return 0, False
        count = self._loaded_tokens(request) - num_computed_tokens
        if count > 0:
            self._local_hit[request.request_id] = num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Consumer: plan the loads into the blocks vLLM just allocated (one per group).
        Producer, push mode: remember the request until the step that completes its prefill."""
        rid = request.request_id
        params = request.kv_transfer_params
        if self._role.produces and self._config.mode is TransferMode.PUSH and rid not in self._pushed:
            key = transfer_id_of(params, PARAM_REMOTE_DECODE)
            if key == "":
                log.warning("request %s asks for a remote decode in push mode without %r; not pushing", rid, PARAM_ID)
            elif key is not None:
                self._push_wanted[rid] = (key, request)
        hit_tokens = self._local_hit.pop(rid, 0)
        if num_external_tokens <= 0 or rid in self._loading:
            return
        key = transfer_id_of(params, PARAM_REMOTE_PREFILL)
        if not key:
            return
        refuse = ""
        theirs = params.get(PARAM_SPEC) if params else None
        if theirs is not None:
            refuse = self._spec.mismatch(theirs)
            if refuse:
                refuse = f"the producer's KV is not compatible: {refuse}"
        ids = blocks.get_block_ids()
        self._loading.add(rid)
        if not refuse and theirs is not None and self._spec.needs_reshard(theirs):
            # another TP or block size: every worker rank plans its own reads of the prompt's
            # tokens from the producer ranks holding its heads (attention groups); a state
            # group's block moves as it is (the compatibility check made TP and pages equal)
            n = self._loaded_tokens(request)
            for g in self._groups:
                if g.kind is GroupKind.MAMBA:
                    try:
                        _, dst_state = transfer_slice(g, n, ids[g.index])
                    except LayoutError as exc:
                        self._loads.append(LoadSpec(rid, key, tuple(b for b in ids[g.index] if b), 0, g.index,
                                                    str(exc)))
                        continue
                    self._loads.append(LoadSpec(rid, key, tuple(dst_state), 0, g.index))
                    continue
                dst = tuple(ids[g.index][: -(-n // g.block_size)])
                self._loads.append(LoadSpec(rid, key, dst, 0, g.index, "", n, dict(theirs["kv"])))
            return
        try:
            slices = self._slices(self._loaded_tokens(request), ids)
        except LayoutError as exc:
            refuse = refuse or str(exc)
            slices = [(g, 0, [b for b in ids[g.index] if b]) for g in self._groups]
        for g, start, dst in slices:
            skip = 0
            if self._config.mode is TransferMode.PULL and g.kind is not GroupKind.MAMBA:
                skip = min(max(0, hit_tokens // g.block_size - start), len(dst))
            self._loads.append(LoadSpec(rid, key, tuple(dst), skip, g.index, refuse))

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
        due: list[PushSpec] = []
        for rid, (key, request) in list(self._push_wanted.items()):
            n = out.num_scheduled_tokens.get(rid)
            if n is None or rid not in before or before[rid] + n < request.num_prompt_tokens:
                continue
            del self._push_wanted[rid]
            try:
                slices = self._slices(request.num_prompt_tokens, self._block_ids_of(rid))
            except LayoutError as exc:
                log.warning("kvxfer: not pushing %s: %s", rid, exc)
                continue
            self._pushed[rid] = key
            due.extend(PushSpec(rid, key, tuple(src), g.index) for g, _, src in slices)
        return tuple(due)

    # -- end of a request --------------------------------------------------------------
    def request_finished(self, request: Request, block_ids: Sequence[Sequence[int]]) -> tuple[bool, dict[str, Any] | None]:
        """Producer: keep the blocks (True) until the worker side reports every consumer done,
        and return the ``kv_transfer_params`` for the decode instance. Consumer: nothing held.

        ``block_ids``: the request's block lists, one per KV-cache group.
        """
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
        if request.status not in _HANDOFF_STATUSES or not any(block_ids):
            return False, None
        try:
            slices = self._slices(request.num_prompt_tokens, block_ids)
        except LayoutError as exc:
            log.warning("kvxfer: not publishing %s: %s", rid, exc)
            return False, None
        key = key or rid
        self._publishes.extend(PublishSpec(rid, key, tuple(src), self._config.ttl_s, g.index) for g, _, src in slices)
        return True, self._handoff_params(key)
