"""KvxferConnector: vLLM's ``KVConnectorBase_V1`` facade over kvxfer.

Layer: engine integration. vLLM builds one instance in the scheduler process (role SCHEDULER)
and one in each worker (role WORKER). This class only forwards: scheduler hooks to
:class:`~.scheduler.SchedulerSide`, worker hooks to :class:`~.worker.WorkerSide`; the step
plan crosses between them as msgpack bytes (:class:`KvxferConnectorMetadata`). It reads vLLM's
``KVCacheConfig`` into kvxfer's terms: one :class:`~.groups.GroupInfo` per KV-cache group that
transfers, and per group the layer views to register (layers that vLLM leaves without a view,
such as Mamba states, get one built from their ``KVCacheTensor`` placement).

It implements ``SupportsHMA``: vLLM keeps its hybrid KV-cache manager on with kvxfer, and hands
every group's block ids to ``request_finished_all_groups``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from ...errors import LayoutError
from .compat import EngineSpec
from .config import TransferMode, TransferRole, VllmConnectorConfig
from .groups import GroupInfo, GroupKind
from .metadata import StepPlan
from .scheduler import SchedulerSide
from .stats import KvxferPromMetrics, KvxferStats
from .transfer_plan import KVGroupSpec as TpGroupSpec
from .transfer_plan import KVSpec, vllm_layout_order
from .worker import WorkerSide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["KvxferConnector", "KvxferConnectorMetadata"]

log = logging.getLogger(__name__)


class KvxferConnectorMetadata(KVConnectorMetadata):
    """One step's plan, scheduler -> workers, as msgpack bytes (never pickled objects)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes):
        self.payload = payload


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, ImportError, AttributeError):  # no parallel state (tests, tools)
        return 0


def group_infos(kv_cache_config: KVCacheConfig) -> tuple[GroupInfo, ...]:
    """kvxfer's view of vLLM's KV-cache groups that take part in transfers.

    Raises:
        LayoutError: a group's spec is of a kind kvxfer cannot move.
    """
    from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec, SlidingWindowSpec, UniformTypeKVCacheSpecs

    out = []
    for gi in kv_cache_config.transfer_group_ids:
        group = kv_cache_config.kv_cache_groups[gi]
        spec = group.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = next(iter(spec.kv_cache_specs.values()))
        if isinstance(spec, SlidingWindowSpec):
            kind, window = GroupKind.SLIDING_WINDOW, int(spec.sliding_window)
        elif isinstance(spec, MambaSpec):
            kind, window = GroupKind.MAMBA, 0
        elif isinstance(spec, AttentionSpec):
            kind, window = GroupKind.FULL, 0
        else:
            raise LayoutError(f"KV-cache group {gi} has a {type(spec).__name__}; kvxfer moves attention "
                              "(full, sliding window, MLA) and Mamba-state groups")
        # the bytes a block holds (a Mamba page may be padded past its state)
        page = int(getattr(spec, "real_page_size_bytes", spec.page_size_bytes))
        out.append(GroupInfo(gi, kind, int(spec.block_size), window, tuple(group.layer_names), page))
    return tuple(out)


def group_views(kv_caches: dict[str, torch.Tensor], kv_cache_config: KVCacheConfig,
                groups: tuple[GroupInfo, ...], layout: str | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Per group, its layers' views with the block index first.

    Attention views (vLLM 0.33's logical ``[blocks, heads, tokens, content]``) are permuted into
    their physical order, as the reshard reads them. A layer that vLLM gave only its raw backing
    buffer (a 1-D int8 tensor: specs without layer views) is viewed as ``[num_blocks,
    page_bytes]`` bytes at its ``KVCacheTensor`` placement (``offset + l * layer_stride + b *
    block_stride``).

    Raises:
        LayoutError: a group's layer has no KV cache, or no placement for a raw buffer.
    """
    order = None
    if layout:
        from vllm.v1.kv_cache_layout import KVCacheLayout

        try:
            order = KVCacheLayout[str(layout).upper()].layer_view_order
        except KeyError:
            order = None
    placement = {}
    for tensor in kv_cache_config.kv_cache_tensors:
        for li, name in enumerate(tensor.layers):
            placement[name] = (tensor, li)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for g in groups:
        views = out[g.index] = {}
        for layer in g.layers:
            t = kv_caches.get(layer)
            if t is None:
                raise LayoutError(f"layer {layer!r} of KV-cache group {g.index} has no KV cache")
            if t.dim() == 1:
                if layer not in placement:
                    raise LayoutError(f"layer {layer!r} has a raw KV buffer and no KVCacheTensor placement")
                tensor, li = placement[layer]
                t = t.as_strided((kv_cache_config.num_blocks_of(tensor), g.page_bytes), (tensor.block_stride, 1),
                                 t.storage_offset() + tensor.offset + li * tensor.layer_stride)
            elif t.dim() == 4 and order is not None:
                t = t.permute(*order)  # [blocks, heads, tokens, content] in physical order
            views[layer] = t
    return out


def _layout_name(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> str:
    layout = (kv_cache_config.kv_cache_layout if kv_cache_config is not None else None)
    return str(layout or vllm_config.cache_config.kv_cache_layout or "auto")


def _tp_size(vllm_config: VllmConfig) -> int:
    return int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1) or 1)


def kv_spec(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, groups: tuple[GroupInfo, ...],
            tp_rank: int) -> KVSpec | None:
    """Rank ``tp_rank``'s :class:`~.transfer_plan.KVSpec` (heads, head size, order, MLA), or None
    where it cannot be described (a layout that puts heads outside a layer's block, a model
    without a config): such an engine moves blocks only between equal TP and block sizes."""
    from vllm.utils.torch_utils import get_dtype_size
    from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

    mc = vllm_config.model_config
    if mc is None:
        return None
    try:
        order = vllm_layout_order(_layout_name(vllm_config, kv_cache_config))
    except LayoutError:
        return None
    specs = [kv_cache_config.kv_cache_groups[g.index].kv_cache_spec for g in groups]
    attn = [s for s in specs if isinstance(s, AttentionSpec)]
    if not attn:
        return None
    first = attn[0]
    mla = isinstance(first, MLAAttentionSpec)
    try:
        return KVSpec(model=str(mc.model), dtype=str(mc.dtype), kv_cache_dtype=str(vllm_config.cache_config.cache_dtype),
                      tp_size=_tp_size(vllm_config), tp_rank=tp_rank, block_size=int(first.block_size),
                      num_kv_heads=1 if mla else int(mc.get_total_num_kv_heads()),
                      # vLLM 0.33's content is K then V (2 * head_size); MLA's is the latent
                      head_dim=int(first.head_size) if mla else 2 * int(first.head_size),
                      order=order, mla=mla, itemsize=int(get_dtype_size(first.dtype)),
                      groups=tuple(TpGroupSpec(g.kind, g.layers, g.block_size, g.window or None)
                                   for g in groups))
    except LayoutError:
        return None


def engine_spec(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None,
                groups: tuple[GroupInfo, ...]) -> EngineSpec:
    """This engine's :class:`~.compat.EngineSpec` (what a peer's must equal, or reshard from)."""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    kv = kv_spec(vllm_config, kv_cache_config, groups, 0) if kv_cache_config is not None else None
    return EngineSpec(model=str(mc.model) if mc is not None else "", dtype=str(mc.dtype) if mc is not None else "",
                      kv_cache_dtype=str(cc.cache_dtype), layout=_layout_name(vllm_config, kv_cache_config),
                      groups=tuple(tuple(g.describe()) for g in groups), tp_size=_tp_size(vllm_config),
                      kv=None if kv is None else kv.to_wire())


class KvxferConnector(KVConnectorBase_V1, SupportsHMA):
    """kvxfer as a vLLM KV connector; configure it with ``kv_connector_extra_config``
    (see :class:`~.config.VllmConnectorConfig`)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = self._kv_transfer_config
        self._config = VllmConnectorConfig.from_extra_config(ktc.kv_connector_extra_config)
        transfer_role = TransferRole.from_kv_role(ktc.kv_role)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if kv_cache_config is None:
            raise ValueError("KvxferConnector needs vLLM's KVCacheConfig")
        self._groups = group_infos(kv_cache_config)
        self._multi_group = len(kv_cache_config.kv_cache_groups) > 1
        if role is KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self._config, transfer_role, self._groups,
                                            engine_spec(vllm_config, kv_cache_config, self._groups),
                                            self._block_ids_of)
        else:
            rank = _tp_rank()
            self._worker = WorkerSide(self._config, transfer_role, f"vllm-{ktc.engine_id}-tp{rank}",
                                      kv_cache_config.num_blocks, rank,
                                      kv_spec(vllm_config, kv_cache_config, self._groups, rank))

    def _block_ids_of(self, req_id: str) -> tuple[list[int], ...]:
        assert self._kv_cache_manager is not None, "vLLM binds the KV cache manager before scheduling"
        return self._kv_cache_manager.get_block_ids(req_id)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # push mode writes from save_kv_layer, which a full CUDA graph replay would skip
        return VllmConnectorConfig.from_extra_config(extra_config).mode is TransferMode.PUSH

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvxferStats:
        return KvxferStats.from_data(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> KvxferPromMetrics:
        return KvxferPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- worker side -------------------------------------------------------------------
    @property
    def worker(self) -> WorkerSide:
        assert self._worker is not None, "a worker-side hook was called on the scheduler-side connector"
        return self._worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._kv_cache_config is not None
        self.worker.register_kv_caches(group_views(kv_caches, self._kv_cache_config, self._groups,
                                                   _layout_name(self._vllm_config, self._kv_cache_config)))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, KvxferConnectorMetadata)
        self.worker.bind(StepPlan.from_bytes(connector_metadata.payload))

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self.worker.clear()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        # loads are asynchronous: vLLM schedules a request only after get_finished reported
        # its load, so a forward never reads a block that is still arriving
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self.worker.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = self.worker.get_finished(finished_req_ids)
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving = self.worker.get_finished(finished_req_ids)
        failed = self.worker.take_failed_loads()
        # vLLM 0.33 maps block-level load errors back to requests only with one KV-cache group
        # (a block id is unique within a group); with several it takes whole failed requests
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed if self._multi_group else set())

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors = self.worker.get_block_ids_with_load_errors()
        return set() if self._multi_group else errors

    def get_kv_connector_stats(self) -> KvxferStats | None:
        if self._worker is None:
            return None
        counters = self._worker.take_counters()
        return None if counters is None else KvxferStats.from_counters(counters)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # -- scheduler side ----------------------------------------------------------------
    @property
    def scheduler(self) -> SchedulerSide:
        assert self._scheduler is not None, "a scheduler-side hook was called on a worker-side connector"
        return self._scheduler

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def on_new_request(self, request: Request) -> None:
        if self._scheduler is not None:
            self._scheduler.on_new_request(request)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return KvxferConnectorMetadata(self.scheduler.build_connector_meta(scheduler_output).to_bytes())

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # vLLM calls this only with one KV-cache group (the hybrid manager off)
        return self.scheduler.request_finished(request, (block_ids,))

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)
