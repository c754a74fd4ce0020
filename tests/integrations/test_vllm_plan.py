"""The vLLM connector's vLLM-free parts: settings and the step plan's wire form (no vLLM needed)."""

from __future__ import annotations

import msgpack
import pytest

import kvxfer
from kvxfer.errors import ConfigError, LocalProtocolError
from kvxfer.integrations.vllm.config import (
    TransferMode,
    TransferRole,
    VllmConnectorConfig,
)
from kvxfer.integrations.vllm.metadata import (
    LoadSpec,
    PublishSpec,
    PushSpec,
    StepPlan,
    transfer_id_of,
)


def test_import_kvxfer_does_not_import_the_integration() -> None:
    import subprocess
    import sys

    code = "import sys, kvxfer; print('kvxfer.integrations.vllm' in sys.modules, 'vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]
    assert kvxfer.__version__


def test_step_plan_round_trip() -> None:
    plan = StepPlan(loads=(LoadSpec("r1", "x1", (3, 4, 5)), LoadSpec("r4", "x4", (8, 9), skip=1, group=1),
                           LoadSpec("r5", "x5", (6,), group=2, refuse="dtype differs"),
                           LoadSpec("r6", "x6", (7, 8), num_tokens=20, remote={"tp_size": 2})),
                    publishes=(PublishSpec("r2", "x2", (7,), 30.0, 1),),
                    pushes=(PushSpec("r3", "x3", (1, 2), 2),))
    assert StepPlan.from_bytes(plan.to_bytes()) == plan
    assert not StepPlan() and StepPlan.from_bytes(StepPlan().to_bytes()) == StepPlan()


@pytest.mark.parametrize("raw", [
    msgpack.packb([3, [], [], []]),                                        # another version
    msgpack.packb([4, [["r", "k", [-1], 0, 0, "", 0, None]], [], []]),    # negative block id
    msgpack.packb([4, [["r", 5, [1], 0, 0, "", 0, None]], [], []]),       # key not a string
    msgpack.packb([4, [["r", "k", [1], 2, 0, "", 0, None]], [], []]),     # skips more blocks than it names
    msgpack.packb([4, [["r", "k", [1], -1, 0, "", 0, None]], [], []]),    # negative skip
    msgpack.packb([4, [["r", "k", [1], 0, -1, "", 0, None]], [], []]),    # negative group
    msgpack.packb([4, [["r", "k", [1], 0, 0, 7, 0, None]], [], []]),      # refusal not a string
    msgpack.packb([4, [["r", "k", [1], 0, 0, "", -5, None]], [], []]),    # negative token count
    msgpack.packb([4, [["r", "k", [1], 0, 0, "", 5, [1]]], [], []]),      # remote spec not a map
    msgpack.packb([4, [["r", "k", [1], 0]], [], []]),                     # fields missing
    msgpack.packb([4, [], [["r", "k", [1], 1.0]], []]),                   # publication without its group
    msgpack.packb([4, [], []]),                                            # truncated
    b"\xc1",                                            # not msgpack
])
def test_step_plan_refuses_malformed(raw: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        StepPlan.from_bytes(raw)


def test_config_from_extra_config_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = VllmConnectorConfig.from_extra_config({"registry": "redis://h:6379/0", "mode": "PUSH", "ttl_s": "5"})
    assert cfg.mode is TransferMode.PUSH and cfg.ttl_s == 5.0 and cfg.registry == "redis://h:6379/0"
    monkeypatch.setenv("KVXFER_VLLM_REGISTRY", "kvxfer://10.0.0.1:7400")
    monkeypatch.setenv("KVXFER_VLLM_MODE", "push")
    cfg = VllmConnectorConfig.from_extra_config({"mode": "pull"})  # the config key wins over the variable
    assert cfg.registry == "kvxfer://10.0.0.1:7400" and cfg.mode is TransferMode.PULL


@pytest.mark.parametrize("extra, words", [
    ({"registy": "kvxfer://h:1"}, "valid"),
    ({"mode": "sideways"}, "pull"),
    ({"backend": "carrier-pigeon"}, "tcp"),
    ({"registry": "http://h:1"}, "kvxfer://"),
    ({"ttl_s": -1}, "positive"),
])
def test_config_errors_name_the_valid_values(extra: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        VllmConnectorConfig.from_extra_config(extra)


def test_roles_and_params() -> None:
    assert TransferRole.from_kv_role("kv_both").produces and TransferRole.from_kv_role("kv_both").consumes
    assert not TransferRole.from_kv_role("kv_consumer").produces
    with pytest.raises(ConfigError, match="kv_producer"):
        TransferRole.from_kv_role("kv_sideways")
    assert transfer_id_of({"do_remote_decode": True}, "do_remote_decode") == ""
    assert transfer_id_of({"do_remote_prefill": True, "kvxfer_id": "a"}, "do_remote_prefill") == "a"
    assert transfer_id_of({"do_remote_prefill": False, "kvxfer_id": "a"}, "do_remote_prefill") is None
    assert transfer_id_of(None, "do_remote_prefill") is None


# -- KV-cache groups, the compatibility spec, counters (vLLM-free) ---------------------------
from kvxfer.errors import LayoutError  # noqa: E402
from kvxfer.integrations.vllm.compat import EngineSpec  # noqa: E402
from kvxfer.integrations.vllm.counters import TransferCounters, merge_counters  # noqa: E402
from kvxfer.integrations.vllm.groups import GroupInfo, GroupKind, transfer_slice  # noqa: E402


def test_transfer_slice_per_group_kind() -> None:
    full = GroupInfo(0, GroupKind.FULL, 16)
    swa = GroupInfo(1, GroupKind.SLIDING_WINDOW, 16, window=24)
    state = GroupInfo(2, GroupKind.MAMBA, 16)
    assert transfer_slice(full, 40, [5, 6, 7, 8]) == (0, [5, 6, 7])       # 3 prompt blocks, not the 4th
    # 40 tokens, window 24: tokens from 17 on are still seen, block 1 on; block 0 is vLLM's null block
    assert transfer_slice(swa, 40, [0, 6, 7]) == (1, [6, 7])
    assert transfer_slice(swa, 20, [3, 4]) == (0, [3, 4])                 # the window holds the whole prompt
    assert transfer_slice(state, 40, [0, 0, 9]) == (2, [9])             # after the prompt: the last one
    assert transfer_slice(state, 40, [4, 5, 9, 11]) == (2, [9])         # while it is computed
    assert transfer_slice(state, 40, [9]) == (0, [9])                   # one state block per request
    with pytest.raises(LayoutError, match="null block"):
        transfer_slice(swa, 64, [0, 0, 0, 7])  # 64 tokens: positions 2 and 3 are in the window, 2 is not held
    with pytest.raises(LayoutError, match="expected 3"):
        transfer_slice(full, 40, [5, 6])
    with pytest.raises(LayoutError, match="sliding window"):
        GroupInfo(1, GroupKind.SLIDING_WINDOW, 16)


def _spec(**kw) -> EngineSpec:
    base = dict(model="m", dtype="torch.float16", kv_cache_dtype="auto", layout="LBNHC",
                groups=(("full", 16, 0, 2, 2048),), tp_size=1, kv={"tp_size": 1})
    base.update(kw)
    return EngineSpec(**base)


@pytest.mark.parametrize("theirs, words", [
    (_spec(model="other"), "model differs: producer 'other', consumer 'm'"),
    (_spec(dtype="torch.bfloat16"), "dtype differs"),
    (_spec(kv_cache_dtype="fp8"), "kv_cache_dtype differs"),
    (_spec(groups=(("full", 16, 0, 2, 2048), ("sliding_window", 16, 24, 2, 2048))), "groups differ"),
    (_spec(groups=(("sliding_window", 16, 24, 2, 2048),)), "group 0 kind differs"),
    (_spec(layout="LBHNC", kv=None), "cannot describe its heads"),
])
def test_engine_spec_names_the_field_that_differs(theirs: EngineSpec, words: str) -> None:
    assert words in _spec().mismatch(theirs.to_params())


def test_engine_spec_allows_a_reshard_of_attention_and_a_state_at_equal_tp() -> None:
    mine = _spec()
    assert mine.mismatch(_spec().to_params()) == "" and not mine.needs_reshard(_spec().to_params())
    for theirs in (_spec(tp_size=2), _spec(groups=(("full", 64, 0, 2, 8192),)), _spec(layout="LBHNC")):
        assert mine.needs_reshard(theirs.to_params()) and mine.mismatch(theirs.to_params()) == ""
    hybrid = _spec(groups=(("full", 16, 0, 2, 2048), ("sliding_window", 16, 24, 2, 2048)))
    for theirs in (_spec(groups=hybrid.groups, tp_size=2),
                   _spec(groups=(("full", 64, 0, 2, 8192), ("sliding_window", 64, 24, 2, 8192)))):
        assert hybrid.needs_reshard(theirs.to_params()) and hybrid.mismatch(theirs.to_params()) == ""
    mamba = _spec(groups=(("full", 16, 0, 2, 2048), ("mamba", 16, 0, 2, 2048)))
    other_bs = _spec(groups=(("full", 64, 0, 2, 8192), ("mamba", 64, 0, 2, 8192)))
    assert mamba.needs_reshard(other_bs.to_params()) and mamba.mismatch(other_bs.to_params()) == ""
    other_tp = _spec(groups=mamba.groups, tp_size=2)
    assert "group 1 (state) moves between equal tp_size only" in mamba.mismatch(other_tp.to_params())
    assert "expected a mapping" in mine.mismatch(None)


def test_counters_merge_per_backend() -> None:
    a, b = TransferCounters(), TransferCounters()
    assert not a
    a.add("tcp", loads=1, load_bytes=100)
    a.time("tcp", 0.5)
    b.add("tcp", loads=2, load_bytes=50)
    b.add("registry", load_failures=1)
    merged = merge_counters(merge_counters({}, a.data), b.data)
    assert merged["backends"]["tcp"]["loads"] == 3 and merged["backends"]["tcp"]["load_bytes"] == 150
    assert merged["backends"]["registry"]["load_failures"] == 1 and merged["seconds"] == [["tcp", 0.5]]


def test_config_consumer_tp_size() -> None:
    assert VllmConnectorConfig.from_extra_config({"consumer_tp_size": "2"}).consumer_tp_size == 2
    with pytest.raises(ConfigError, match="consumer_tp_size"):
        VllmConnectorConfig.from_extra_config({"consumer_tp_size": -1})
