"""Different tensor parallelism and block sizes on prefill and decode, through vLLM 0.33's own
scheduler with one process per TP rank on each side (see vllm_tp.py; needs ``vllm==0.33.0``).

Each decode rank must end up with, for every prompt token and each KV head it holds, exactly the
bytes the prefill rank holding that head computed: checked here head by head and token by token
on vLLM's logical ``[blocks, heads, tokens, content]`` views, from vLLM's sharding rules.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; scripts/test_vllm.sh runs these tests in its own venv")

from kvxfer.registry.server import RegistryServer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import vllm_tp as tp  # noqa: E402
from test_vllm_connector import _get  # noqa: E402

pytestmark = pytest.mark.timeout(600)

PROMPT = [(i * 17 + 3) % 500 + 3 for i in range(100)]  # 100 tokens: 7 blocks of 16, 2 of 64


@contextlib.contextmanager
def _pair(tmp_path: Any, prod: dict[str, Any], cons: dict[str, Any]) -> Iterator[tuple]:
    kv_heads = prod["kv_heads"]
    model = tp.write_model_dir(str(tmp_path / "model"), kv_heads)
    ctx = mp.get_context("spawn")
    with RegistryServer() as srv:
        base = {"registry": srv.url, "mode": "pull", "backend": "tcp", "load_timeout_s": 20.0, "ttl_s": 60.0}
        p_cmd, p_out, c_cmd, c_out = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
        pp = ctx.Process(target=tp.producer, name="producer",
                         args=(model, {**base, "consumer_tp_size": cons["tp"]}, prod, {"p-1": PROMPT}, p_cmd, p_out))
        cp = ctx.Process(target=tp.consumer, name="consumer", args=(model, base, cons, c_cmd, c_out))
        pp.start()
        cp.start()
        try:
            yield p_cmd, p_out, pp, c_cmd, c_out, cp
        finally:
            for p in (pp, cp):
                if p.is_alive():
                    p.kill()
                p.join(10)


def _held(blocks: list[int], bs: int, num_tokens: int) -> set[int]:
    """Tokens of ``[0, num_tokens)`` whose block is real (not vLLM's null block 0)."""
    return {t for t in range(num_tokens) if blocks[t // bs]}


def _check_bytes(prod: dict[str, Any], cons: dict[str, Any], p_blocks: list[int], p_pages: list[dict],
                 c_blocks: list[int], c_pages: list[dict], num_tokens: int,
                 layers: list[str] = tp.LAYERS, tokens: Any = None) -> int:
    """Compare every (layer, token, head) a consumer rank holds with the producer rank's, over
    ``tokens`` (default: all); returns how many head-token vectors were compared."""
    bs_p, bs_c, total, mla = prod["block_size"], cons["block_size"], prod["kv_heads"], prod["mla"]
    compared = 0
    for cr in range(cons["tp"]):
        for hl_c, h in enumerate(tp.local_heads(total, cons["tp"], cr, mla)):
            pr = next(r for r in range(prod["tp"]) if h in tp.local_heads(total, prod["tp"], r, mla))
            hl_p = tp.local_heads(total, prod["tp"], pr, mla).index(h)
            for layer in layers:
                mine, theirs = c_pages[cr][layer], p_pages[pr][layer]
                for t in (range(num_tokens) if tokens is None else sorted(tokens)):
                    a = mine[t // bs_c, hl_c, t % bs_c]
                    b = theirs[t // bs_p, hl_p, t % bs_p]
                    assert a.tobytes() == b.tobytes(), (f"decode rank {cr} head {h} token {t} layer {layer}: differs from "
                                            f"prefill rank {pr}")
                    compared += 1
    assert len(c_blocks) == -(-num_tokens // bs_c) and len(p_blocks) == -(-num_tokens // bs_p)
    return compared


CASES = {  # name: (prefill setup, decode setup)
    # the decode side also orders heads then tokens (LBHNC, FlashInfer's HND) where the prefill has NHD
    "tp2->1-nhd->hnd": ({"tp": 2, "block_size": 16, "kv_heads": 2, "mla": False},
                        {"tp": 1, "block_size": 16, "layout": "LBHNC"}),
    "tp1->2": ({"tp": 1, "block_size": 16, "kv_heads": 2, "mla": False}, {"tp": 2, "block_size": 16}),
    "tp1->2-gqa-replicated": ({"tp": 1, "block_size": 16, "kv_heads": 1, "mla": False}, {"tp": 2, "block_size": 16}),
    "tp2->1-mla": ({"tp": 2, "block_size": 16, "kv_heads": 1, "mla": True}, {"tp": 1, "block_size": 16}),
    "tp1->2-mla": ({"tp": 1, "block_size": 16, "kv_heads": 1, "mla": True}, {"tp": 2, "block_size": 16}),
    "bs16->64": ({"tp": 1, "block_size": 16, "kv_heads": 2, "mla": False}, {"tp": 1, "block_size": 64}),
    "bs64->16": ({"tp": 1, "block_size": 64, "kv_heads": 2, "mla": False}, {"tp": 1, "block_size": 16}),
    "bs64->16-tp1->2": ({"tp": 1, "block_size": 64, "kv_heads": 2, "mla": False}, {"tp": 2, "block_size": 16}),
    # hybrid: full attention + a sliding window of 40 tokens (the prefill's window starts
    # mid-block on one side, so the tokens both windows hold differ from either side's blocks)
    "swa-bs16->64": ({"tp": 1, "block_size": 16, "kv_heads": 2, "mla": False, "window": 40},
                     {"tp": 1, "block_size": 64}),
    "swa-bs64->16": ({"tp": 1, "block_size": 64, "kv_heads": 2, "mla": False, "window": 40},
                     {"tp": 1, "block_size": 16}),
    "swa-tp2->1-gqa": ({"tp": 2, "block_size": 16, "kv_heads": 2, "mla": False, "window": 40},
                       {"tp": 1, "block_size": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_ranks_hold_the_prefill_ranks_heads(tmp_path: Any, case: str) -> None:
    prod, cons = CASES[case]
    cons = {**prod, **cons}
    with _pair(tmp_path, prod, cons) as (p_cmd, p_out, pp, c_cmd, c_out, cp):
        _, published, free0, free_held = _get(p_out, 300, pp)
        _get(c_out, 300, cp)
        pub = published["p-1"]
        held = sum(1 for blocks in pub["groups"] for b in blocks if b)
        assert free_held == free0 - held, "the prefill's blocks (every group's) are held for the consumer"
        c_cmd.put(("load", "c-1", PROMPT, pub["params"]))
        _, rid, c_groups, c_pages, errors, reason, stats = _get(c_out, 180, cp)
        c_blocks = c_groups[0]
        assert errors == [] and reason == "length"
        n = _check_bytes(prod, cons, pub["blocks"], pub["pages"], c_blocks, c_pages, len(PROMPT))
        assert n > 0
        if prod.get("window"):
            # the window group: every token both windows hold arrived, and those cover every
            # token the next position's window sees
            p_swa, c_swa = pub["groups"][1], c_groups[1]
            both = _held(p_swa, prod["block_size"], len(PROMPT)) & _held(c_swa, cons["block_size"], len(PROMPT))
            assert set(range(len(PROMPT) - prod["window"] + 1, len(PROMPT))) <= both, sorted(both)
            assert 0 in p_swa[: -(-len(PROMPT) // prod["block_size"])] or prod["block_size"] == 64, \
                "vLLM gave back the prefill's blocks the window left behind"
            assert _check_bytes(prod, cons, p_swa, pub["pages"], c_swa, c_pages, len(PROMPT),
                                tp.SWA_LAYERS, both) > 0
        loads = sum(row["loads"] for d in stats for row in d["backends"].values())
        failures = sum(row["load_failures"] for d in stats for row in d["backends"].values())
        # one read per (decode rank, prefill rank holding some of its heads) and group; MLA: each decode rank once
        reads = sum(len({r for h in tp.local_heads(prod["kv_heads"], cons["tp"], cr, prod["mla"])
                         for r in range(prod["tp"]) if h in tp.local_heads(prod["kv_heads"], prod["tp"], r, prod["mla"])})
                    if not prod["mla"] else 1 for cr in range(cons["tp"])) * (2 if prod.get("window") else 1)
        assert failures == 0 and loads == reads, (loads, reads)
        # every prefill rank frees the request's blocks only after all its readers confirmed
        deadline = time.monotonic() + 30
        while True:
            p_cmd.put("status")
            _, sent, free_now = _get(p_out, 30, pp)
            if sent:
                break
            assert time.monotonic() < deadline, "the producer never learned that p-1 was consumed"
            time.sleep(0.2)
        assert sent == ["p-1"] and free_now == free0
        c_cmd.put("stop")
        p_cmd.put("stop")
        assert _get(c_out, 60, cp)[0] == "stopped"


def test_a_killed_prefill_rank_fails_only_its_read_and_vllm_recomputes(tmp_path: Any) -> None:
    prod = {"tp": 2, "block_size": 16, "kv_heads": 2, "mla": False}
    cons = {**prod, "tp": 1}
    with _pair(tmp_path, prod, cons) as (p_cmd, p_out, pp, c_cmd, c_out, cp):
        _, published, _, _ = _get(p_out, 300, pp)
        _get(c_out, 300, cp)
        p_cmd.put(("kill-rank", 1))
        assert _get(p_out, 30, pp)[0] == "killed"
        c_cmd.put(("load", "c-1", PROMPT, published["p-1"]["params"]))
        _, _, c_groups, c_pages, errors, reason, stats = _get(c_out, 180, cp)
        c_blocks = c_groups[0]
        # rank 1's heads (head 1) never arrived in any block: exactly those blocks are reported
        # (rank 0's read, head 0, completed: its bytes are in place); vLLM then recomputes
        assert errors == sorted(c_blocks) and reason == "length"
        theirs = published["p-1"]["pages"][0]
        for layer in tp.LAYERS:
            for t in range(len(PROMPT)):
                b, slot = divmod(t, 16)
                assert c_pages[0][layer][b, 0, slot].tobytes() == theirs[layer][b, 0, slot].tobytes()
                assert not c_pages[0][layer][b, 1, slot].view("uint16").any(), "head 1 was never written"
        loads = sum(row["loads"] for d in stats for row in d["backends"].values())
        failures = sum(row["load_failures"] for d in stats for row in d["backends"].values())
        assert loads == 1 and failures == 1
        c_cmd.put("stop")
        p_cmd.put("stop")
