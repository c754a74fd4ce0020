"""The vectorized host gather/scatter lands exactly the numpy reference's bytes."""

import numpy as np
import pytest

from kvxfer import KVLayout, plan_transfer
from kvxfer._memory import host_bytes
from kvxfer.ops import host, reference
from kvpeers import KINDS, LayoutSpec


def _views(layout):
    return [host_bytes(int(a), t.span) for a, t in zip(layout.addrs, layout.geometry.tensors)]


def _id_lists(rng, n_src, n_dst):
    yield [3], [7]
    yield rng.choice(n_src, 20, replace=False), rng.choice(n_dst, 20, replace=False)
    # consecutive on both sides (coalesced runs of several lengths) mixed with random ids
    s = np.concatenate([np.arange(2, 9), [20], np.arange(30, 33), rng.choice(np.arange(40, n_src), 5, replace=False)])
    d = np.concatenate([np.arange(10, 17), [1], np.arange(50, 53), rng.choice(np.arange(60, n_dst), 5, replace=False)])
    yield s, d
    yield [], []


@pytest.mark.parametrize("kind", KINDS)
def test_gather_and_scatter_match_the_reference(kind):
    rng = np.random.default_rng(2)
    st, bd = LayoutSpec(kind, 64, layers=3, block_size=8, heads=4, head_dim=16).build(1)
    ls = KVLayout.from_tensors(st, block_dim=bd)
    for s, d in _id_lists(rng, 64, 80):
        dt_ref, _ = LayoutSpec(kind, 80, layers=3, block_size=8, heads=4, head_dim=16).build(2)
        dt_out, _ = LayoutSpec(kind, 80, layers=3, block_size=8, heads=4, head_dim=16).build(2)
        lr, lo = KVLayout.from_tensors(dt_ref, block_dim=bd), KVLayout.from_tensors(dt_out, block_dim=bd)
        for layers in (None, np.array([0, 2])):
            plan = plan_transfer(ls.geometry, lr.geometry, s, d, layers)
            want = reference.gather(plan, _views(ls))
            got = np.full(plan.nbytes + 16, 0xAB, dtype=np.uint8)
            host.gather(plan, _views(ls), got)
            assert np.array_equal(got[: plan.nbytes], want) and (got[plan.nbytes:] == 0xAB).all()
            reference.scatter(plan, want, _views(lr))
            host.scatter(plan, want, _views(lo))
            assert all(np.array_equal(a, b) for a, b in zip(_views(lr), _views(lo)))


def test_a_view_too_short_falls_back_to_the_checked_reference():
    st, bd = LayoutSpec("kv_first", 16, layers=1).build(1)
    lay = KVLayout.from_tensors(st, block_dim=bd)
    plan = plan_transfer(lay.geometry, lay.geometry, [15], [0])
    short = [v[:-1] for v in _views(lay)]  # one byte short of block 15
    with pytest.raises(ValueError):
        host.gather(plan, short)  # the reference's slicing notices
