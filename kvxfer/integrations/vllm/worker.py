"""Worker side of the vLLM connector: registers vLLM's KV cache and runs each step's transfers.

Layer: engine integration, over :class:`kvxfer.Connector` and its registry agent. One per vLLM
worker process (one per tensor-parallel rank); transfer keys carry the rank, so rank *r* of a
decode instance meets rank *r* of the prefill instance in the registry.

* Consumer: ``start_load_kv`` pulls (or, push mode, expects) each planned request into its
  blocks; loads are asynchronous (vLLM keeps the request in WAITING_FOR_REMOTE_KVS), so no
  forward pass ever reads a block being loaded and ``wait_for_layer_load`` has nothing to wait
  for. ``get_finished`` reports each load once its handle ends, successful or not; a failed
  load's destination blocks go to ``get_block_ids_with_load_errors`` in the same step.
* Producer, pull mode: ``wait_for_save`` publishes requests that finished their prefill; the
  registry tells this side when the consumer has read them (or failed, or expired), and only
  then ``get_finished`` reports the request so that vLLM frees its blocks.
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
from .metadata import StepPlan

__all__ = ["TransferCounters", "WorkerSide"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TransferCounters:
    """What this worker moved since the last stats report."""

    loads: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    load_failures: int = 0
    sends: int = 0
    send_failures: int = 0
    push_bytes: int = 0
    push_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in self.__slots__)


@dataclass(slots=True)
class _Load:
    key: str
    handle: TransferHandle
    dst_blocks: tuple[int, ...]


@dataclass(slots=True)
class _Push:
    key: str
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


class WorkerSide:
    """The worker-process half of :class:`~.connector.KvxferConnector`.

    Args:
        config: the connector settings.
        role: producer, consumer or both.
        name: this worker's connector name in the registry (unique per engine and rank).
        num_blocks: vLLM's number of KV blocks (manager blocks).
        rank: tensor-parallel rank, appended to every transfer key.
    """

    def __init__(self, config: VllmConnectorConfig, role: TransferRole, name: str, num_blocks: int, rank: int = 0):
        self._config = config
        self._role = role
        self._name = name
        self._num_blocks = num_blocks
        self._rank = rank
        self._conn: Connector | None = None
        self._agent: Any = None
        self._layer_index: dict[str, int] = {}
        self._pusher: _GpuOrderedPusher | None = None
        self._lock = threading.Lock()
        self._plan = StepPlan()
        self._loads: dict[str, _Load] = {}
        self._pushes: dict[str, _Push] = {}
        self._sends: dict[str, str] = {}           # transfer key -> req id, producer waits for the registry
        self._sends_done: set[str] = set()         # req ids whose transfer ended, not yet reported
        self._engine_finished: set[str] = set()    # req ids vLLM has finished (may be reported)
        self._load_errors: set[int] = set()
        self._counters = TransferCounters()

    # -- setup -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: Mapping[str, Any]) -> None:
        """Describe vLLM's per-layer views as one KVLayout and join the registry.

        The views may alias one allocation (vLLM 0.33 carves every layer out of one int8
        buffer); identical views (layers sharing a cache) are registered once. A view whose
        first dimension holds kernel blocks (a manager block split in ``r`` pieces) is seen
        as ``[num_blocks, r, ...]`` so that block ids stay vLLM's manager block ids.

        Raises:
            LayoutError: the views do not describe ``num_blocks`` blocks.
            RegistryError: the registry cannot be reached or refuses this worker.
        """
        if self._conn is not None:
            raise LayoutError("KV caches are already registered on this worker")
        views: dict[str, Any] = {}
        for layer, t in kv_caches.items():
            nb = int(t.shape[0])
            if nb != self._num_blocks:
                if nb % self._num_blocks:
                    raise LayoutError(f"layer {layer!r} has {nb} blocks in dim 0; vLLM allocated {self._num_blocks}")
                t = t.unflatten(0, (self._num_blocks, nb // self._num_blocks))
            views[layer] = t
        conn = Connector(self._name, backend=self._config.backend, listen=self._config.listen,
                         registry=self._config.registry, registry_token=self._config.registry_token)
        try:
            layout = conn.register(views, block_dim=0)
            self._agent = conn.requests  # joins the registry now: a bad URL or token fails at startup
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._layer_index = {layer: int(layout.resolve_layers([layer])[0]) for layer in views}
        if layout.memory is MemoryKind.CUDA:
            self._pusher = _GpuOrderedPusher(self._name)
        log.info("kvxfer worker %s registered %r", self._name, layout)

    @property
    def connector(self) -> Connector:
        if self._conn is None:
            raise LayoutError("register_kv_caches has not run on this worker")
        return self._conn

    def _key(self, key: str) -> str:
        return f"{key}#tp{self._rank}"

    # -- per step ----------------------------------------------------------------------
    def bind(self, plan: StepPlan) -> None:
        self._plan = plan

    def clear(self) -> None:
        self._plan = StepPlan()

    def start_load_kv(self) -> None:
        """Start this step's loads (consumer); returns at once."""
        agent = self._agent
        for spec in self._plan.loads:
            key = self._key(spec.key)
            if self._config.mode is TransferMode.PUSH:
                h = agent.expect(key, spec.dst_blocks, timeout=self._config.load_timeout_s)
            else:
                h = agent.pull(key, spec.dst_blocks, timeout=self._config.load_timeout_s, skip=spec.skip)
            self._loads[spec.req_id] = _Load(key, h, spec.dst_blocks)

    def save_kv_layer(self, layer_name: str) -> None:
        """Push mode: write ``layer_name`` of every request whose prefill completes this step."""
        idx = self._layer_index.get(layer_name)
        if idx is None:
            return
        for spec in self._plan.pushes:
            st = self._pushes.get(spec.req_id)
            if st is None:
                st = self._pushes[spec.req_id] = _Push(self._key(spec.key), spec.src_blocks)
                self._sends[st.key] = spec.req_id
            if idx in st.sent or st.last_sent:
                continue
            st.sent.add(idx)
            last = len(st.sent) == self.connector.layout.num_tensors
            st.last_sent = last
            self._submit_push(st, [layer_name], last)

    def _submit_push(self, st: _Push, layers: list[str], last: bool) -> None:
        def go() -> None:
            h = self._agent.push(st.key, st.src_blocks, layers=layers, last=last, timeout=self._config.ttl_s)
            with self._lock:
                st.handles.append(h)
        if self._pusher is not None:
            self._pusher.submit(go)
        else:
            go()

    def wait_for_save(self) -> None:
        """Finish this step's saves: the rest of each push, then pull-mode publications."""
        layout = self.connector.layout
        for spec in self._plan.pushes:
            st = self._pushes.get(spec.req_id)
            if st is None:
                st = self._pushes[spec.req_id] = _Push(self._key(spec.key), spec.src_blocks)
                self._sends[st.key] = spec.req_id
            if st.last_sent:
                continue
            rest = [layout.names[i] for i in range(layout.num_tensors) if i not in st.sent]
            st.sent.update(range(layout.num_tensors))
            st.last_sent = True
            self._submit_push(st, rest, True)
        for pub in self._plan.publishes:
            key = self._key(pub.key)
            try:
                self._agent.publish(key, pub.src_blocks, ttl=pub.ttl_s)
            except KvxferError as exc:
                # nobody can read them: give the blocks back to vLLM at once
                log.warning("kvxfer: could not publish %s (%s); its blocks are freed", pub.req_id, exc)
                self._counters.send_failures += 1
                self._sends_done.add(pub.req_id)
                continue
            self._sends[key] = pub.req_id

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(sends that ended, loads that ended) since the last call; see the module docstring."""
        # -- producer: the registry says the consumer is done with a request (or it ended)
        if self._agent is not None:
            for fin in self._agent.finished():
                rid = self._sends.pop(fin.request_id, None)
                if rid is None:
                    continue
                self._pushes.pop(rid, None)
                self._sends_done.add(rid)
                self._counters.sends += 1
                if fin.kind is not EventKind.CONSUMED:
                    self._counters.send_failures += 1
                    log.warning("kvxfer: transfer of %s ended %s: %s", rid, fin.kind.value, fin.reason)
        for rid, st in list(self._pushes.items()):
            with self._lock:
                handles = list(st.handles)
            failed = [h for h in handles if h.done() and h.exception() is not None]
            if failed:
                # a push the registry never matched (no consumer in time) ends without an event
                del self._pushes[rid]
                self._sends.pop(st.key, None)
                self._sends_done.add(rid)
                self._counters.sends += 1
                self._counters.send_failures += 1
                log.warning("kvxfer: push of %s failed: %s", rid, failed[0].exception())
            elif st.last_sent and handles and all(h.done() for h in handles):
                for h in handles:  # counted once: the list is emptied under the lock
                    self._counters.push_bytes += h.stats.nbytes
                    self._counters.push_seconds += h.stats.seconds
                with self._lock:
                    st.handles.clear()
        tracked = self._sends_done | set(self._sends.values())
        self._engine_finished |= finished_req_ids & tracked
        sending = self._sends_done & self._engine_finished
        self._sends_done -= sending
        self._engine_finished -= sending
        # -- consumer: loads that ended, and loads of requests vLLM aborted meanwhile
        recving: set[str] = set()
        for rid, ld in list(self._loads.items()):
            if not ld.handle.done():
                if rid in finished_req_ids:
                    self._cancel(ld.key)
                continue
            del self._loads[rid]
            recving.add(rid)
            exc = ld.handle.exception()
            if exc is None:
                st = ld.handle.stats
                self._counters.loads += 1
                self._counters.load_bytes += st.nbytes
                self._counters.load_seconds += st.seconds
            else:
                self._counters.load_failures += 1
                self._load_errors.update(ld.dst_blocks)
                log.warning("kvxfer: load of %s failed (%d blocks to recompute): %s", rid, len(ld.dst_blocks), exc)
        return sending, recving

    def _cancel(self, key: str) -> None:
        try:
            self._agent.cancel(key, "the consumer request was aborted")
        except KvxferError as exc:
            log.debug("kvxfer: cancel of %s: %s", key, exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks of loads that failed since the last call."""
        out, self._load_errors = self._load_errors, set()
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
        if self._conn is not None:
            self._conn.close()
