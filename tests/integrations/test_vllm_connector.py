"""kvxfer's vLLM connector inside vLLM 0.33's own scheduler, in a producer and a consumer process.

Needs ``vllm==0.33.0`` (scripts/test_vllm.sh makes that environment); skips with the reason
elsewhere. The connector class is loaded by vLLM's KVConnectorFactory from
``kv_connector_module_path="kvxfer.integrations.vllm"``; the KV cache is allocated by vLLM's
``allocate_kv_cache`` on the CPU.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; scripts/test_vllm.sh runs these tests in its own venv")

from kvxfer.registry.server import RegistryServer

sys.path.insert(0, os.path.dirname(__file__))
import vllm_parties as parties

pytestmark = pytest.mark.timeout(600)

PROMPTS = {  # 40 tokens: 3 blocks of 16, the last one partial; 20 tokens: 2 blocks
    "p-1": [(i * 13 + 5) % 500 + 3 for i in range(40)],
    "p-2": [(i * 29 + 11) % 500 + 3 for i in range(20)],
}


def _get(q: Any, timeout: float, proc: Any = None) -> tuple:
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = q.get(timeout=1.0)
        except queue.Empty:
            if proc is not None and not proc.is_alive():
                pytest.fail(f"{proc.name} exited with {proc.exitcode} before answering")
            if time.monotonic() > deadline:
                pytest.fail(f"no message from {proc.name if proc else 'party'} within {timeout} s")
            continue
        if msg[0] == "error":
            pytest.fail(f"{proc.name if proc else 'party'} failed: {msg[1]}")
        return msg


@pytest.fixture
def env(tmp_path: Any) -> Iterator[dict[str, Any]]:
    with RegistryServer() as srv:
        yield {"url": srv.url, "model": parties.write_model_dir(str(tmp_path / "model"))}


@contextlib.contextmanager
def _engines(env: dict[str, Any], mode: str, prompts: dict[str, list[int]], setup: dict[str, Any] | None = None,
             consumer_setup: dict[str, Any] | None = None, ttl_s: float = 60.0) -> Iterator[tuple]:
    """A producer engine (prefilling ``prompts``) and a consumer engine, each in its own
    process: yields (p_cmd, p_out, prod, c_cmd, c_out, cons); both are killed at the end."""
    ctx = mp.get_context("spawn")
    extra = {"registry": env["url"], "mode": mode, "backend": "tcp", "load_timeout_s": 10.0, "ttl_s": ttl_s}
    p_cmd, p_out, c_cmd, c_out = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    prod = ctx.Process(target=parties.producer, args=(env["model"], extra, prompts, p_cmd, p_out, setup),
                       name="producer")
    cons = ctx.Process(target=parties.consumer, args=(env["model"], extra, c_cmd, c_out, consumer_setup or setup),
                       name="consumer")
    prod.start()
    cons.start()
    try:
        yield p_cmd, p_out, prod, c_cmd, c_out, cons
    finally:
        for p in (prod, cons):
            if p.is_alive():
                p.kill()
            p.join(10)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_prefill_decode_life_cycle_and_killed_producer(env: dict[str, Any], mode: str) -> None:
    with _engines(env, mode, PROMPTS) as (p_cmd, p_out, prod, c_cmd, c_out, cons):
        _, cls, published, free0, free_held, _ = _get(p_out, 300, prod)
        _, ccls, _ = _get(c_out, 300, cons)
        # vLLM's factory loaded our class from the module path, on both sides
        assert cls == ccls == "kvxfer.integrations.vllm.connector.KvxferConnector"
        held = sum(len(published[r]["blocks"]) for r in PROMPTS)
        assert held == 5 and free_held == free0 - held, "both prefills finished, yet their blocks must stay allocated"
        for rid in PROMPTS:
            params = published[rid]["params"]  # vLLM adds keys of its own (remote_prefill_cached_tokens)
            assert {k: params[k] for k in ("do_remote_prefill", "do_remote_decode", "kvxfer_id")} == {
                "do_remote_prefill": True, "do_remote_decode": False, "kvxfer_id": f"x-{rid}"}

        # nobody has read yet: the producer keeps the blocks however long it steps
        time.sleep(1.5)
        p_cmd.put("status")
        _, in_requests, sent, free_now = _get(p_out, 30, prod)
        assert in_requests == {"p-1": True, "p-2": True} and sent == [] and free_now == free_held

        # the consumer loads p-1 through vLLM's scheduler: every byte equals the producer's
        c_cmd.put(("load", "c-1", PROMPTS["p-1"], published["p-1"]["params"]))
        _, rid, blocks, data, errors, reason, _, stats, _ = _get(c_out, 120, cons)
        assert rid == "c-1" and errors == [] and len(blocks) == 3
        assert data == published["p-1"]["bytes"], "the consumer's blocks differ from the producer's"
        assert reason == "length"
        assert stats["transfers"] == 1 and stats["failures"] == 0 and stats["MB loaded"] > 0

        # only now, after the consumer confirmed, does the producer free p-1's blocks (p-2's stay)
        deadline = time.monotonic() + 30
        while True:
            p_cmd.put("status")
            _, in_requests, sent, free_now = _get(p_out, 30, prod)
            if sent:
                break
            assert time.monotonic() < deadline, "the producer never learned that p-1 was consumed"
            time.sleep(0.2)
        assert sent == ["p-1"] and in_requests == {"p-1": False, "p-2": True}
        assert free_now == free_held + len(published["p-1"]["blocks"])

        # the producer dies with p-2 published: the consumer's load fails for exactly its blocks,
        # the request is still reported finished and vLLM recomputes it locally
        os.kill(prod.pid, signal.SIGKILL)
        prod.join(10)
        c_cmd.put(("load", "c-2", PROMPTS["p-2"], published["p-2"]["params"]))
        _, rid, blocks, data, errors, reason, _, stats, _ = _get(c_out, 120, cons)
        assert rid == "c-2" and len(blocks) == 2
        assert errors == sorted(blocks), f"load errors {errors} != the request's blocks {blocks}"
        assert reason == "length", "after the failed load vLLM recomputes and finishes the request"
        assert stats["failures"] == 1
        c_cmd.put("stop")
        assert _get(c_out, 60, cons)[0] == "stopped"


def _block(data: bytes, nblocks: int, layer: int, i: int) -> bytes:
    """Block ``i`` of ``layer`` in Engine.block_bytes() output (layers outer, blocks inner)."""
    page = len(data) // (len(parties.LAYERS) * nblocks)
    at = (layer * nblocks + i) * page
    return data[at:at + page]


def test_a_local_prefix_hit_is_not_loaded_again(env: dict[str, Any]) -> None:
    # the consumer prefilled the same prompt itself before: its first two (full) blocks are in
    # its prefix cache, so the pull moves only the third block from the producer
    with _engines(env, "pull", {"p-1": PROMPTS["p-1"]}) as (p_cmd, p_out, prod, c_cmd, c_out, cons):
        _, _, published, _, _, _ = _get(p_out, 300, prod)
        _get(c_out, 300, cons)
        c_cmd.put(("local", "c-0", PROMPTS["p-1"]))
        _, _, local_blocks, local_data = _get(c_out, 120, cons)
        c_cmd.put(("load", "c-1", PROMPTS["p-1"], published["p-1"]["params"]))
        _, rid, blocks, data, errors, reason, _, stats, _ = _get(c_out, 120, cons)
        assert rid == "c-1" and errors == [] and len(blocks) == 3 and reason == "length"
        assert blocks[:2] == local_blocks[:2], "vLLM should have reused the cached blocks"
        theirs = published["p-1"]["bytes"]
        for layer in range(len(parties.LAYERS)):
            for i in (0, 1):  # kept as this side left them (zeros), not overwritten by the producer's
                assert _block(data, 3, layer, i) == _block(local_data, len(local_blocks), layer, i)
                assert not any(_block(data, 3, layer, i))
            assert _block(data, 3, layer, 2) == _block(theirs, 3, layer, 2), "the block after the hit came over"
        assert stats["transfers"] == 1 and stats["failures"] == 0
        c_cmd.put("stop")
        p_cmd.put("stop")
        assert _get(c_out, 60, cons)[0] == "stopped"
