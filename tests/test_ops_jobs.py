"""Device job records and per-CTA shares (kvxfer.ops.jobs), checked on CPU.

A small Python emulation of csrc/kv_copy.cu (same per-warp task walk, same piece-by-piece
bookkeeping) copies within one host arena, so the rules the kernel relies on are tested without
a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvxfer.errors import LayoutError
from kvxfer.ops import reference
from kvxfer.ops.jobs import DEVICE_JOB_DTYPE, as_plan, device_jobs, gather_jobs, partition, scatter_jobs, tasks
from kvxfer.plan import JOB_DTYPE


def _copy_span(arena, job, lo, hi):
    """kvx_copy_span: walk [lo, hi) piece by piece (contiguous on both sides)."""
    u = 1 << int(job["unit"])
    srun, sstr, drun, dstr = (int(job[k]) for k in ("src_run", "src_stride", "dst_run", "dst_stride"))
    sq, sr = divmod(lo, srun)
    dq, dr = divmod(lo, drun)
    sp, dp = int(job["src"]) + sq * sstr + sr, int(job["dst"]) + dq * dstr + dr
    s_left, d_left = srun - sr, drun - dr
    pos = lo
    while pos < hi:
        n = min(s_left, d_left, hi - pos, 1 << 30)
        assert n % u == 0
        arena[dp : dp + n] = arena[sp : sp + n]
        pos, sp, dp, s_left, d_left = pos + n, sp + n, dp + n, s_left - n, d_left - n
        if s_left == 0:
            sp, s_left = sp + sstr - srun, srun
        if d_left == 0:
            dp, d_left = dp + dstr - drun, drun


def emulate(arena: np.ndarray, djobs: np.ndarray, task_table: np.ndarray) -> None:
    """What kv_copy_jobs does per warp, with addresses as offsets into ``arena``."""
    for t in task_table:
        j, lo, ej, eo = (int(t[k]) for k in ("job", "off", "end_job", "end_off"))
        if j > ej or (j == ej and lo >= eo):
            continue
        cur = t["first"]
        while True:
            hi = eo if j == ej else int(cur["nbytes"])
            more = j + 1 < ej or (j + 1 == ej and eo > 0)
            u = 1 << int(cur["unit"])
            assert lo % u == 0 and hi % u == 0
            _copy_span(arena, cur, lo, hi)
            if not more:
                break
            j, lo = j + 1, 0
            cur = djobs[j]


def _random_jobs(rng, n, max_run=40, align=1):
    jobs = np.zeros(n, dtype=JOB_DTYPE)
    src_pos, dst_pos = 0, 0
    for i in range(n):
        run = int(rng.integers(1, max_run)) * align
        count = int(rng.integers(1, 5))
        gap = int(rng.integers(0, 3)) * align
        jobs[i]["src_run"], jobs[i]["src_count"], jobs[i]["src_stride"] = run, count, run + gap
        jobs[i]["src_off"] = src_pos
        src_pos += count * (run + gap) + align
        # destination: same bytes cut differently (one run, or per-element runs when divisible)
        total = run * count
        if count > 1 and rng.random() < 0.5:
            jobs[i]["dst_run"], jobs[i]["dst_count"], jobs[i]["dst_stride"] = run, count, run + align
        else:
            jobs[i]["dst_run"], jobs[i]["dst_count"], jobs[i]["dst_stride"] = total, 1, 0
        jobs[i]["dst_off"] = dst_pos
        dst_pos += int(jobs[i]["dst_count"]) * (int(jobs[i]["dst_run"]) + align) + align
    return jobs, src_pos, dst_pos


@pytest.mark.parametrize("align,base_shift", [(1, 3), (2, 2), (16, 0), (16, 8), (4, 0)])
@pytest.mark.parametrize("ctas", [1, 3, 17])
def test_emulated_kernel_matches_reference(align, base_shift, ctas):
    rng = np.random.default_rng(align * 100 + ctas)
    jobs, src_n, dst_n = _random_jobs(rng, 12, align=align)
    src_base, dst_base = 64 + base_shift, 64 + src_n + 128
    arena = np.zeros(dst_base + dst_n + 64, dtype=np.uint8)
    arena[src_base : src_base + src_n] = rng.integers(0, 256, src_n, dtype=np.uint8)
    want = arena.copy()
    plan = as_plan(jobs)
    reference.copy_blocks(plan, [want[src_base:]], [want[dst_base:]])
    dj = device_jobs(jobs, [src_base], [dst_base])
    emulate(arena, dj, tasks(dj, partition(dj, ctas)))
    np.testing.assert_array_equal(arena, want)


def test_units_follow_the_least_aligned_field():
    jobs = np.zeros(4, dtype=JOB_DTYPE)
    jobs["src_run"] = jobs["dst_run"] = [32, 32, 6, 16]
    jobs["src_count"] = jobs["dst_count"] = [2, 1, 1, 1]
    jobs["src_stride"] = [64, 3, 0, 0]  # job 1: stride ignored (one run)
    jobs["dst_stride"] = [32, 0, 0, 0]
    jobs["src_off"] = [0, 16, 0, 1]
    dj = device_jobs(jobs, [4096], [8192])
    assert dj.dtype == DEVICE_JOB_DTYPE
    assert dj["unit"].tolist() == [4, 4, 1, 0]
    assert dj["src"].tolist() == [4096, 4112, 4096, 4097]
    assert dj["nbytes"].tolist() == [64, 32, 6, 16]


def test_partition_covers_the_stream_in_order():
    rng = np.random.default_rng(1)
    jobs, _, _ = _random_jobs(rng, 50, align=16)
    dj = device_jobs(jobs, [0], [1 << 30])
    for ctas in (1, 2, 7, 64, 1000):
        sp = partition(dj, ctas)
        assert sp.size == ctas + 1
        assert (sp[0]["job"], sp[0]["off"]) == (0, 0) and (sp[-1]["job"], sp[-1]["off"]) == (dj.size, 0)
        key = sp["job"] * (1 << 40) + sp["off"]
        assert (np.diff(key) >= 0).all()
        assert (sp["off"][:-1] % (1 << dj["unit"][np.minimum(sp["job"][:-1], dj.size - 1)]) == 0).all()


def test_gather_and_scatter_jobs_use_stream_offsets():
    jobs = np.zeros(2, dtype=JOB_DTYPE)
    jobs["src_t"] = [1, 0]
    jobs["src_run"], jobs["src_count"], jobs["src_stride"] = [8, 4], [2, 3], [16, 4]
    jobs["dst_run"], jobs["dst_count"] = [16, 12], [1, 1]
    plan = as_plan(jobs)
    g = gather_jobs(plan)
    assert g["dst_off"].tolist() == [0, 16] and g["dst_run"].tolist() == [16, 12] and (g["dst_t"] == 0).all()
    s = scatter_jobs(plan)
    assert s["src_off"].tolist() == [0, 16] and (s["src_count"] == 1).all()


def test_malformed_jobs_are_refused():
    jobs = np.zeros(1, dtype=JOB_DTYPE)
    jobs["src_run"], jobs["src_count"], jobs["dst_run"], jobs["dst_count"] = 8, 2, 8, 1
    with pytest.raises(LayoutError, match="both sides"):
        device_jobs(jobs, [0], [0])
    jobs["dst_count"] = 2
    jobs["dst_t"] = 3
    with pytest.raises(LayoutError, match="destination tensor"):
        device_jobs(jobs, [0], [0])
    with pytest.raises(LayoutError):
        device_jobs(np.zeros(2, dtype=np.int64), [0], [0])
