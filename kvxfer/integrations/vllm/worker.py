"""Worker side of the vLLM connector: registers vLLM's KV cache and runs each step's transfers.

Layer: engine integration, over :class:`kvxfer.Connector` and its registry agent. One per vLLM
worker process (one per tensor-parallel rank). Each KV-cache group that transfers gets its own
Connector over that group's layers (a block id indexes one group's layers only, and the groups'
pages may differ: attention blocks, Mamba states); transfer keys carry the group and the rank,
so group *g* of rank *r* of a decode instance meets the same of the prefill instance.
A request's load ends when every group's load has; only the blocks of the groups that failed
(their handles' ``failed_blocks``) are reported as load errors.

Different TP or block sizes (pull mode, full-attention, MLA and sliding-window groups): a load
that carries the producer's ``KVSpec`` is planned on this rank by
:func:`~.transfer_plan.plan_group_reads` (a sliding window: of the tokens both windows hold,
the producer's held positions derived from its spec by ``_published_positions``)
(first contact: ``check_compatible`` names a mismatching field, and the load fails with it):
one pull per producer rank holding some of this rank's heads, each with its token-mapped
reshard, under that rank's key. A producer rank publishes for as many consumer ranks as read
from it (``consumer_tp_size``), and the registry reports it consumed once all have confirmed;
a rank nobody reads from (replicated heads, MLA) publishes nothing.

* Consumer: ``start_load_kv`` pulls (or, push mode, expects) each planned request into its
  blocks; loads are asynchronous (vLLM keeps the request in WAITING_FOR_REMOTE_KVS), so no
  forward pass ever reads a block being loaded and ``wait_for_layer_load`` has nothing to wait
  for. ``get_finished`` reports each load once its handle ends, successful or not; a failed
  load's destination blocks go to ``get_block_ids_with_load_errors`` in the same step.
* Producer, pull mode: ``wait_for_save`` publishes requests that finished their prefill; the
  registry tells this side when the consumer has read them (or failed, or expired), and only
  once every group's publication has ended does ``get_finished`` report the request, so that
  vLLM frees its blocks.
* Producer, push mode: ``save_kv_layer`` writes each layer of the requests whose prefill
  completes this step as soon as vLLM has computed it; ``wait_for_save`` sends the layers that
  never passed through ``save_kv_layer`` with the final write.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..._tensors import MemoryKind
from ...connector import Connector
from ...errors import KvxferError, LayoutError
from ...handle import TransferHandle
from ...registry.messages import EventKind
from .config import TransferMode, TransferRole, VllmConnectorConfig
from .counters import TransferCounters
from .metadata import LoadSpec, StepPlan
from .transfer_plan import GroupKind, KVSpec, consumer_ranks, plan_group_reads

__all__ = ["WorkerSide"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Load:
    key: str
    group: int
    handle: TransferHandle | None          # None: refused before any transfer
    blocks: tuple[int, ...]                # the blocks this load writes (after ``skip``)
    refuse: str = ""


@dataclass(slots=True)
class _Push:
    key: str
    group: int
    src_blocks: tuple[int, ...]
    sent: set[int] = field(default_factory=set)     # tensor indices written so far
    handles: list[TransferHandle] = field(default_factory=list)
    last_sent: bool = False


class _GpuOrderedPusher:
    """Submits layer writes once vLLM's compute stream has produced the layer.

    ``save_kv_layer`` runs while the layer's kernels may still be queued on vLLM's stream; an
    event recorded there is waited for on this thread (never on the forward's thread) before
    the write is submitted, so the forward keeps going and the bytes sent are final.
    """

    def __init__(self, name: str):
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"kvxfer-vllm-push-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Any) -> None:
        import torch

        event = torch.cuda.Event()
        event.record()
        self._q.put((event, fn))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            event, fn = item
            event.synchronize()
            fn()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)


def _published_positions(remote: KVSpec, group: int, num_tokens: int) -> tuple[list[int], int]:
    """The producer's block list of ``group`` for ``num_tokens`` prompt tokens as the consumer
    plans from it, and the position of its first published block: a published block stands as
    its 1-based place in the publication, a position the producer does not hold (it left a
    sliding window) as the null block 0.

    The producer publishes the blocks :func:`~.groups.transfer_slice` names, worked out here
    from its spec: every block of the tokens for full attention; for a sliding window of ``w``
    tokens, positions ``(num_tokens - w + 1) // block_size`` on (the blocks holding a token the
    window still sees; vLLM has nulled the earlier ones)."""
    bs = remote.group_block_size(group)
    n = -(-num_tokens // bs)
    g = remote.groups[group]
    first = 0
    if g.kind is GroupKind.SLIDING_WINDOW and g.sliding_window:
        first = min(n, max(0, num_tokens - g.sliding_window + 1) // bs)
    return [0] * first + list(range(1, n - first + 1)), first


class WorkerSide:
    """The worker-process half of :class:`~.connector.KvxferConnector`.

    Args:
        config: the connector settings.
        role: producer, consumer or both.
        name: this worker's connector name in the registry (unique per engine and rank); each
            group's connector is named ``{name}-g{group}``.
        num_blocks: vLLM's number of KV blocks (manager blocks).
        rank: tensor-parallel rank, appended to every transfer key.
        kv_spec: this rank's KV description (heads, block size, order), needed to reshard
            between different TP or block sizes; None: equal sides only.
    """

    #: failure messages kept for :attr:`recent_failures`
    MAX_FAILURES_KEPT = 64

    def __init__(self, config: VllmConnectorConfig, role: TransferRole, name: str, num_blocks: int, rank: int = 0,
                 kv_spec: KVSpec | None = None):
        self._config = config
        self._kv_spec = kv_spec
        self._role = role
        self._name = name
        self._num_blocks = num_blocks
        self._rank = rank
        self._conns: dict[int, Connector] = {}
        self._agents: dict[int, Any] = {}
        self._layer_index: dict[str, tuple[int, int]] = {}   # layer -> (group, tensor index)
        self._pusher: _GpuOrderedPusher | None = None
        self._lock = threading.Lock()
        self._plan = StepPlan()
        self._loads: dict[str, list[_Load]] = {}
        self._pushes: dict[tuple[str, int], _Push] = {}
        self._sends: dict[tuple[int, str], str] = {}      # (group, transfer key) -> req id, waiting for the registry
        self._send_parts: dict[str, int] = {}            # req id -> group transfers not yet ended
        self._sends_done: set[str] = set()               # req ids whose transfers all ended, not yet reported
        self._engine_finished: set[str] = set()          # req ids vLLM has finished (may be reported)
        self._load_errors: set[int] = set()
        self._counters = TransferCounters()
        self._failed_loads: set[str] = set()             # req ids whose load failed in part or whole
        self._expired: set[str] = set()                  # producer: req ids counted as expired
        self._failures: list[tuple[str, int, tuple[int, ...], str]] = []

    # -- setup -------------------------------------------------------------------------
    def register_kv_caches(self, group_views: Mapping[int, Mapping[str, Any]]) -> None:
        """Describe each KV-cache group's per-layer views as one KVLayout and join the registry.

        ``group_views[g]`` maps group *g*'s layer names to views whose first dimension indexes
        vLLM's blocks. The views may alias one allocation (vLLM 0.33 carves every layer out of
        one int8 buffer, and the groups overlay each other). A view whose first dimension holds
        kernel blocks (a manager block split in ``r`` pieces) is seen as ``[num_blocks, r, ...]``
        so that block ids stay vLLM's manager block ids.

        Raises:
            LayoutError: the views do not describe ``num_blocks`` blocks, or are registered twice.
            RegistryError: the registry cannot be reached or refuses this worker.
        """
        if self._conns:
            raise LayoutError("KV caches are already registered on this worker")
        if not group_views:
            raise LayoutError("no KV-cache group to register")
        try:
            for g, layers in sorted(group_views.items()):
                views: dict[str, Any] = {}
                for layer, t in layers.items():
                    nb = int(t.shape[0])
                    if nb != self._num_blocks:
                        if nb % self._num_blocks:
                            raise LayoutError(f"layer {layer!r} has {nb} blocks in dim 0; vLLM allocated {self._num_blocks}")
                        t = t.unflatten(0, (self._num_blocks, nb // self._num_blocks))
                    views[layer] = t
                conn = Connector(f"{self._name}-g{g}", backend=self._config.backend, listen=self._config.listen,
                                 registry=self._config.registry, registry_token=self._config.registry_token)
                self._conns[g] = conn
                layout = conn.register(views, block_dim=0)
                self._agents[g] = conn.requests  # joins the registry now: a bad URL or token fails at startup
                for layer in views:
                    self._layer_index[layer] = (g, int(layout.resolve_layers([layer])[0]))
                if layout.memory is MemoryKind.CUDA and self._pusher is None:
                    self._pusher = _GpuOrderedPusher(self._name)
                log.info("kvxfer worker %s group %d registered %r", self._name, g, layout)
        except BaseException:
            self.shutdown()
            self._conns.clear()
            self._agents.clear()
            raise

    def connector(self, group: int = 0) -> Connector:
        """Group ``group``'s Connector. Raises LayoutError before ``register_kv_caches``."""
        conn = self._conns.get(group)
        if conn is None:
            raise LayoutError(f"no KV cache of group {group} is registered on this worker")
        return conn

    def _agent(self, group: int) -> Any:
        self.connector(group)
        return self._agents[group]

    def _key(self, key: str, group: int, rank: int | None = None) -> str:
        return f"{key}#g{group}#tp{self._rank if rank is None else rank}"

    def _readers(self, group: int) -> int:
        """How many consumer ranks read this rank's blocks of ``group`` (``consumer_tp_size``)."""
        ctp = self._config.consumer_tp_size
        spec = self._kv_spec
        if not ctp or spec is None or ctp == spec.tp_size:
            return 1
        from dataclasses import replace

        return len(consumer_ranks(spec, replace(spec, tp_size=ctp, tp_rank=0)))

    @property
    def recent_failures(self) -> list[tuple[str, int, tuple[int, ...], str]]:
        """(request id, KV-cache group, blocks not loaded, why) of the latest failed loads and
        sends (a send names no blocks), oldest first."""
        return list(self._failures)

    def _failed(self, rid: str, why: str, group: int = -1, blocks: tuple[int, ...] = ()) -> None:
        self._failures.append((rid, group, blocks, why))
        del self._failures[:-self.MAX_FAILURES_KEPT]

    # -- per step ----------------------------------------------------------------------
    def bind(self, plan: StepPlan) -> None:
        self._plan = plan

    def clear(self) -> None:
        self._plan = StepPlan()

    def start_load_kv(self) -> None:
        """Start this step's loads (consumer), one per request, group and producer rank read;
        returns at once."""
        for spec in self._plan.loads:
            self._loads.setdefault(spec.req_id, []).extend(self._start_load(spec))

    def _start_load(self, spec: LoadSpec) -> list[_Load]:
        key = self._key(spec.key, spec.group)
        written = spec.dst_blocks[spec.skip:] if self._config.mode is TransferMode.PULL else spec.dst_blocks
        if spec.refuse:
            return [_Load(key, spec.group, None, written, spec.refuse)]
        try:
            agent = self._agent(spec.group)
            if spec.remote is not None:
                return self._start_resharded(agent, spec)
            if self._config.mode is TransferMode.PUSH:
                h = agent.expect(key, spec.dst_blocks, timeout=self._config.load_timeout_s)
            else:
                h = agent.pull(key, spec.dst_blocks, timeout=self._config.load_timeout_s, skip=spec.skip)
        except KvxferError as exc:
            return [_Load(key, spec.group, None, written, f"{type(exc).__name__}: {exc}")]
        return [_Load(key, spec.group, h, written)]

    def _start_resharded(self, agent: Any, spec: LoadSpec) -> list[_Load]:
        """Pull mode across TP or block sizes: one read per producer rank holding our heads,
        each with its reshard (heads and token ranges), each its own load part."""
        if self._config.mode is not TransferMode.PULL:
            raise LayoutError("different TP or block sizes need mode=pull (push writes equal blocks only)")
        if self._kv_spec is None:
            raise LayoutError("this worker cannot describe its KV heads (layout), so it cannot reshard")
        remote = KVSpec.from_wire(spec.remote)  # first contact: check_compatible names the field
        src_positions, first = _published_positions(remote, spec.group, spec.num_tokens)
        reads = plan_group_reads(remote, self._kv_spec, spec.group, src_positions, spec.dst_blocks, spec.num_tokens)
        whole = tuple(range(1, len(src_positions) - first + 1))
        for r in reads:
            # a pull reads the whole publication: the read must start at its first block and end at its last
            if r.src_blocks != whole:
                raise LayoutError(f"group {spec.group}: the tokens both sides hold start in published block "
                                  f"{r.src_blocks[0] - 1 if r.src_blocks else '-'} of "
                                  f"{len(src_positions) - first}; a read of part of a publication is not "
                                  "possible (this side's window holds fewer tokens than the producer's)")
        out = []
        for r in reads:
            key = self._key(spec.key, spec.group, r.src_rank)
            h = agent.pull(key, r.dst_blocks, timeout=self._config.load_timeout_s, reshard=r.reshard)
            out.append(_Load(key, spec.group, h, r.dst_blocks))
        return out

    def save_kv_layer(self, layer_name: str) -> None:
        """Push mode: write ``layer_name`` of every request whose prefill completes this step."""
        where = self._layer_index.get(layer_name)
        if where is None:
            return
        group, idx = where
        for spec in self._plan.pushes:
            if spec.group != group:
                continue
            st = self._push_state(spec.req_id, spec.key, group, spec.src_blocks)
            if idx in st.sent or st.last_sent:
                continue
            st.sent.add(idx)
            last = len(st.sent) == self.connector(group).layout.num_tensors
            st.last_sent = last
            self._submit_push(st, [layer_name], last)

    def _push_state(self, rid: str, key: str, group: int, src: tuple[int, ...]) -> _Push:
        st = self._pushes.get((rid, group))
        if st is None:
            st = self._pushes[(rid, group)] = _Push(self._key(key, group), group, src)
            self._sends[(group, st.key)] = rid
            self._send_parts[rid] = self._send_parts.get(rid, 0) + 1
        return st

    def _submit_push(self, st: _Push, layers: list[str], last: bool) -> None:
        agent = self._agent(st.group)

        def go() -> None:
            h = agent.push(st.key, st.src_blocks, layers=layers, last=last, timeout=self._config.ttl_s)
            with self._lock:
                st.handles.append(h)
        if self._pusher is not None:
            self._pusher.submit(go)
        else:
            go()

    def wait_for_save(self) -> None:
        """Finish this step's saves: the rest of each push, then pull-mode publications."""
        for spec in self._plan.pushes:
            st = self._push_state(spec.req_id, spec.key, spec.group, spec.src_blocks)
            if st.last_sent:
                continue
            layout = self.connector(spec.group).layout
            rest = [layout.names[i] for i in range(layout.num_tensors) if i not in st.sent]
            st.sent.update(range(layout.num_tensors))
            st.last_sent = True
            self._submit_push(st, rest, True)
        for pub in self._plan.publishes:
            key = self._key(pub.key, pub.group)
            self._send_parts[pub.req_id] = self._send_parts.get(pub.req_id, 0) + 1
            try:
                readers = self._readers(pub.group)
                if readers == 0:  # no consumer rank reads this rank (replicated heads, MLA)
                    self._send_ended(pub.req_id)
                    continue
                self._agent(pub.group).publish(key, pub.src_blocks, ttl=pub.ttl_s, consumers=readers)
            except KvxferError as exc:
                # nobody can read them: this group's part is over at once
                log.warning("kvxfer: could not publish %s group %d (%s)", pub.req_id, pub.group, exc)
                self._failed(pub.req_id, f"publish: {type(exc).__name__}: {exc}", pub.group)
                self._counters.add("registry", sends=1, send_failures=1)
                self._send_ended(pub.req_id)
                continue
            self._sends[(pub.group, key)] = pub.req_id

    def _send_backend(self, group: int) -> str:
        # a producer in pull mode does not see which data path the consumer's read took:
        # its sends count under the configured choice (``auto`` included)
        return self._config.backend

    def _send_ended(self, rid: str) -> None:
        left = self._send_parts.get(rid, 1) - 1
        if left > 0:
            self._send_parts[rid] = left
        else:
            self._send_parts.pop(rid, None)
            self._expired.discard(rid)
            self._sends_done.add(rid)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(sends that ended, loads that ended) since the last call; see the module docstring."""
        # -- producer: the registry says the consumer is done with a request's group (or it ended)
        for g, agent in self._agents.items():
            for fin in agent.finished():
                rid = self._sends.pop((g, fin.request_id), None)
                if rid is None:
                    continue
                self._pushes.pop((rid, g), None)
                backend = self._send_backend(g)
                if fin.kind is EventKind.CONSUMED:
                    self._counters.add(backend, sends=1)
                else:
                    # expired counts requests (once, whichever of its groups expired first)
                    expired = int(fin.kind is EventKind.EXPIRED and rid not in self._expired)
                    if expired:
                        self._expired.add(rid)
                    self._counters.add(backend, sends=1, send_failures=1, expired=expired)
                    self._failed(rid, f"{fin.kind.value}: {fin.reason}", g)
                    log.warning("kvxfer: transfer of %s ended %s: %s", fin.request_id, fin.kind.value, fin.reason)
                self._send_ended(rid)
        for (rid, g), st in list(self._pushes.items()):
            with self._lock:
                handles = list(st.handles)
            failed = [h for h in handles if h.done() and h.exception() is not None]
            if failed:
                # a push the registry never matched (no consumer in time) ends without an event
                del self._pushes[(rid, g)]
                if self._sends.pop((g, st.key), None) is not None:
                    self._send_ended(rid)
                self._counters.add(failed[0].backend or "registry", sends=1, send_failures=1)
                self._failed(rid, f"push: {failed[0].exception()}", g)
                log.warning("kvxfer: push of %s failed: %s", rid, failed[0].exception())
            elif st.last_sent and handles and all(h.done() for h in handles):
                for h in handles:  # counted once: the list is emptied under the lock
                    self._counters.add(h.backend, push_bytes=h.stats.nbytes)
                    self._counters.time(h.backend, h.stats.seconds)
                with self._lock:
                    st.handles.clear()
        tracked = self._sends_done | set(self._sends.values())
        self._engine_finished |= finished_req_ids & tracked
        sending = self._sends_done & self._engine_finished
        self._sends_done -= sending
        self._engine_finished -= sending
        # -- consumer: loads whose groups all ended, and loads of requests vLLM aborted meanwhile
        recving: set[str] = set()
        for rid, parts in list(self._loads.items()):
            if not all(p.handle is None or p.handle.done() for p in parts):
                if rid in finished_req_ids:
                    for p in parts:
                        if p.handle is not None and not p.handle.done():
                            self._cancel(p.group, p.key)
                continue
            del self._loads[rid]
            recving.add(rid)
            for p in parts:
                self._load_ended(rid, p)
        return sending, recving

    def _load_ended(self, rid: str, p: _Load) -> None:
        h = p.handle
        exc = None if h is None else h.exception()
        if h is not None and exc is None:
            st = h.stats
            self._counters.add(h.backend, loads=1, load_bytes=st.nbytes)
            self._counters.time(h.backend, st.seconds)
            return
        if h is None:
            why, bad = p.refuse, set(p.blocks)
            backend = "registry"
        else:
            why, bad = f"{type(exc).__name__}: {exc}", {int(b) for b in h.failed_blocks}
            backend = h.backend or "registry"
        self._counters.add(backend, load_failures=1)
        self._load_errors |= bad
        self._failed_loads.add(rid)
        self._failed(rid, why, p.group, tuple(sorted(bad)))
        log.warning("kvxfer: load of %s group %d failed (%d blocks not loaded): %s", rid, p.group, len(bad), why)

    def _cancel(self, group: int, key: str) -> None:
        try:
            self._agents[group].cancel(key, "the consumer request was aborted")
        except KvxferError as exc:
            log.debug("kvxfer: cancel of %s: %s", key, exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks that loads which failed since the last call did not bring (the failed
        groups' blocks only; a group that arrived is not reported)."""
        out, self._load_errors = self._load_errors, set()
        return out

    def take_failed_loads(self) -> set[str]:
        """Requests whose load failed (in any group) since the last call; each is also in
        the ``recving`` set of :meth:`get_finished` of the same or an earlier call."""
        out, self._failed_loads = self._failed_loads, set()
        return out

    def take_counters(self) -> TransferCounters | None:
        """Counters since the last call, or None when nothing happened."""
        if not self._counters:
            return None
        out, self._counters = self._counters, TransferCounters()
        return out

    def shutdown(self) -> None:
        """Stop the pusher, fail pending transfers, leave the registry. Idempotent."""
        if self._pusher is not None:
            self._pusher.close()
            self._pusher = None
        for conn in self._conns.values():
            conn.close()
