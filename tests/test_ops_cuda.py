"""CUDA gather / scatter / block copy against the numpy reference (GPU only).

Fresh random bytes in, poisoned bytes out, whole tensors compared (so a stray write fails too).
Covers the standard workloads of BENCHMARKS.md, odd element sizes and alignments, 1 and 0
blocks, head slicing, NHD <-> HND, cupy arrays on an explicit stream, CUDA graph capture, and
the kernel loader's disk cache and compile errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvxfer.errors import KernelCompileError
from kvxfer.layout import KVLayout
from kvxfer.ops import reference
from kvxfer.ops.workloads import STANDARD
from kvxfer.plan import plan_transfer
from kvxfer.reshard import BlockFormat, HeadOrder, plan_reshard

try:
    import torch

    _CUDA = torch.cuda.is_available()
    _WHY = "torch sees no CUDA device"
except ImportError:
    torch = None
    _CUDA, _WHY = False, "torch is not installed"
try:
    import cupy
except ImportError:
    cupy = None
    _CUDA, _WHY = False, "cupy is not installed (needed for NVRTC and launches)"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason=f"GPU tests skipped: {_WHY}")]

if _CUDA:
    from kvxfer.ops import cuda as ops
    from kvxfer.ops import loader
    from kvxfer.ops.runtime import device_runtime

POISON = 0xA5


def _rand(shape, dtype) -> "torch.Tensor":
    t = torch.empty(shape, dtype=dtype, device="cuda")
    t.view(torch.uint8).random_(0, 256)
    return t


def _poisoned_like(t: "torch.Tensor") -> "torch.Tensor":
    d = torch.empty_like(t)
    d.view(torch.uint8).fill_(POISON)
    return d


def _host(t: "torch.Tensor") -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).cpu().numpy()


def _check_gather_scatter_copy(src: list, block_dim: int, sb, db, *, copy: bool = True) -> None:
    layout = KVLayout.from_tensors(src, block_dim=block_dim)
    dst = [_poisoned_like(t) for t in src]
    dlayout = KVLayout.from_tensors(dst, block_dim=block_dim)
    plan = plan_transfer(layout.geometry, dlayout.geometry, sb, db)
    host_src = [_host(t) for t in src]

    out = torch.full((max(plan.nbytes, 1),), POISON, dtype=torch.uint8, device="cuda")
    ops.gather(plan, layout, out)
    want = np.full(max(plan.nbytes, 1), POISON, dtype=np.uint8)
    reference.gather(plan, host_src, want)
    _same(out.cpu().numpy(), want, "gather output")

    buf = _rand((max(plan.nbytes, 1),), torch.uint8)
    ops.scatter(plan, buf, dlayout)
    want_dst = [np.full(h.size, POISON, dtype=np.uint8) for h in host_src]
    reference.scatter(plan, buf.cpu().numpy(), want_dst)
    for i, (d, w) in enumerate(zip(dst, want_dst)):
        _same(_host(d), w, f"scatter, tensor {i}")

    if copy:
        for d in dst:
            d.view(torch.uint8).fill_(POISON)
        ops.copy_blocks(plan, layout, dlayout)
        want_dst = [np.full(h.size, POISON, dtype=np.uint8) for h in host_src]
        reference.copy_blocks(plan, host_src, want_dst)
        for i, (d, w) in enumerate(zip(dst, want_dst)):
            _same(_host(d), w, f"block copy, tensor {i}")


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.array_equal(got, want):  # fast path; the detailed report only on failure
        bad = np.flatnonzero(got != want)
        raise AssertionError(f"{what}: {bad.size} bytes differ, first at {bad[:8].tolist()}")


# cheapest first; the 1 GiB workloads last
@pytest.mark.parametrize("wl", sorted(STANDARD, key=lambda w: w.nbytes), ids=lambda w: w.name)
def test_standard_workloads(wl):
    src = [_rand(wl.shape, torch.bfloat16) for _ in range(wl.layers)]
    sb, db = wl.block_ids()
    _check_gather_scatter_copy(src, wl.block_dim, sb, db, copy=wl.name == "small")
    del src
    torch.cuda.empty_cache()


ODD = {
    # name: (shape, dtype, layers, blocks moved)
    "fp8-105B-runs": ((2, 40, 5, 3, 7), "fp8", 3, 17),
    "bf16-210B-runs": ((2, 40, 5, 3, 7), torch.bfloat16 if torch else None, 3, 17),
    "fp32-24B-runs": ((2, 40, 3, 1, 2), torch.float32 if torch else None, 2, 40),
    "one-block": ((2, 64, 16, 8, 128), torch.bfloat16 if torch else None, 4, 1),
    "zero-blocks": ((2, 64, 16, 8, 128), torch.bfloat16 if torch else None, 2, 0),
}


@pytest.mark.parametrize("name", list(ODD))
def test_odd_shapes(name):
    shape, dtype, layers, moved = ODD[name]
    if dtype == "fp8":
        dtype = getattr(torch, "float8_e4m3fn", torch.uint8)
    src = [_rand(shape, dtype) for _ in range(layers)]
    rng = np.random.default_rng(9)
    sb = rng.permutation(shape[1])[:moved]
    db = rng.permutation(shape[1])[:moved]
    _check_gather_scatter_copy(src, 1, sb, db)


def test_misaligned_base_and_coalesced_runs():
    """Tensors starting at odd addresses; consecutive blocks that coalesce into long jobs."""
    shape = (2, 48, 16, 2, 64)
    n = int(np.prod(shape))
    bigs = [_rand((n + 64,), torch.uint8) for _ in range(3)]
    src = [b[3 : 3 + n].view(shape) for b in bigs]
    sb = np.arange(5, 37)
    db = np.arange(10, 42)
    _check_gather_scatter_copy(src, 1, sb, db)


def test_zero_jobs_launch_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a launch was attempted for zero jobs")

    monkeypatch.setattr(ops, "_launch", boom)
    src = [_rand((2, 8, 4, 2, 8), torch.bfloat16)]
    layout = KVLayout.from_tensors(src, block_dim=1)
    plan = plan_transfer(layout.geometry, layout.geometry, [], [])
    out = torch.full((16,), POISON, dtype=torch.uint8, device="cuda")
    ops.gather(plan, layout, out)
    ops.scatter(plan, out, layout)
    assert ops.prepare_gather(plan, layout, out).nbytes == 0
    assert (out.cpu().numpy() == POISON).all()


@pytest.mark.parametrize("src_order", [HeadOrder.NHD, HeadOrder.HND])
@pytest.mark.parametrize("dst_order", [HeadOrder.NHD, HeadOrder.HND])
@pytest.mark.parametrize("heads", [None, (4, 8), (1, 2)])
def test_head_slice_and_permute(src_order, dst_order, heads):
    BS, H, D, nb, layers = 16, 8, 128, 64, 3
    h0, h1 = heads or (0, H)

    def shape(order, h):
        return (2, nb, BS, h, D) if order is HeadOrder.NHD else (2, nb, h, BS, D)

    src = [_rand(shape(src_order, H), torch.bfloat16) for _ in range(layers)]
    dst = [_poisoned_like(torch.empty(shape(dst_order, h1 - h0), dtype=torch.bfloat16, device="cuda"))
           for _ in range(layers)]
    sl, dl = KVLayout.from_tensors(src, block_dim=1), KVLayout.from_tensors(dst, block_dim=1)
    rng = np.random.default_rng(4)
    sb, db = rng.permutation(nb)[:20], rng.permutation(nb)[:20]
    plan = plan_reshard(sl.geometry, BlockFormat(src_order, BS, H, D, 2), dl.geometry,
                        BlockFormat(dst_order, BS, h1 - h0, D, 2), sb, db, src_heads=heads)
    host_src = [_host(t) for t in src]
    ops.copy_blocks(plan, sl, dl)
    want = [np.full(_host(d).size, POISON, dtype=np.uint8) for d in dst]
    reference.copy_blocks(plan, host_src, want)
    for d, w in zip(dst, want):
        np.testing.assert_array_equal(_host(d), w)
    # the same plan through a buffer (what TCP does): gather on one side, scatter on the other
    for d in dst:
        d.view(torch.uint8).fill_(POISON)
    buf = torch.empty(plan.nbytes, dtype=torch.uint8, device="cuda")
    ops.gather(plan, sl, buf)
    ops.scatter(plan, buf, dl)
    for d, w in zip(dst, want):
        np.testing.assert_array_equal(_host(d), w)


def test_cupy_arrays_on_an_explicit_stream():
    rng = np.random.default_rng(2)
    src = [cupy.asarray(rng.integers(0, 256, size=(2, 32, 16, 4, 64), dtype=np.uint8)) for _ in range(3)]
    layout = KVLayout.from_tensors(src, block_dim=1)
    plan = plan_transfer(layout.geometry, layout.geometry, [3, 9, 1], [0, 2, 4])
    out = cupy.full(plan.nbytes, POISON, dtype=cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()  # inputs were written on the null stream
    ops.gather(plan, [int(a.data.ptr) for a in src], int(out.data.ptr), stream=stream, device=0)
    stream.synchronize()
    want = reference.gather(plan, [cupy.asnumpy(a).reshape(-1) for a in src])
    np.testing.assert_array_equal(cupy.asnumpy(out), want)


def test_cuda_graph_capture_and_replay():
    src = [_rand((2, 64, 16, 8, 128), torch.bfloat16) for _ in range(4)]
    layout = KVLayout.from_tensors(src, block_dim=1)
    sb, db = np.arange(0, 64, 3), np.arange(22)
    plan = plan_transfer(layout.geometry, layout.geometry, sb, db)
    out = torch.empty(plan.nbytes, dtype=torch.uint8, device="cuda")
    prepared = ops.prepare_gather(plan, layout, out)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        prepared.launch(side)  # warm-up outside capture
        with torch.cuda.graph(graph, stream=side):
            prepared.launch(torch.cuda.current_stream())
    torch.cuda.synchronize()
    out.fill_(POISON)
    for t in src:  # fresh data: the replay must read it, not a captured copy
        t.view(torch.uint8).random_(0, 256)
    graph.replay()
    torch.cuda.synchronize()
    want = reference.gather(plan, [_host(t) for t in src])
    np.testing.assert_array_equal(out.cpu().numpy(), want)
    prepared.close()
    prepared.close()


def test_loader_caches_cubins_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("KVXFER_CACHE_DIR", str(tmp_path))
    rt = device_runtime(0)
    rt.clear_kernels()
    try:
        fn = rt.kernel(ops.KERNEL)
        assert fn is rt.kernel(ops.KERNEL)  # memoized per device
        cached = list(tmp_path.glob("kv_copy-*"))
        assert any(p.suffix in (".cubin", ".ptx") for p in cached), cached
        rt.clear_kernels()

        def no_compile(*a, **k):
            raise AssertionError("recompiled although the cubin was cached")

        monkeypatch.setattr(loader, "compile_cubin", no_compile)
        assert rt.kernel(ops.KERNEL) is not fn  # loaded again, from the disk cache
    finally:
        rt.clear_kernels()


def test_compile_errors_carry_the_log():
    with pytest.raises(KernelCompileError, match="undefined_thing"):
        loader.compile_cubin('extern "C" __global__ void k() { undefined_thing(); }', "bad.cu",
                              ops.KERNEL.options("sm_80"))
