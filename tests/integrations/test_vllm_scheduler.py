"""The scheduler side's load planning with stand-in requests and blocks (needs vLLM importable:
runs in the vLLM venv of scripts/test_vllm.sh)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="the scheduler side imports vLLM (scripts/test_vllm.sh installs it)")

from kvxfer.integrations.vllm.compat import EngineSpec  # noqa: E402
from kvxfer.integrations.vllm.config import TransferMode, TransferRole, VllmConnectorConfig  # noqa: E402
from kvxfer.integrations.vllm.groups import GroupInfo, GroupKind  # noqa: E402
from kvxfer.integrations.vllm.metadata import PARAM_ID, PARAM_REMOTE_PREFILL  # noqa: E402
from kvxfer.integrations.vllm.scheduler import SchedulerSide  # noqa: E402

BS = 16
GROUPS = (GroupInfo(0, GroupKind.FULL, BS, 0, ("l0",), 1024),)
SPEC = EngineSpec("m", "torch.float16", "auto", "NHD", tuple(tuple(g.describe()) for g in GROUPS))


def _side(mode=TransferMode.PULL, groups=GROUPS):
    return SchedulerSide(VllmConnectorConfig(mode=mode), TransferRole.CONSUMER, groups, SPEC, lambda rid: ())


def _request(rid: str, prompt_tokens: int):
    return SimpleNamespace(request_id=rid, num_prompt_tokens=prompt_tokens,
                           kv_transfer_params={PARAM_REMOTE_PREFILL: True, PARAM_ID: f"x-{rid}"})


def _blocks(ids):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def _plan_load(side: SchedulerSide, req, local_hit_tokens: int, block_ids):
    count, is_async = side.get_num_new_matched_tokens(req, local_hit_tokens)
    side.update_state_after_alloc(req, _blocks(block_ids), count)
    return count, is_async, side.build_connector_meta(SimpleNamespace()).loads


@pytest.mark.parametrize("mode,hit_tokens,skip", [
    (TransferMode.PULL, 0, 0),
    (TransferMode.PULL, 3 * BS, 3),          # three whole blocks of the prompt are cached here
    (TransferMode.PUSH, 3 * BS, 0),          # the producer writes every block in push mode
])
def test_a_local_prefix_hit_is_skipped_by_the_load(mode, hit_tokens, skip):
    side = _side(mode)
    req = _request("r1", 5 * BS + 3)  # 6 prompt blocks, the last one partial
    count, is_async, loads = _plan_load(side, req, hit_tokens, range(100, 108))
    assert (count, is_async) == (5 * BS + 3 - hit_tokens, True)
    assert len(loads) == 1
    assert loads[0].dst_blocks == tuple(range(100, 106)) and loads[0].skip == skip


def test_a_hit_noted_for_an_abandoned_request_is_forgotten():
    side = _side()
    req = _request("r2", 4 * BS)
    side.get_num_new_matched_tokens(req, 2 * BS)
    side.request_finished(req, [])
    # scheduled again later without a local hit: nothing stale is skipped
    _, _, loads = _plan_load(side, req, 0, range(10, 14))
    assert loads[0].skip == 0


def _params(rid, spec):
    return {PARAM_REMOTE_PREFILL: True, PARAM_ID: f"x-{rid}", "kvxfer_spec": spec.to_params()}


def test_another_tp_plans_token_mapped_loads_per_group():
    kv = {"tp_size": 2, "block_size": 64}
    mine = EngineSpec("m", "torch.float16", "auto", "LBNHC", SPEC.groups, 1, {"tp_size": 1})
    theirs = EngineSpec("m", "torch.float16", "auto", "LBNHC", (("full", 64, 0, 1, 8192),), 2, kv)
    side = SchedulerSide(VllmConnectorConfig(), TransferRole.CONSUMER, GROUPS, mine, lambda rid: ())
    req = SimpleNamespace(request_id="r", num_prompt_tokens=100, kv_transfer_params=_params("r", theirs))
    count, _ = side.get_num_new_matched_tokens(req, 0)
    side.update_state_after_alloc(req, _blocks(range(10, 20)), count)
    (load,) = side.build_connector_meta(SimpleNamespace()).loads
    assert load.dst_blocks == tuple(range(10, 17)) and load.num_tokens == 100 and load.remote == kv
    assert load.refuse == "" and load.skip == 0


def _tp_change_loads(kind: GroupKind, window: int, tp_theirs: int, bs_theirs: int = BS):
    groups = GROUPS + (GroupInfo(1, kind, BS, window, ("l1",), 1024),)
    desc = tuple(tuple(g.describe()) for g in groups)
    theirs_groups = GROUPS + (GroupInfo(1, kind, bs_theirs, window, ("l1",), 1024),)
    mine = EngineSpec("m", "torch.float16", "auto", "LBNHC", desc, 1, {"tp_size": 1})
    theirs = EngineSpec("m", "torch.float16", "auto", "LBNHC", tuple(tuple(g.describe()) for g in theirs_groups),
                        tp_theirs, {"tp_size": tp_theirs})
    side = SchedulerSide(VllmConnectorConfig(), TransferRole.CONSUMER, groups, mine, lambda rid: ())
    req = SimpleNamespace(request_id="r", num_prompt_tokens=40, kv_transfer_params=_params("r", theirs))
    count, _ = side.get_num_new_matched_tokens(req, 0)
    blocks = SimpleNamespace(get_block_ids=lambda: ([1, 2, 3], [0, 5, 6]))
    side.update_state_after_alloc(req, blocks, count)
    return side.build_connector_meta(SimpleNamespace()).loads


def test_a_state_group_refuses_another_tp_naming_it():
    loads = _tp_change_loads(GroupKind.MAMBA, 0, 2)
    assert [ld.group for ld in loads] == [0, 1]
    assert all("group 1 (state) moves between equal tp_size only" in ld.refuse for ld in loads)


def test_a_sliding_window_group_with_another_tp_gets_a_token_mapped_load():
    loads = _tp_change_loads(GroupKind.SLIDING_WINDOW, 24, 2)
    assert [(ld.group, ld.refuse, ld.num_tokens, ld.remote) for ld in loads] == [
        (0, "", 40, {"tp_size": 2}), (1, "", 40, {"tp_size": 2})]
    assert loads[1].dst_blocks == (0, 5, 6)  # every position: the worker plans from the real ones


def test_a_state_group_across_block_sizes_moves_its_block_as_it_is():
    loads = _tp_change_loads(GroupKind.MAMBA, 0, 1, bs_theirs=64)
    assert [(ld.group, ld.refuse, ld.remote is None) for ld in loads] == [(0, "", False), (1, "", True)]
    assert loads[1].dst_blocks == (6,)  # the state block after the prompt


def test_with_a_state_group_the_decode_side_computes_the_last_prompt_token():
    groups = GROUPS + (GroupInfo(1, GroupKind.MAMBA, BS, 0, ("l1",), 512),)
    desc = tuple(tuple(g.describe()) for g in groups)
    spec = EngineSpec("m", "torch.float16", "auto", "LBNHC", desc)
    producer = SchedulerSide(VllmConnectorConfig(), TransferRole.PRODUCER, groups, spec, lambda rid: ())
    req = SimpleNamespace(request_id="p", num_prompt_tokens=40, prompt_token_ids=list(range(40)),
                          _all_token_ids=list(range(40)), max_tokens=1,
                          kv_transfer_params={"do_remote_decode": True, PARAM_ID: "x"})
    producer.on_new_request(req)
    producer.on_new_request(req)  # rescheduled: not cut twice
    assert req.num_prompt_tokens == 39 and req.prompt_token_ids == list(range(39)) and len(req._all_token_ids) == 39
    consumer = SchedulerSide(VllmConnectorConfig(), TransferRole.CONSUMER, groups, spec, lambda rid: ())
    creq = SimpleNamespace(request_id="c", num_prompt_tokens=40, kv_transfer_params=_params("c", spec))
    count, is_async = consumer.get_num_new_matched_tokens(creq, 0)
    assert (count, is_async) == (39, True)
    consumer.update_state_after_alloc(creq, SimpleNamespace(get_block_ids=lambda: ([1, 2, 3], [0, 0, 7])), count)
    loads = consumer.build_connector_meta(SimpleNamespace()).loads
    assert [(ld.group, ld.dst_blocks) for ld in loads] == [(0, (1, 2, 3)), (1, (7,))]
