"""A vLLM 0.33 engine with tensor parallelism, minus the model: one scheduler process and one
process per TP rank (spawn targets).

The scheduler process runs vLLM's own Scheduler (its connector built by KVConnectorFactory) and
drives the ranks in lock step: each step it sends the connector metadata's bytes to every rank;
each rank (its own process, its own KV cache from vLLM's ``allocate_kv_cache``, its worker-side
connector told its TP rank) runs the worker hooks around a fake forward and answers with its
transfer results; the scheduler process then reports to vLLM what every rank reported (a
request is finished sending or receiving once all ranks said so), as vLLM's output aggregator
does. ``setup``: ``tp``, ``block_size``, ``kv_heads`` (the model's total KV heads), ``mla``,
``layout`` (vLLM's KV-cache layout, ``LBNHC`` unless given), ``window`` (tokens: a second
KV-cache group of sliding-window layers ``SWA_LAYERS``, a hybrid model; none unless given).
"""

from __future__ import annotations

import os
import queue
import time
from typing import Any

NUM_BLOCKS = 48
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
SWA_LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(2, 4)]
HEAD = 16            # head size (MLA: the latent width)
EOS = 2


def write_model_dir(path: str, kv_heads: int) -> str:
    import json

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                   "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
                   "num_hidden_layers": len(LAYERS), "vocab_size": 512, "max_position_embeddings": 4096,
                   "rms_norm_eps": 1e-5, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": EOS}, f)
    return path


def group_layers(setup: dict[str, Any]) -> list[list[str]]:
    """The layers of each KV-cache group."""
    return [LAYERS] + ([SWA_LAYERS] if setup.get("window") else [])


def local_heads(total: int, tp: int, rank: int, mla: bool) -> list[int]:
    """Global KV heads rank ``rank`` holds (vLLM's sharding: split evenly, or one replicated head)."""
    if mla:
        return [0]
    if total >= tp:
        return list(range(rank * total // tp, (rank + 1) * total // tp))
    return [rank * total // tp]


def _configs(model_dir: str, kv_role: str, extra: dict[str, Any], setup: dict[str, Any], rank: int) -> tuple:
    import torch
    import vllm.distributed.parallel_state as ps
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor,
                                            MLAAttentionSpec, SlidingWindowSpec)

    if setup.get("window"):  # a GPU platform supports the hybrid manager; the CPU one says it does not
        type(current_platform).support_hybrid_kv_cache = classmethod(lambda cls: True)

    ps.get_tensor_model_parallel_rank = lambda: rank  # this process is TP rank ``rank``
    bs, tp = setup["block_size"], setup["tp"]
    model_config = ModelConfig(model=model_dir, dtype="float16", seed=0, skip_tokenizer_init=True)
    scheduler_config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024,
                                       enable_chunked_prefill=True, is_encoder_decoder=False, async_scheduling=False)
    cache_config = CacheConfig(block_size=bs, gpu_memory_utilization=0.9, cache_dtype="auto", enable_prefix_caching=True)
    cache_config.kv_cache_layout = setup.get("layout", "LBNHC")
    ktc = KVTransferConfig(kv_connector="KvxferConnector", kv_connector_module_path="kvxfer.integrations.vllm",
                           kv_role=kv_role, kv_connector_extra_config=extra, kv_load_failure_policy="recompute")
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config, cache_config=cache_config,
                             kv_transfer_config=ktc, device_config=DeviceConfig("cpu"))
    vllm_config.parallel_config.tensor_parallel_size = tp
    nheads = len(local_heads(setup["kv_heads"], tp, rank, setup["mla"]))
    if setup["mla"]:
        spec = MLAAttentionSpec(block_size=bs, num_kv_heads=1, head_size=HEAD, dtype=torch.float16)
    else:
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=nheads, head_size=HEAD, dtype=torch.float16)
    page = spec.page_size_bytes
    tensors = [KVCacheTensor(size=page * NUM_BLOCKS * len(LAYERS), layers=list(LAYERS),
                             layer_stride=page * NUM_BLOCKS, block_stride=page)]
    groups = [KVCacheGroupSpec(list(LAYERS), spec)]
    if setup.get("window"):
        swa = SlidingWindowSpec(block_size=bs, num_kv_heads=nheads, head_size=HEAD, dtype=torch.float16,
                                sliding_window=setup["window"])
        tensors.append(KVCacheTensor(size=page * NUM_BLOCKS * len(SWA_LAYERS), layers=list(SWA_LAYERS),
                                     layer_stride=page * NUM_BLOCKS, block_stride=page))
        groups.append(KVCacheGroupSpec(list(SWA_LAYERS), swa))
    kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=tensors, kv_cache_groups=groups)
    vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS
    return vllm_config, kv_cache_config


def rank_worker(model_dir: str, kv_role: str, extra: dict[str, Any], setup: dict[str, Any], rank: int,
                cmd: Any, out: Any) -> None:
    """TP rank ``rank``: a worker-side connector over its own KV cache, stepped by the scheduler."""
    try:
        import torch
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.worker.utils import allocate_kv_cache

        from kvxfer.integrations.vllm.connector import KvxferConnectorMetadata

        vllm_config, kv_cache_config = _configs(model_dir, kv_role, extra, setup, rank)
        w = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
        kv = allocate_kv_cache(kv_cache_config, torch.device("cpu"),
                               vllm_config.cache_config.get_resolved_kv_cache_layout(), [setup["block_size"]])
        w.register_kv_caches(kv)
        out.put(("ready", rank))
        nstep = 0
        while True:
            msg = cmd.get(timeout=300)
            if msg[0] == "stop":
                w.shutdown()
                out.put(("stopped", rank))
                return
            if msg[0] == "pages":  # logical [blocks, heads, tokens, content] of each group's given blocks
                out.put(("pages", rank, {n: kv[n][list(blocks)].clone().numpy()
                                         for blocks, names in zip(msg[1], group_layers(setup)) for n in names}))
                continue
            _, payload, finished, writes = msg
            nstep += 1
            w.bind_connector_metadata(KvxferConnectorMetadata(payload))
            w.start_load_kv(None)
            # seeded by the rank's first KV head: replicated heads (GQA, MLA) get equal bytes everywhere
            first = local_heads(setup["kv_heads"], setup["tp"], rank, setup["mla"])[0]
            gen = torch.Generator().manual_seed(first * 100003 + nstep)
            for blocks, names in zip(writes, group_layers(setup)):
                for b in blocks:
                    for n in names:
                        blk = kv[n][b].view(torch.uint8)
                        blk.copy_(torch.randint(1, 256, blk.shape, dtype=torch.uint8, generator=gen))
            for n in [n for names in group_layers(setup) for n in names]:
                w.wait_for_layer_load(n)
                w.save_kv_layer(n, kv[n], None)
            w.wait_for_save()
            res = w.get_transfer_results(set(finished))
            errors = w.get_block_ids_with_load_errors()
            stats = w.get_kv_connector_stats()
            w.clear_connector_metadata()
            out.put(("step", rank, res.finished_sending, res.finished_recving, res.failed_recving, errors,
                     None if stats is None else stats.data))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        out.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class TpEngine:
    """vLLM's scheduler over ``tp`` rank processes (started here, spawned)."""

    def __init__(self, model_dir: str, kv_role: str, extra: dict[str, Any], setup: dict[str, Any]):
        import multiprocessing as mp

        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        self.setup = setup
        ctx = mp.get_context("spawn")
        self.tp = setup["tp"]
        self.cmds = [ctx.Queue() for _ in range(self.tp)]
        self.outq = ctx.Queue()
        self.procs = [ctx.Process(target=rank_worker, args=(model_dir, kv_role, extra, setup, r, self.cmds[r], self.outq),
                                  name=f"{kv_role}-rank{r}", daemon=True) for r in range(self.tp)]
        for p in self.procs:
            p.start()
        self.vllm_config, self.kv_cache_config = _configs(model_dir, kv_role, extra, setup, 0)
        init_none_hash(sha256)
        self.hash_fn = sha256
        self.scheduler = Scheduler(vllm_config=self.vllm_config, kv_cache_config=self.kv_cache_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.vllm_config),
                                   block_size=setup["block_size"])
        for _ in range(self.tp):
            self._get("ready")
        self.finished: dict[str, Any] = {}
        self.sent: list[str] = []
        self.recvd: list[str] = []
        self.load_errors: set[int] = set()
        self.stats_data: list[dict] = []
        self._pending_send: dict[str, int] = {}
        self._pending_recv: dict[str, int] = {}

    def _get(self, kind: str) -> tuple:
        deadline = time.monotonic() + 300
        while True:
            try:
                msg = self.outq.get(timeout=1.0)
            except queue.Empty:
                if any(not p.is_alive() for p in self.procs):
                    raise RuntimeError("a rank process died") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {kind!r} from the ranks") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(msg[1])
            assert msg[0] == kind, msg
            return msg

    def add(self, req_id: str, prompt: list[int], max_tokens: int, params: dict[str, Any] | None) -> None:
        from vllm import SamplingParams
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher
        from vllm.v1.request import Request

        sp = SamplingParams(max_tokens=max_tokens)
        sp.update_from_generation_config({}, EOS)
        req = Request(request_id=req_id, prompt_token_ids=prompt, sampling_params=sp, pooling_params=None,
                      mm_features=None, block_hasher=get_request_block_hasher(self.setup["block_size"], self.hash_fn))
        req.kv_transfer_params = params
        self.scheduler.add_request(req)

    def block_ids(self, req_id: str, group: int = 0) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[group])

    def group_block_ids(self, req_id: str) -> list[list[int]]:
        return [list(b) for b in self.scheduler.kv_cache_manager.get_block_ids(req_id)]

    def pages(self, blocks: list[list[int]]) -> list[dict]:
        """Each rank's pages of every group's layers, ``blocks[g]`` of group ``g``."""
        for c in self.cmds:
            c.put(("pages", [list(b) for b in blocks]))
        got = {}
        for _ in range(self.tp):
            _, rank, arrays = self._get("pages")
            got[rank] = arrays
        return [got[r] for r in range(self.tp)]

    def free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    def step(self, compute: bool) -> None:
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        out = self.scheduler.schedule()
        req_ids = list(out.num_scheduled_tokens)
        ngroups = len(group_layers(self.setup))
        writes = [sorted({b for r in req_ids for b in self.block_ids(r, g)} - {0}) if compute else []
                  for g in range(ngroups)]
        for c in self.cmds:
            c.put(("step", out.kv_connector_metadata.payload, sorted(out.finished_req_ids), writes))
        sending: set[str] = set()
        recving: set[str] = set()
        failed: set[str] = set()
        errors: set[int] = set()
        stats = None
        for _ in range(self.tp):
            _, _, s, r, f, e, data = self._get("step")
            for rid in s:
                self._pending_send[rid] = self._pending_send.get(rid, 0) + 1
            for rid in r:
                self._pending_recv[rid] = self._pending_recv.get(rid, 0) + 1
            failed |= f
            errors |= e
            if data is not None:
                self.stats_data.append(data)
        for pending, done in ((self._pending_send, sending), (self._pending_recv, recving)):
            for rid, n in list(pending.items()):
                if n == self.tp:  # every rank reported it
                    done.add(rid)
                    del pending[rid]
        self.sent += sorted(sending)
        self.recvd += sorted(recving)
        self.load_errors |= errors
        mro = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] for _ in req_ids],
            kv_connector_output=KVConnectorOutput(finished_sending=sending or None, finished_recving=recving or None,
                                                  invalid_block_ids=errors, failed_recving=failed,
                                                  kv_connector_stats=stats))
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

    def stop(self) -> None:
        for c in self.cmds:
            c.put(("stop",))
        for _ in range(self.tp):
            self._get("stopped")


def producer(model_dir: str, extra: dict[str, Any], setup: dict[str, Any], prompts: dict[str, list[int]],
             cmd: Any, out: Any) -> None:
    """Prefill every prompt with ``setup['tp']`` ranks; report each request's blocks and pages."""
    try:
        eng = TpEngine(model_dir, "kv_producer", extra, setup)
        free0 = eng.free_blocks()
        for rid, prompt in prompts.items():
            eng.add(rid, prompt, 1, {"do_remote_decode": True, "kvxfer_id": f"x-{rid}"})
        eng.run_until(lambda: all(rid in eng.finished for rid in prompts), compute=True)
        eng.step(compute=False)  # publishes
        published = {rid: {"params": eng.finished[rid].kv_transfer_params, "blocks": eng.block_ids(rid),
                           "groups": eng.group_block_ids(rid), "pages": eng.pages(eng.group_block_ids(rid))}
                     for rid in prompts}
        out.put(("published", published, free0, eng.free_blocks()))
        while True:
            try:
                msg = cmd.get(timeout=0.02)
            except queue.Empty:
                msg = None
            if msg == "stop":
                break
            if msg == "status":
                out.put(("status", list(eng.sent), eng.free_blocks()))
            if isinstance(msg, tuple) and msg[0] == "kill-rank":  # this engine is broken from now on
                eng.procs[msg[1]].kill()
                eng.procs[msg[1]].join(10)
                out.put(("killed", msg[1]))
                while cmd.get(timeout=300) != "stop":
                    pass
                out.put(("stopped",))
                return
            eng.step(compute=False)
        eng.stop()
        out.put(("stopped",))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        out.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def consumer(model_dir: str, extra: dict[str, Any], setup: dict[str, Any], cmd: Any, out: Any) -> None:
    """On ("load", rid, prompt, params): load rid's KV with ``setup['tp']`` ranks, report pages."""
    try:
        eng = TpEngine(model_dir, "kv_consumer", extra, setup)
        out.put(("ready",))
        while True:
            msg = cmd.get(timeout=300)
            if msg == "stop":
                break
            _, rid, prompt, params = msg
            eng.add(rid, prompt, 2, params)
            eng.run_until(lambda rid=rid: rid in eng.recvd, compute=False)
            blocks = eng.group_block_ids(rid)
            pages = eng.pages(blocks)
            errors = sorted(eng.load_errors)
            eng.run_until(lambda rid=rid: rid in eng.finished, compute=False)
            out.put(("loaded", rid, blocks, pages, errors, str(eng.finished[rid].finish_reason), eng.stats_data))
        eng.stop()
        out.put(("stopped",))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        out.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
