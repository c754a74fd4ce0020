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
