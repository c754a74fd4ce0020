"""The cuda_ipc backend's bounds check of block-pair plans against mapped spans (CPU only: the
check runs on the host before any launch)."""

import numpy as np
import pytest

from kvxfer import BlockIdError, KVLayout, plan_transfer
from kvxfer.backends.cuda_ipc.endpoint import check_pairs_within as _check_pairs_within
from kvpeers import LayoutSpec


@pytest.mark.parametrize("kind", ["kv_first", "blocks_first", "mla", "vllm_shared"])
def test_pairs_within_spans_and_one_byte_short(kind):
    st, bd = LayoutSpec(kind, 32, layers=3).build(1)
    g = KVLayout.from_tensors(st, block_dim=bd).geometry
    spans = np.array([t.span for t in g.tensors], dtype=np.int64)
    last = g.num_blocks - 1
    plan = plan_transfer(g, g, [0, last], [last, 1])
    for _ in range(2):  # the second time from the cache
        _check_pairs_within(plan.block_pairs, "src", spans, "peer")
        _check_pairs_within(plan.block_pairs, "dst", spans, "local")
    short = spans.copy()
    short[2] -= 1  # a peer whose mapping ends one byte before its claimed geometry does
    with pytest.raises(BlockIdError, match="outside its registered"):
        _check_pairs_within(plan.block_pairs, "src", short, "peer")
    # blocks that stay clear of the missing byte still pass under the same short spans
    ok = plan_transfer(g, g, [0, 1], [2, 3])
    _check_pairs_within(ok.block_pairs, "src", short, "peer")
    with pytest.raises(BlockIdError, match="tensor"):
        _check_pairs_within(plan.block_pairs, "src", spans[:2], "peer")  # fewer mapped tensors than pairs name
