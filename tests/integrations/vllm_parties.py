"""A vLLM 0.33 prefill (producer) and decode (consumer) engine, minus the model: spawn targets.

Each process runs vLLM's own Scheduler (which builds the scheduler-side connector through
KVConnectorFactory from ``kv_connector_module_path``), a worker-side connector from the same
factory, and a KV cache allocated by vLLM's own ``allocate_kv_cache`` on the CPU (one int8
buffer, per-layer strided views). One "engine step" does what vLLM's model runner does around a
forward pass; the forward itself is replaced by writing random bytes into the blocks of the
tokens it would compute (producer) or by nothing (consumer).

``setup`` picks the model's KV-cache groups (``kind``: ``dense`` one full-attention group,
``swa`` full attention + sliding window, ``mamba`` full attention + a Mamba-state group), the
model ``dtype``, vLLM's ``kv_load_failure_policy`` and the ``block_size`` (16 unless given). A hybrid setup lets vLLM keep its hybrid
KV-cache manager on: the CPU platform reports it unsupported, so the parties say the platform
supports it (as a GPU platform does) and vLLM then asks the connector (``SupportsHMA``).
"""

from __future__ import annotations

import os
import queue
import time
from typing import Any

BLOCK_SIZE = 16
NUM_BLOCKS = 48
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
HYBRID_LAYERS = [f"model.layers.{i}.mixer" for i in range(4)]   # even: full attention, odd: the other group
SLIDING_WINDOW = 24
DENSE = {"kind": "dense", "dtype": "float16", "policy": "recompute"}
EOS = 2
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": len(LAYERS), "vocab_size": 512,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float16", "bos_token_id": 1,
    "eos_token_id": EOS,
}


def write_model_dir(path: str) -> str:
    """A config-only Hugging Face model directory (vLLM's ModelConfig reads it; no weights needed)."""
    import json

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(MODEL_CONFIG, f)
    return path


class Engine:
    """vLLM's scheduler plus a worker-side connector over CPU KV views, stepped by hand."""

    def __init__(self, model_dir: str, kv_role: str, extra: dict[str, Any], setup: dict[str, Any] | None = None):
        import torch
        from vllm.config import (
            CacheConfig,
            DeviceConfig,
            KVTransferConfig,
            ModelConfig,
            SchedulerConfig,
            VllmConfig,
        )
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.platforms import current_platform
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            KVCacheConfig,
            KVCacheGroupSpec,
            KVCacheTensor,
            MambaSpec,
            SlidingWindowSpec,
        )
        from vllm.v1.structured_output import StructuredOutputManager
        from vllm.v1.worker.utils import allocate_kv_cache

        setup = {**DENSE, **(setup or {})}
        self.kind = setup["kind"]
        self.block_size = bs = setup.get("block_size", BLOCK_SIZE)
        hybrid = self.kind != "dense"
        if hybrid:  # a GPU platform supports the hybrid manager; the CPU one says it does not
            type(current_platform).support_hybrid_kv_cache = classmethod(lambda cls: True)
        dtype = getattr(torch, setup["dtype"])
        # built the way vLLM's own connector unit tests build theirs (tests/v1/kv_connector/unit/utils.py)
        model_config = ModelConfig(model=model_dir, dtype=setup["dtype"], seed=0, skip_tokenizer_init=True)
        scheduler_config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024,
                                           enable_chunked_prefill=True, is_encoder_decoder=False,
                                           async_scheduling=False)
        cache_config = CacheConfig(block_size=bs, gpu_memory_utilization=0.9, cache_dtype="auto",
                                   enable_prefix_caching=self.kind != "mamba")
        cache_config.kv_cache_layout = "LBNHC"
        kv_transfer_config = KVTransferConfig(kv_connector="KvxferConnector",
                                              kv_connector_module_path="kvxfer.integrations.vllm",
                                              kv_role=kv_role, kv_connector_extra_config=extra,
                                              kv_load_failure_policy=setup["policy"])
        self.vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config,
                                      cache_config=cache_config, kv_transfer_config=kv_transfer_config,
                                      device_config=DeviceConfig("cpu"))
        self.hma_enabled = self.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is False
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=2, head_size=16, dtype=dtype)
        page = spec.page_size_bytes
        if not hybrid:
            self.layers = list(LAYERS)
            groups = [KVCacheGroupSpec(list(LAYERS), spec)]
            tensors = [KVCacheTensor(size=page * NUM_BLOCKS * len(LAYERS), layers=list(LAYERS),
                                     layer_stride=page * NUM_BLOCKS, block_stride=page)]
        else:
            self.layers = list(HYBRID_LAYERS)
            full, other = HYBRID_LAYERS[0::2], HYBRID_LAYERS[1::2]
            if self.kind == "swa":
                other_spec = SlidingWindowSpec(block_size=bs, num_kv_heads=2, head_size=16, dtype=dtype,
                                               sliding_window=SLIDING_WINDOW)
            else:  # a Mamba state of 1 KiB padded to the attention page, as vLLM pads hybrid pages
                other_spec = MambaSpec(block_size=bs, shapes=((8, 32),), dtypes=(dtype,),
                                       page_size_padded=page)
            groups = [KVCacheGroupSpec(list(full), spec), KVCacheGroupSpec(list(other), other_spec)]
            # the groups overlay one allocation (a block id belongs to one group at a time)
            size = page * NUM_BLOCKS * 2
            tensors = [KVCacheTensor(size=size, layers=list(full), layer_stride=page * NUM_BLOCKS, block_stride=page),
                       KVCacheTensor(size=size, layers=list(other), layer_stride=page * NUM_BLOCKS, block_stride=page)]
        self.kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=tensors, kv_cache_groups=groups)
        self.page_bytes = page
        # bytes of a block that hold data (a Mamba page is padded; vLLM's views cover the state only)
        self.content = [getattr(g.kv_cache_spec, "real_page_size_bytes", page) for g in groups]
        # layer -> (group, byte offset of block 0, bytes between blocks), from the placement alone
        self.placement = {name: (gi, t.offset + li * t.layer_stride, t.block_stride)
                          for t in tensors for li, name in enumerate(t.layers)
                          for gi, g in enumerate(groups) if name in g.layer_names}
        self.vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS
        init_none_hash(sha256)
        self.hash_fn = sha256
        self.scheduler = Scheduler(vllm_config=self.vllm_config, kv_cache_config=self.kv_cache_config,
                                   log_stats=True, structured_output_manager=StructuredOutputManager(self.vllm_config),
                                   block_size=bs)
        self.worker = KVConnectorFactory.create_connector(self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config)
        self.kv = allocate_kv_cache(self.kv_cache_config, torch.device("cpu"),
                                    cache_config.get_resolved_kv_cache_layout(), [bs] * len(groups))
        any_view = next(iter(self.kv.values()))
        self.buf = torch.empty(0, dtype=torch.uint8).set_(any_view.untyped_storage())  # the whole allocation
        self.worker.register_kv_caches(self.kv)
        self.finished: dict[str, Any] = {}          # req id -> EngineCoreOutput that finished it
        self.sent: list[str] = []
        self.recvd: list[str] = []
        self.load_errors: set[int] = set()
        self.stats: Any = None
        self.prom_pending: Any = None                # stats not yet fed to Prometheus

    @property
    def connector_class(self) -> str:
        return f"{type(self.scheduler.connector).__module__}.{type(self.scheduler.connector).__name__}"

    def add(self, req_id: str, prompt: list[int], max_tokens: int, params: dict[str, Any] | None) -> None:
        from vllm import SamplingParams
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher
        from vllm.v1.request import Request

        sp = SamplingParams(max_tokens=max_tokens)
        sp.update_from_generation_config({}, EOS)
        req = Request(request_id=req_id, prompt_token_ids=prompt, sampling_params=sp, pooling_params=None,
                      mm_features=None, block_hasher=get_request_block_hasher(self.block_size, self.hash_fn))
        req.kv_transfer_params = params
        self.scheduler.add_request(req)

    def block_ids(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    def group_block_ids(self, req_id: str) -> list[list[int]]:
        return [list(g) for g in self.scheduler.kv_cache_manager.get_block_ids(req_id)]

    def page(self, name: str, block: int) -> Any:
        """Layer ``name``'s page of ``block`` in the allocation (from the KVCacheTensor placement)."""
        _, base, stride = self.placement[name]
        at = base + block * stride
        return self.buf[at:at + self.page_bytes]

    def block_bytes(self, blocks: list[int], group: int = 0) -> bytes:
        """Bytes of ``blocks`` in every layer of ``group``, layers outer, blocks inner (null blocks skipped)."""
        names = [n for n in self.layers if self.placement[n][0] == group]
        size = self.content[group]
        return b"".join(self.page(n, b)[:size].numpy().tobytes() for n in names for b in blocks if b)

    def free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    def step(self, compute: bool) -> None:
        """One engine step: schedule, connector hooks around a fake forward, feed the output back."""
        import torch
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.scheduler.schedule()
        w = self.worker
        w.bind_connector_metadata(out.kv_connector_metadata)
        w.start_load_kv(None)
        req_ids = list(out.num_scheduled_tokens)
        if compute:
            gen = torch.Generator().manual_seed(len(self.finished) * 7919 + len(req_ids))
            for rid in req_ids:
                for gi, ids in enumerate(self.group_block_ids(rid)):
                    for b in ids:
                        for name in self.layers:
                            if b and self.placement[name][0] == gi:
                                blk = self.page(name, b)
                                blk.copy_(torch.randint(1, 256, blk.shape, dtype=torch.uint8, generator=gen))
        for name in self.layers:
            w.wait_for_layer_load(name)
            w.save_kv_layer(name, self.kv[name], None)
        w.wait_for_save()
        res = w.get_transfer_results(out.finished_req_ids)
        errors = w.get_block_ids_with_load_errors()
        stats = w.get_kv_connector_stats()
        w.clear_connector_metadata()
        self.sent += sorted(res.finished_sending)
        self.recvd += sorted(res.finished_recving)
        self.load_errors |= errors
        if stats is not None:
            self.stats = stats if self.stats is None else self.stats.aggregate(stats)
            fresh = type(stats).from_data(stats.data)
            self.prom_pending = fresh if self.prom_pending is None else self.prom_pending.aggregate(fresh)
        mro = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] for _ in req_ids],
            kv_connector_output=KVConnectorOutput(finished_sending=res.finished_sending or None,
                                                  finished_recving=res.finished_recving or None,
                                                  invalid_block_ids=errors, failed_recving=res.failed_recving,
                                                  kv_connector_stats=stats),
        )
        for eco in self.scheduler.update_from_output(out, mro).values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    self.finished[o.request_id] = o

    def run_until(self, cond: Any, compute: bool, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("engine condition not reached in time")
            self.step(compute)
            time.sleep(0.01)


def _pages(eng: Engine, req_id: str) -> list[list[bytes | None]]:
    """Per KV-cache group, per position of the request's block list: the block's bytes in every
    layer of the group (None for vLLM's null block)."""
    return [[eng.block_bytes([b], gi) if b else None for b in ids] for gi, ids in enumerate(eng.group_block_ids(req_id))]


_PROM: Any = None


def _prom_samples(eng: Engine) -> dict[str, float]:
    """Feed the accumulated connector stats to vLLM's Prometheus wrapper, read kvxfer's samples back."""
    from prometheus_client import REGISTRY
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm

    global _PROM
    if _PROM is None:  # registered once per process (Prometheus refuses a metric name twice)
        _PROM = KVConnectorProm(eng.vllm_config, ["model_name", "engine"], {0: ["m", "0"]})
    if eng.prom_pending is not None:  # each step's stats observed once, as vLLM's logger does
        _PROM.observe(eng.prom_pending.data, 0)
        eng.prom_pending = None
    out = {}
    for metric in REGISTRY.collect():
        if metric.name.startswith("vllm:kvxfer"):
            for sample in metric.samples:
                if sample.labels.get("engine") == "0" and not sample.name.endswith("_created"):
                    key = sample.name + ("" if "le" not in sample.labels else f"[le={sample.labels['le']}]")
                    out[f"{key}{{{sample.labels.get('backend')}}}"] = sample.value
    return out


def producer(model_dir: str, extra: dict[str, Any], prompts: dict[str, list[int]], cmd: Any, out: Any,
             setup: dict[str, Any] | None = None) -> None:
    """Prefill every prompt (max_tokens=1, do_remote_decode); keep stepping until told to stop.
    ("drop", rid, group): cancel that group's publication of rid here (the registry fails it)."""
    try:
        eng = Engine(model_dir, "kv_producer", extra, setup)
        free0 = eng.free_blocks()
        for rid, prompt in prompts.items():
            eng.add(rid, prompt, 1, {"do_remote_decode": True, "kvxfer_id": f"x-{rid}"})
        eng.run_until(lambda: all(rid in eng.finished for rid in prompts), compute=True)
        eng.step(compute=False)  # the step after request_finished publishes
        published = {}
        for rid in prompts:
            blocks = eng.block_ids(rid)
            published[rid] = {"params": eng.finished[rid].kv_transfer_params, "blocks": blocks,
                              "bytes": eng.block_bytes(blocks), "groups": eng.group_block_ids(rid),
                              "pages": _pages(eng, rid),
                              "prompt_tokens": eng.scheduler.requests[rid].num_prompt_tokens}
        out.put(("published", eng.connector_class, published, free0, eng.free_blocks(), eng.hma_enabled))
        while True:
            try:
                msg = cmd.get(timeout=0.02)
            except queue.Empty:
                msg = None
            if msg == "stop":
                break
            if msg == "status":
                out.put(("status", {rid: rid in eng.scheduler.requests for rid in prompts}, list(eng.sent),
                         eng.free_blocks()))
            if msg == "stats":
                out.put(("stats", None if eng.stats is None else eng.stats.data, _prom_samples(eng)))
            if isinstance(msg, tuple) and msg[0] == "drop":
                _, rid, group = msg
                side = eng.worker.worker
                side._agents[group].cancel(side._key(f"x-{rid}", group), "dropped by the test")
                out.put(("dropped",))
            eng.step(compute=False)
        eng.worker.shutdown()
        out.put(("stopped",))
    except BaseException as exc:  # noqa: BLE001 - the test reads the reason instead of timing out
        import traceback

        out.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def consumer(model_dir: str, extra: dict[str, Any], cmd: Any, out: Any, setup: dict[str, Any] | None = None) -> None:
    """On ("load", rid, prompt, params): decode rid (max_tokens=2) from the producer's KV. On
    ("local", rid, prompt): run rid here (max_tokens=3) and report its blocks and bytes."""
    try:
        eng = Engine(model_dir, "kv_consumer", extra, setup)
        out.put(("ready", eng.connector_class, eng.hma_enabled))
        while True:
            msg = cmd.get(timeout=300)
            if msg == "stop":
                break
            if msg[0] == "local":  # prefill and finish a request here (its full blocks stay cached)
                _, rid, prompt = msg
                eng.add(rid, prompt, 3, None)
                held: list[int] = []
                while rid not in eng.finished:  # its blocks, seen while it runs (freed at its end)
                    eng.step(compute=True)
                    if rid not in eng.finished:
                        held = eng.block_ids(rid)
                # freed blocks keep their bytes while they sit in the prefix cache; mark them, so
                # that a later load can be seen to leave them alone (the fake forward would have
                # written the producer's very bytes)
                for name in LAYERS:
                    eng.kv[name][held] = 0  # the fake forward writes bytes 1..255, never 0
                out.put(("local", rid, held, eng.block_bytes(held) if held else b""))
                continue
            _, rid, prompt, params = msg
            eng.add(rid, prompt, 2, params)
            n_recvd = len(eng.recvd)
            eng.run_until(lambda rid=rid, n=n_recvd: rid in eng.recvd[n:], compute=False)
            blocks = eng.block_ids(rid)
            groups = eng.group_block_ids(rid)
            # right after the load: bytes as the producer sent them (or what a failed load left)
            snap = eng.block_bytes(blocks) if blocks else b""
            pages = _pages(eng, rid)
            errors = sorted(eng.load_errors)
            eng.load_errors.clear()
            eng.run_until(lambda rid=rid: rid in eng.finished, compute=False)
            fin = eng.finished[rid]
            stats = None if eng.stats is None else eng.stats.reduce()
            out.put(("loaded", rid, blocks, snap, errors, str(fin.finish_reason), len(fin.new_token_ids), stats,
                     {"groups": groups, "pages": pages, "failures": eng.worker.worker.recent_failures,
                      "stats_data": None if eng.stats is None else eng.stats.data, "prom": _prom_samples(eng)}))
        eng.worker.shutdown()
        out.put(("stopped",))
    except BaseException as exc:  # noqa: BLE001 - reported to the test, then the process ends
        import traceback

        out.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
