"""Hybrid models, the failure policy, metrics and the compatibility check, through vLLM 0.33's own
scheduler in a producer and a consumer process (see vllm_parties.py; needs ``vllm==0.33.0``)."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vllm is not installed here; scripts/test_vllm.sh runs these tests in its own venv")

from test_vllm_connector import PROMPTS, _engines, _get, env  # noqa: E402,F401  (env: the fixture)

import vllm_parties as parties  # noqa: E402

pytestmark = pytest.mark.timeout(600)

BS = parties.BLOCK_SIZE


def _expected_positions(kind: str, group: int, prompt_len: int, ids: list[int]) -> list[int]:
    """Positions of a request's block list that the transfer must cover, worked out here from
    vLLM's rules (not from kvxfer's code): every prompt block of full attention; the blocks
    that hold a token the window still sees; the state block after the prompt (the last one
    vLLM keeps)."""
    n = -(-prompt_len // BS)
    if group == 0:
        return list(range(n))
    if kind == "swa":
        first_seen = max(0, prompt_len - parties.SLIDING_WINDOW + 1)
        return list(range(first_seen // BS, n))
    return [max(i for i, b in enumerate(ids) if b)]


def _wait_sent(p_cmd: Any, p_out: Any, prod: Any, rid: str) -> tuple:
    deadline = time.monotonic() + 30
    while True:
        p_cmd.put("status")
        _, in_requests, sent, free_now = _get(p_out, 30, prod)
        if rid in sent:
            return in_requests, sent, free_now
        assert time.monotonic() < deadline, f"the producer never learned that {rid} was consumed"
        time.sleep(0.2)


@pytest.mark.parametrize("kind,mode", [("swa", "pull"), ("mamba", "pull"), ("swa", "push"), ("mamba", "push")])
def test_hybrid_groups_move_with_their_own_blocks(env: dict[str, Any], kind: str, mode: str) -> None:
    setup = {"kind": kind}
    with _engines(env, mode, {"p-1": PROMPTS["p-1"]}, setup) as (p_cmd, p_out, prod, c_cmd, c_out, cons):
        _, _, published, free0, free_held, p_hma = _get(p_out, 300, prod)
        _, _, c_hma = _get(c_out, 300, cons)
        assert p_hma and c_hma, "vLLM turned its hybrid KV-cache manager off with kvxfer configured"
        pub = published["p-1"]
        assert len(pub["groups"]) == 2
        if kind == "swa":  # vLLM already gave back the block the window left behind
            assert pub["groups"][1][0] == 0 and all(pub["groups"][1][1:3])
        # with a Mamba state the prefill stops one token short: the decode side computes the last
        # prompt token from the state of the others
        assert pub["prompt_tokens"] == len(PROMPTS["p-1"]) - (kind == "mamba")
        c_cmd.put(("load", "c-1", PROMPTS["p-1"], pub["params"]))
        _, rid, _, _, errors, reason, _, stats, info = _get(c_out, 120, cons)
        assert errors == [] and reason == "length" and info["failures"] == []
        for g in (0, 1):
            want = _expected_positions(kind, g, len(PROMPTS["p-1"]), pub["groups"][g])
            assert want, f"group {g} moves nothing"
            theirs = [pub["pages"][g][i] for i in want]
            mine = [info["pages"][g][i] for i in want]
            assert all(theirs) and mine == theirs, f"group {g}: the consumer's blocks differ from the producer's"
        assert stats["transfers"] == 2 and stats["failures"] == 0  # one transfer per group
        # the producer frees the request's blocks once, after both groups were consumed
        in_requests, sent, free_now = _wait_sent(p_cmd, p_out, prod, "p-1")
        assert sent == ["p-1"] and in_requests == {"p-1": False}
        assert free_now == free0, f"{free0 - free_now} blocks still held after the consumer confirmed"
        c_cmd.put("stop")
        p_cmd.put("stop")
        assert _get(c_out, 60, cons)[0] == "stopped"


def test_mamba_state_moves_across_attention_block_sizes(env: dict[str, Any]) -> None:
    """Prefill with 16-token attention blocks, decode with 32: full attention is mapped token by
    token, the state block (padded to each side's attention page) moves as it is."""
    prompt = PROMPTS["p-1"]
    with _engines(env, "pull", {"p-1": prompt}, {"kind": "mamba"}, {"kind": "mamba", "block_size": 32}) as (
            p_cmd, p_out, prod, c_cmd, c_out, cons):
        _, _, published, free0, _, _ = _get(p_out, 300, prod)
        _get(c_out, 300, cons)
        pub = published["p-1"]
        n = pub["prompt_tokens"]
        c_cmd.put(("load", "c-1", prompt, pub["params"]))
        _, _, _, _, errors, reason, _, stats, info = _get(c_out, 120, cons)
        assert errors == [] and reason == "length" and info["failures"] == []
        # full attention (2 layers, LBNHC): token t of a layer sits at slot t % bs of block t // bs
        tok = 2 * 2 * 16 * 2  # heads * (K and V of 16) * fp16 bytes
        for t in range(n):
            for layer in range(2):
                cut = []
                for pages, bs in ((pub["pages"][0], 16), (info["pages"][0], 32)):
                    at = layer * bs * tok + (t % bs) * tok
                    cut.append(pages[t // bs][at:at + tok])
                assert cut[0] == cut[1] and len(cut[0]) == tok, f"token {t} layer {layer} differs"
        p_state = pub["pages"][1][_expected_positions("mamba", 1, n, pub["groups"][1])[0]]
        c_state = [p for p in info["pages"][1] if p is not None]
        assert p_state and c_state[-1] == p_state, "the consumer's state block differs from the producer's"
        assert stats["transfers"] == 2 and stats["failures"] == 0
        in_requests, sent, free_now = _wait_sent(p_cmd, p_out, prod, "p-1")
        assert sent == ["p-1"] and free_now == free0
        c_cmd.put("stop")
        p_cmd.put("stop")
        assert _get(c_out, 60, cons)[0] == "stopped"


def test_a_lost_group_reports_exactly_its_blocks_and_vllm_recomputes(env: dict[str, Any]) -> None:
    setup = {"kind": "swa"}
    with _engines(env, "pull", {"p-1": PROMPTS["p-1"]}, setup) as (p_cmd, p_out, prod, c_cmd, c_out, cons):
        _, _, published, _, _, _ = _get(p_out, 300, prod)
        _get(c_out, 300, cons)
        p_cmd.put(("drop", "p-1", 1))  # the producer loses the sliding-window group's publication
        assert _get(p_out, 30, prod)[0] == "dropped"
        pub = published["p-1"]
        c_cmd.put(("load", "c-1", PROMPTS["p-1"], pub["params"]))
        _, _, _, _, errors, reason, _, stats, info = _get(c_out, 120, cons)
        window = _expected_positions("swa", 1, len(PROMPTS["p-1"]), pub["groups"][1])
        # vLLM 0.33 takes no block ids with several KV-cache groups (a block id is unique only
        # within its group): the request is reported in failed_recving, and the worker names
        # exactly the blocks of the group that did not arrive
        assert errors == []
        (rid, group, missing, why), = info["failures"]
        assert rid == "c-1" and group == 1 and "cancel" in why
        assert list(missing) == sorted(info["groups"][1][i] for i in window), \
            "exactly the sliding-window blocks are missing, not the full-attention ones"
        full = _expected_positions("swa", 0, len(PROMPTS["p-1"]), pub["groups"][0])
        assert [info["pages"][0][i] for i in full] == [pub["pages"][0][i] for i in full], "group 0 arrived"
        assert reason == "length", "vLLM recomputes the request and finishes it"
        assert stats["transfers"] == 1 and stats["failures"] == 1
        c_cmd.put("stop")
        p_cmd.put("stop")


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_compatibility_mismatch_fails_the_load_naming_the_field(env: dict[str, Any], policy: str) -> None:
    prod_setup = {"dtype": "float16", "policy": policy}
    cons_setup = {"dtype": "bfloat16", "policy": policy}
    with _engines(env, "pull", {"p-2": PROMPTS["p-2"]}, prod_setup, cons_setup) as (p_cmd, p_out, prod, c_cmd, c_out, cons):
        _, _, published, _, _, _ = _get(p_out, 300, prod)
        _get(c_out, 300, cons)
        c_cmd.put(("load", "c-2", PROMPTS["p-2"], published["p-2"]["params"]))
        _, _, blocks, _, errors, reason, _, stats, info = _get(c_out, 120, cons)
        (rid, _, missing, why), = info["failures"]
        assert rid == "c-2" and "dtype differs" in why and "bfloat16" in why and "float16" in why, why
        assert len(missing) == 2 and errors == list(missing), "every block of the request is reported"
        if policy == "recompute":  # (with fail, vLLM has already dropped the request and its blocks)
            assert sorted(blocks) == errors
        # vLLM's failure policy decides: recompute finishes the request here, fail ends it with an error
        assert reason == ("length" if policy == "recompute" else "error")
        assert stats["failures"] == 1 and stats["transfers"] == 0
        c_cmd.put("stop")
        p_cmd.put("stop")


def test_metrics_count_per_backend_and_reach_prometheus(env: dict[str, Any]) -> None:
    with _engines(env, "pull", PROMPTS, {"kind": "swa"}) as (p_cmd, p_out, prod, c_cmd, c_out, cons):
        _, _, published, _, _, _ = _get(p_out, 300, prod)
        _get(c_out, 300, cons)
        c_cmd.put(("load", "c-1", PROMPTS["p-1"], published["p-1"]["params"]))
        _get(c_out, 120, cons)
        p_cmd.put(("drop", "p-2", 0))
        assert _get(p_out, 30, prod)[0] == "dropped"
        c_cmd.put(("load", "c-2", PROMPTS["p-2"], published["p-2"]["params"]))
        _, _, _, _, _, _, _, stats, info = _get(c_out, 120, cons)
        # c-1: two groups loaded; c-2 (20 tokens, the window holds both blocks): group 1 loaded, group 0 failed
        assert stats["transfers"] == 3 and stats["failures"] == 1
        data = info["stats_data"]
        # a load that failed before any data moved (the registry refused it) counts under "registry"
        assert set(data["backends"]) == {"tcp", "registry"}
        assert data["backends"]["registry"]["load_failures"] == 1 and data["backends"]["registry"]["loads"] == 0
        row = data["backends"]["tcp"]
        page = published["p-1"]["params"]["kvxfer_spec"]["groups"][0][4]
        layers = 2  # per group
        moved_blocks = 3 + 2 + 2  # c-1: 3 full + 2 window blocks; c-2: 2 window blocks
        assert row["loads"] == 3 and row["load_failures"] == 0 and row["load_bytes"] == moved_blocks * layers * page
        assert len(data["seconds"]) == 3 and all(s > 0 for _, s in data["seconds"])
        prom = info["prom"]  # every step's stats observed once
        assert prom["vllm:kvxfer_transfers_total{tcp}"] == 3
        assert prom["vllm:kvxfer_failures_total{tcp}"] == 0 and prom["vllm:kvxfer_failures_total{registry}"] == 1
        assert prom["vllm:kvxfer_bytes_total{tcp}"] == moved_blocks * layers * page
        assert prom["vllm:kvxfer_transfer_time_seconds_count{tcp}"] == 3
        assert prom["vllm:kvxfer_expired_requests_total{tcp}"] == 0
        c_cmd.put("stop")
        p_cmd.put("stop")


def test_an_expired_publication_is_counted_and_its_blocks_freed(env: dict[str, Any]) -> None:
    with _engines(env, "pull", {"p-2": PROMPTS["p-2"]}, {"kind": "swa"}, ttl_s=1.0) as (p_cmd, p_out, prod, c_cmd, c_out, cons):
        _, _, _, free0, free_held, _ = _get(p_out, 300, prod)
        assert free_held < free0
        # nobody reads p-2: both groups' publications expire after 1 s and the blocks come back once
        in_requests, sent, free_now = _wait_sent(p_cmd, p_out, prod, "p-2")
        assert sent == ["p-2"] and free_now == free0 and in_requests == {"p-2": False}
        p_cmd.put("stats")
        _, data, prom = _get(p_out, 30, prod)
        row = data["backends"]["tcp"]  # the configured backend: a producer never sees the consumer's path
        # two group transfers ended unread, one request expired
        assert row["sends"] == 2 and row["send_failures"] == 2 and row["expired"] == 1
        assert prom["vllm:kvxfer_expired_requests_total{tcp}"] == 1 and prom["vllm:kvxfer_failures_total{tcp}"] == 2
        p_cmd.put("stop")
        c_cmd.put("stop")
