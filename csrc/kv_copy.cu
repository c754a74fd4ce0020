// kv_copy.cu: one-launch copy of a list of two-level strided jobs (gather, scatter, block copy).
//
// Built at run time by kvxfer/ops/_loader.py (NVRTC) and compile-checked by CI with nvcc.
// The host side (kvxfer/ops/jobs.py) turns a plan's jobs into KvJob records with absolute
// addresses and splits the byte stream into one contiguous share per CTA (KvSpan). A job moves
// `nbytes`: the source is runs of `src_run` bytes, `src_stride` apart; the destination is runs of
// `dst_run` bytes, `dst_stride` apart; bytes keep their order (the "stream" order).
//
// Why this shape:
//  * Per-CTA shares are computed on the host, so no CTA searches the job list.
//  * Each job is copied in units of 2^unit bytes (unit = 4 gives 16-byte vectors), the widest
//    access that every address, run and stride of that job allows; any alignment is correct.
//  * Threads step through a job with a fixed stride; the run/offset bookkeeping advances by
//    precomputed quotient and remainder, so the hot loop holds no division.
//  * Loads of UNROLL units are issued before their stores, so each thread keeps several
//    memory requests in flight; the next job's record is fetched while the current one copies.
//  * No host synchronisation, no allocation: a launch can be captured in a CUDA graph.

typedef long long i64;
typedef unsigned long long u64;

#ifndef KVX_THREADS
#define KVX_THREADS 256
#endif
#ifndef KVX_MIN_BLOCKS
#define KVX_MIN_BLOCKS 3
#endif
#ifndef KVX_UNROLL
#define KVX_UNROLL 4
#endif
#ifndef KVX_STREAMING
#define KVX_STREAMING 0
#endif

// Layout must match DEVICE_JOB_DTYPE in kvxfer/ops/jobs.py (64 bytes).
struct KvJob {
    u64 src;         // absolute address of the first source byte
    u64 dst;         // absolute address of the first destination byte
    i64 nbytes;      // bytes moved by the job (> 0)
    i64 src_run;     // bytes per contiguous source run
    i64 src_stride;  // bytes between source runs
    i64 dst_run;
    i64 dst_stride;
    i64 unit;        // log2 of the access width in bytes, 0..4
};

// Layout must match the span table in kvxfer/ops/jobs.py: CTA b copies from (job, off) of
// entry b up to (job, off) of entry b + 1; offsets are multiples of that job's access width.
struct KvSpan {
    i64 job;
    i64 off;
};

template <typename T>
__device__ __forceinline__ T kvx_load(const T* p) {
#if KVX_STREAMING
    return __ldcs(p);
#else
    return *p;
#endif
}

template <typename T>
__device__ __forceinline__ void kvx_store(T* p, const T& v) {
#if KVX_STREAMING
    __stcs(p, v);
#else
    *p = v;
#endif
}

// q = a / b, r = a % b for a >= 0, b > 0, choosing the cheapest exact form.
__device__ __forceinline__ void kvx_divmod(i64 a, i64 b, i64& q, i64& r) {
    if ((b & (b - 1)) == 0) {
        const int s = __ffsll(b) - 1;
        q = a >> s;
        r = a & (b - 1);
    } else if (((u64)a | (u64)b) < (1ull << 32)) {
        const unsigned int ua = (unsigned int)a, ub = (unsigned int)b;
        const unsigned int uq = ua / ub;
        q = uq;
        r = ua - uq * ub;
    } else {
        q = a / b;
        r = a - q * b;
    }
}

// One side of a job: where the current thread's unit lives, and how to step.
template <typename U>
struct KvxCursor {
    char* ptr;  // byte address of the thread's current unit
    i64 in;     // units into the current run
    i64 run;    // units per run
    i64 adv;    // bytes to add per step (whole runs skipped plus the remainder)
    i64 rem;    // units added to `in` per step
    i64 wrap;   // extra bytes to add when `in` passes the end of a run

    __device__ __forceinline__ void init(u64 base, i64 run_bytes, i64 stride_bytes, i64 pos, i64 step) {
        run = run_bytes / (i64)sizeof(U);
        i64 q, r;
        kvx_divmod(pos, run, q, r);
        ptr = (char*)base + q * stride_bytes + r * (i64)sizeof(U);
        in = r;
        i64 sq, sr;
        kvx_divmod(step, run, sq, sr);
        adv = sq * stride_bytes + sr * (i64)sizeof(U);
        rem = sr;
        wrap = stride_bytes - run_bytes;
    }

    __device__ __forceinline__ void step() {
        ptr += adv;
        in += rem;
        if (in >= run) {
            in -= run;
            ptr += wrap;
        }
    }
};

// Copy bytes [lo, hi) of `job` with the whole CTA, in units of U (lo, hi multiples of sizeof(U)).
template <typename U>
__device__ __forceinline__ void kvx_copy_span(const KvJob& job, i64 lo, i64 hi) {
    const i64 end = hi / (i64)sizeof(U);
    i64 p = lo / (i64)sizeof(U) + threadIdx.x;
    if (p >= end) return;
    const i64 step = blockDim.x;
    KvxCursor<U> s, d;
    s.init(job.src, job.src_run, job.src_stride, p, step);
    d.init(job.dst, job.dst_run, job.dst_stride, p, step);
    while (p < end) {
        U v[KVX_UNROLL];
        const U* sp[KVX_UNROLL];
        U* dp[KVX_UNROLL];
#pragma unroll
        for (int k = 0; k < KVX_UNROLL; ++k) {
            sp[k] = (const U*)s.ptr;
            dp[k] = (U*)d.ptr;
            s.step();
            d.step();
        }
#pragma unroll
        for (int k = 0; k < KVX_UNROLL; ++k) {
            if (p + k * step < end) v[k] = kvx_load(sp[k]);
        }
#pragma unroll
        for (int k = 0; k < KVX_UNROLL; ++k) {
            if (p + k * step < end) kvx_store(dp[k], v[k]);
        }
        p += KVX_UNROLL * step;
    }
}

__device__ __forceinline__ KvJob kvx_load_job(const KvJob* jobs, i64 j) {
    const ulonglong2* p = (const ulonglong2*)(jobs + j);
    const ulonglong2 a = __ldg(p), b = __ldg(p + 1), c = __ldg(p + 2), e = __ldg(p + 3);
    KvJob job;
    job.src = a.x;
    job.dst = a.y;
    job.nbytes = (i64)b.x;
    job.src_run = (i64)b.y;
    job.src_stride = (i64)c.x;
    job.dst_run = (i64)c.y;
    job.dst_stride = (i64)e.x;
    job.unit = (i64)e.y;
    return job;
}

extern "C" __global__ void __launch_bounds__(KVX_THREADS, KVX_MIN_BLOCKS)
kv_copy_jobs(const KvSpan* __restrict__ spans, const KvJob* __restrict__ jobs) {
    const KvSpan a = spans[blockIdx.x];
    const KvSpan b = spans[blockIdx.x + 1];
    i64 j = a.job;
    i64 lo = a.off;
    if (j > b.job || (j == b.job && lo >= b.off)) return;
    KvJob cur = kvx_load_job(jobs, j);
    for (;;) {
        const i64 hi = (j == b.job) ? b.off : cur.nbytes;
        const bool more = (j + 1 < b.job) || (j + 1 == b.job && b.off > 0);
        KvJob nxt;
        if (more) nxt = kvx_load_job(jobs, j + 1);  // in flight while `cur` copies
        switch (cur.unit) {
            case 4: kvx_copy_span<uint4>(cur, lo, hi); break;
            case 3: kvx_copy_span<u64>(cur, lo, hi); break;
            case 2: kvx_copy_span<unsigned int>(cur, lo, hi); break;
            case 1: kvx_copy_span<unsigned short>(cur, lo, hi); break;
            default: kvx_copy_span<unsigned char>(cur, lo, hi); break;
        }
        if (!more) break;
        cur = nxt;
        ++j;
        lo = 0;
    }
}
