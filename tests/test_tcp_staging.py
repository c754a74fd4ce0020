"""The shared staging module on host memory: stream views, packing, the size-class pool."""

from __future__ import annotations

import numpy as np

from kvxfer import KVLayout, plan_transfer
from kvxfer.backends.staging import Buffer, HostStreamSide, Packer, SizePool, chunk_bounds, size_class


def _layouts():
    rng = np.random.default_rng(5)
    src = [rng.integers(0, 255, (2, 16, 64), dtype=np.uint8) for _ in range(3)]
    dst = [np.zeros((2, 16, 64), np.uint8) for _ in range(3)]
    return src, dst, KVLayout.from_tensors(src, block_dim=1), KVLayout.from_tensors(dst, block_dim=1)


def test_packer_gathers_and_scatters_pieces_of_a_plan_on_the_host():
    src, dst, ls, ld = _layouts()
    plan = plan_transfer(ls.geometry, ld.geometry, [3, 9, 4], [0, 15, 7])
    arr = np.zeros(plan.nbytes, np.uint8)
    buf = Buffer(arr, int(arr.ctypes.data), arr.nbytes)
    bounds = plan.chunk_bounds(plan.nbytes // 3)
    staged = list(Packer(ls).pieces(plan, buf, bounds, gather=True).gather_staged())
    assert staged[0][0] == 0 and staged[-1][1] == plan.nbytes
    unpack = Packer(ld).pieces(plan, buf, bounds, gather=False)
    for i in range(len(bounds)):
        unpack.launch(i)
    for s, d in zip(src, dst):
        assert np.array_equal(d[:, [0, 15, 7]], s[:, [3, 9, 4]])
        untouched = np.setdiff1d(np.arange(16), [0, 15, 7])
        assert not d[:, untouched].any()


def test_host_stream_side_views_the_source_blocks_in_stream_order():
    src, _, ls, ld = _layouts()
    plan = plan_transfer(ls.geometry, ld.geometry, [2, 5], [1, 0])
    side = HostStreamSide(plan, "src", ls.addrs)
    arr = np.zeros(plan.nbytes, np.uint8)
    Packer(ls).gather(plan, Buffer(arr, int(arr.ctypes.data), arr.nbytes))
    bounds = chunk_bounds(side, 100, 4)
    assert bounds[0] == 0 and bounds[-1] == plan.nbytes and np.all(np.diff(bounds) <= 100)
    got = bytearray()
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        for addr, n in side.iov(a, b).tolist():
            got += (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * n).from_address(addr))).tobytes()
    assert bytes(got) == arr.tobytes()


def test_size_pool_reuses_by_size_class_keeps_at_most_keep_and_holds_until_close():
    made, freed = [], []

    def make(size):
        b = Buffer(None, len(made), size)
        made.append(b)
        return b

    pool = SizePool(make, freed.append, keep=1)
    assert size_class(1) == 4096 and size_class(4097) == 8192
    a, b = pool.get(5000), pool.get(5000)
    assert a.nbytes == b.nbytes == 8192 and a is not b
    pool.put(a)
    pool.put(b)
    assert freed == [b]  # one kept
    assert pool.get(6000) is a and pool.get(100).nbytes == 4096
    pool.hold(a)
    assert pool.held == (a,) and a not in freed
    pool.close()
    assert a in freed and pool.held == ()
