// kv_copy.cu: one-launch copy of a list of two-level strided jobs (gather, scatter, block copy).
//
// Built at run time by kvxfer/ops/loader.py (NVRTC) and compile-checked by CI with nvcc.
// The host side (kvxfer/ops/jobs.py) turns a plan's jobs into KvJob records with absolute
// addresses and splits the byte stream into one contiguous share per warp (KvTask). A job moves
// `nbytes`: the source is runs of `src_run` bytes, `src_stride` apart; the destination is runs of
// `dst_run` bytes, `dst_stride` apart; bytes keep their order (the "stream" order).
//
// Why this shape:
//  * Per-warp shares are computed on the host, so no warp searches the job list; a warp's
//    record carries its first job, so its first loads wait for one round trip, not two.
//  * Each job is copied in units of 2^unit bytes (unit = 4 gives 16-byte vectors), the widest
//    access that every address, run and stride of that job allows; any alignment is correct.
//  * A warp walks its share piece by piece (a piece is contiguous on both sides) with
//    warp-uniform bookkeeping: no division in the hot loop, few registers per lane.
//  * Loads of KVX_UNROLL units per lane are issued before their stores, so each lane keeps
//    several requests in flight; the next job's record is fetched while the current one copies.
//  * No host synchronisation, no allocation: a launch can be captured in a CUDA graph.

typedef long long i64;
typedef unsigned long long u64;

#ifndef KVX_THREADS
#define KVX_THREADS 256
#endif
#ifndef KVX_MIN_BLOCKS
#define KVX_MIN_BLOCKS 2
#endif
#ifndef KVX_UNROLL
#define KVX_UNROLL 8
#endif
#ifndef KVX_STREAMING
#define KVX_STREAMING 0  // __ldcs/__stcs measured 1-3% slower on H100 (bench/results)
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

// Layout must match DEVICE_TASK_DTYPE in kvxfer/ops/jobs.py (96 bytes): one per warp. The warp
// copies from (job, off) up to (end_job, end_off); `first` is a copy of jobs[job], so that the
// warp's first copy waits for one memory round trip, not two. Offsets are multiples of the
// job's access width.
struct KvTask {
    i64 job;
    i64 off;
    i64 end_job;
    i64 end_off;
    KvJob first;
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

// Copy `n` units from `src` to `dst` (both contiguous) with one warp: lane-interleaved, so each
// of the KVX_UNROLL accesses per lane is one coalesced warp access; all loads before stores.
template <typename U>
__device__ __forceinline__ void kvx_copy_piece(const char* src, char* dst, int n, int lane) {
    const U* s = (const U*)src;
    U* d = (U*)dst;
    for (int i = lane; i < n; i += 32 * KVX_UNROLL) {
        U v[KVX_UNROLL];
#pragma unroll
        for (int k = 0; k < KVX_UNROLL; ++k) {
            if (i + 32 * k < n) v[k] = kvx_load(s + i + 32 * k);
        }
#pragma unroll
        for (int k = 0; k < KVX_UNROLL; ++k) {
            if (i + 32 * k < n) kvx_store(d + i + 32 * k, v[k]);
        }
    }
}

// Copy bytes [lo, hi) of `job` with one warp, in units of U (lo, hi multiples of sizeof(U)).
// The span is walked piece by piece, a piece being contiguous on both sides; all bookkeeping is
// warp-uniform, and the only divisions place `lo` at the start.
template <typename U>
__device__ __forceinline__ void kvx_copy_span(const KvJob& job, i64 lo, i64 hi, int lane) {
    i64 sq, sr, dq, dr;
    kvx_divmod(lo, job.src_run, sq, sr);
    kvx_divmod(lo, job.dst_run, dq, dr);
    const char* sp = (const char*)job.src + sq * job.src_stride + sr;
    char* dp = (char*)job.dst + dq * job.dst_stride + dr;
    i64 s_left = job.src_run - sr;
    i64 d_left = job.dst_run - dr;
    for (i64 pos = lo; pos < hi;) {
        // at most 1 GiB per piece keeps the per-lane index in 32 bits
        const i64 n = min(min(min(s_left, d_left), hi - pos), (i64)1 << 30);
        kvx_copy_piece<U>(sp, dp, (int)(n / (i64)sizeof(U)), lane);
        pos += n;
        sp += n;
        dp += n;
        s_left -= n;
        d_left -= n;
        if (s_left == 0) {
            sp += job.src_stride - job.src_run;
            s_left = job.src_run;
        }
        if (d_left == 0) {
            dp += job.dst_stride - job.dst_run;
            d_left = job.dst_run;
        }
    }
}

// A job record is spread over the warp: lane i holds field i % 8, so the record being
// prefetched costs each lane one register pair instead of eight. kvx_job() gathers it back.
__device__ __forceinline__ i64 kvx_job_field(const KvJob* job_ptr, int lane) {
    return __ldg((const i64*)job_ptr + (lane & 7));
}

__device__ __forceinline__ KvJob kvx_job(i64 f) {
    KvJob job;
    job.src = (u64)__shfl_sync(0xffffffffu, f, 0);
    job.dst = (u64)__shfl_sync(0xffffffffu, f, 1);
    job.nbytes = __shfl_sync(0xffffffffu, f, 2);
    job.src_run = __shfl_sync(0xffffffffu, f, 3);
    job.src_stride = __shfl_sync(0xffffffffu, f, 4);
    job.dst_run = __shfl_sync(0xffffffffu, f, 5);
    job.dst_stride = __shfl_sync(0xffffffffu, f, 6);
    job.unit = __shfl_sync(0xffffffffu, f, 7);
    return job;
}

// Each warp is an independent worker over its own share of the stream (no block-wide sync),
// so a warp that finishes a job starts the next while its neighbours are still copying.
extern "C" __global__ void __launch_bounds__(KVX_THREADS, KVX_MIN_BLOCKS)
kv_copy_jobs(const KvTask* __restrict__ tasks, const KvJob* __restrict__ jobs, i64 ntasks) {
    const i64 w = (i64)blockIdx.x * (KVX_THREADS / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (w >= ntasks) return;
    const KvTask* t = tasks + w;
    const ulonglong2 head0 = __ldg((const ulonglong2*)t), head1 = __ldg((const ulonglong2*)t + 1);
    i64 j = (i64)head0.x;
    i64 lo = (i64)head0.y;
    const i64 end_job = (i64)head1.x;
    const i64 end_off = (i64)head1.y;
    if (j > end_job || (j == end_job && lo >= end_off)) return;  // warp-uniform
    i64 field = kvx_job_field(&t->first, lane);
    for (;;) {
        const KvJob cur = kvx_job(field);
        const i64 hi = (j == end_job) ? end_off : cur.nbytes;
        const bool more = (j + 1 < end_job) || (j + 1 == end_job && end_off > 0);
        if (more) field = kvx_job_field(jobs + j + 1, lane);  // in flight while `cur` copies
        switch (cur.unit) {
            case 4: kvx_copy_span<uint4>(cur, lo, hi, lane); break;
            case 3: kvx_copy_span<u64>(cur, lo, hi, lane); break;
            case 2: kvx_copy_span<unsigned int>(cur, lo, hi, lane); break;
            case 1: kvx_copy_span<unsigned short>(cur, lo, hi, lane); break;
            default: kvx_copy_span<unsigned char>(cur, lo, hi, lane); break;
        }
        if (!more) break;
        ++j;
        lo = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// kv_copy_pairs: copy blocks between two layouts of the same segment structure, computing every
// address on the GPU from block ids. The host uploads only the (tensor, segment) pairs and the
// block-id runs, so the host cost of a transfer does not grow with layers x blocks.
//
// An item is (pair p, row m, run k): nblk[k] * run bytes from
//   pair.src + sblk[k] * src_bstride + m * src_stride   to   pair.dst + dblk[k] * dst_bstride + m * dst_stride,
// or, for the side that is a contiguous buffer (gather / scatter), at the item's stream offset.
// Pairs whose blocks are not back to back use runs of one block (the `single` arrays).
// ---------------------------------------------------------------------------------------------
struct KvPair {
    u64 src;          // source tensor base + segment offset
    u64 dst;          // destination tensor base + segment offset
    i64 src_bstride;  // bytes between consecutive blocks
    i64 dst_bstride;
    i64 run;          // bytes of one block in one row (same on both sides)
    i64 count;        // rows
    i64 src_stride;   // bytes between rows
    i64 dst_stride;
    i64 coal;         // 1: items are the coalesced runs; 0: single blocks
    i64 item0;        // index of this pair's first item
    i64 unit;         // log2 of the access width valid for every item of the pair
    i64 pad;
};

template <typename U>
__device__ __forceinline__ void kvx_copy_unit(const char* s, char* d, i64 n, int lane) {
    kvx_copy_piece<U>(s, d, (int)(n / (i64)sizeof(U)), lane);
}

// Where a launch's records live, and how they are read: uploaded to global memory (read-only
// path, __ldg), or passed inline in the kernel's parameter space (kv_copy_pairs_inline; plain
// loads through the __grid_constant__ parameter's generic address).
struct KvxGlobal {
    template <typename T>
    static __device__ __forceinline__ T ld(const T* p) { return __ldg(p); }
};
struct KvxParam {
    template <typename T>
    static __device__ __forceinline__ T ld(const T* p) { return *p; }
};

// Run tables: KVX_RUN_FIELDS arrays of `n` entries each. For run k:
//   [0] source block id, [1] destination block id, [2] blocks in the run,
//   [3] blocks of the pair's stream before this run's parent run, [4] blocks in the parent run,
//   [5] blocks of the parent run before this run (a parent run is cut into bounded items).
// Fields 3-5 place the run in the transfer's stream (plan.py): job (pair, parent run) holds
// `count` rows of nblk * run bytes, so row m of run k starts at
//   pair stream base + run * (count * field3 + m * field4 + field5).
#define KVX_RUN_FIELDS 6

// Which side of a kv_copy_pairs launch is a contiguous buffer in stream order (KvPair.src or
// .dst then holds the buffer address of the pair's first stream byte).
#define KVX_BUF_NONE 0
#define KVX_BUF_SRC 1
#define KVX_BUF_DST 2

// Coalesced runs first, then single blocks; `n` runs per table.
struct KvRun {
    i64 sblk, dblk, nblk, bpre, plen, within;
};

// A run table as kvx_pairs reads it: `n` runs, run k from `at(k)`.
template <typename L>
struct KvxRuns64 {  // the KVX_RUN_FIELDS int64 arrays above
    const i64* runs;
    i64 n;
    __device__ __forceinline__ KvRun at(i64 k) const {
        KvRun r;
        r.sblk = L::ld(&runs[k]);
        r.dblk = L::ld(&runs[n + k]);
        r.nblk = L::ld(&runs[2 * n + k]);
        r.bpre = L::ld(&runs[3 * n + k]);
        r.plen = L::ld(&runs[4 * n + k]);
        r.within = L::ld(&runs[5 * n + k]);
        return r;
    }
};

// Every run one block (kv_copy_pairs_ids): only the block ids, int32, are stored; run k is
// block k of the transfer, so it sits at block k of each pair's stream. A buffer side's ids
// are never read (its address is the stream offset): `s` or `d` may then alias the other.
template <typename L>
struct KvxIds32 {
    const int* s;
    const int* d;
    i64 n;
    __device__ __forceinline__ KvRun at(i64 k) const {
        KvRun r;
        r.sblk = L::ld(&s[k]);
        r.dblk = L::ld(&d[k]);
        r.nblk = 1;
        r.bpre = k;
        r.plen = 1;
        r.within = 0;
        return r;
    }
};

// Where part `part` of item (pair p, run r, row m) lies: source, destination, bytes.
struct KvSpan {
    const char* s;
    char* d;
    i64 len;
};

template <typename L>
__device__ __forceinline__ KvSpan kvx_span(const KvPair* p, const KvRun& r, i64 m, i64 part, int split_shift,
                                           int buf_side) {
    const i64 run = L::ld(&p->run);
    KvSpan sp;
    sp.len = (r.nblk * run) >> split_shift;
    const i64 boff = (L::ld(&p->count) * r.bpre + m * r.plen + r.within) * run;  // in the stream
    const i64 soff = buf_side == KVX_BUF_SRC ? boff : r.sblk * L::ld(&p->src_bstride) + m * L::ld(&p->src_stride);
    const i64 doff = buf_side == KVX_BUF_DST ? boff : r.dblk * L::ld(&p->dst_bstride) + m * L::ld(&p->dst_stride);
    sp.s = (const char*)L::ld(&p->src) + soff + part * sp.len;
    sp.d = (char*)L::ld(&p->dst) + doff + part * sp.len;
    return sp;
}

// The last pair whose first item is <= item (pairs without items share item0 with the next).
template <typename L>
__device__ __forceinline__ const KvPair* kvx_pair_of(const KvPair* pairs, i64 npairs, i64 item) {
    i64 lo = 0, hi = npairs - 1;
    while (lo < hi) {
        const i64 mid = (lo + hi + 1) >> 1;
        if (L::ld(&pairs[mid].item0) <= item) lo = mid; else hi = mid - 1;
    }
    return pairs + lo;
}

// (run k, row m) of the pair-local item `local` in the launch's numbering.
__device__ __forceinline__ void kvx_item_km(i64 local, i64 count, i64 nr, int rows_inner, i64& k, i64& m) {
    if (rows_inner) {  // items numbered (pair, run, row): the stream's own order
        kvx_divmod(local, count, k, m);
    } else {  // (pair, row, run): a warp walks one row of many blocks
        kvx_divmod(local, nr, m, k);
    }
}

// A launch may cover only some consecutive pairs of a plan (a piece of a pipelined transfer):
// `pairs` then points at the first of them and `item_base` is its item0 (item0 stays numbered
// over the whole plan, so the run tables are shared by every piece).
// Each item is cut into 2^split_shift equal parts (the host picks split_shift > 0 only when a
// transfer has fewer items than warps, and only where every part stays a multiple of the
// pair's access width). Warp w copies the parts [w * per, (w + 1) * per) in order: it locates
// its first part once (binary search over item0), then steps (part, row, block run, pair)
// incrementally, loading the next item's run while the current item copies. `rows_inner`
// picks the numbering: (pair, run, row) follows the stream (K then V of a block, for a gather
// or scatter), (pair, row, run) walks one row across blocks (measured faster over NVLink). Pair fields are
// re-read per item through the read-only cache (a few L1 hits per item of KiBs) instead of
// being held in registers, which keeps the copy loop free of spills.
template <typename L, typename T>
__device__ __forceinline__ void kvx_pairs(const KvPair* __restrict__ pairs, i64 npairs, const T coal_runs,
                                          const T single_runs, i64 nitems, int split_shift, int buf_side,
                                          i64 item_base, int rows_inner, int uniform) {
    const i64 nwarps = (i64)gridDim.x * (KVX_THREADS / 32);
    const i64 w = (i64)blockIdx.x * (KVX_THREADS / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    const i64 total = nitems << split_shift;
    const i64 per = (total + nwarps - 1) / nwarps;
    i64 pos = w * per;
    const i64 end = min(pos + per, total);
    if (pos >= end) return;  // warp-uniform
    const i64 nparts = (i64)1 << split_shift;
    const i64 first_item = (pos >> split_shift) + item_base;  // item0 of pairs[0] when launching a piece
    i64 part = pos & (nparts - 1);
    // every pair holding `uniform` items (> 0): the pair is a division away, no search
    const KvPair* p = uniform > 0 ? pairs + first_item / uniform : kvx_pair_of<L>(pairs, npairs, first_item);
    bool coal = L::ld(&p->coal) != 0;
    T runs = coal ? coal_runs : single_runs;  // a pointer or two and a count: registers
    i64 nr = runs.n;
    i64 k, m;
    kvx_item_km(first_item - L::ld(&p->item0), L::ld(&p->count), nr, rows_inner, k, m);
    KvRun r = runs.at(k);
    for (;;) {
        const KvSpan sp = kvx_span<L>(p, r, m, part, split_shift, buf_side);
        const int unit = (int)L::ld(&p->unit);
        // where the next part is, and its run (loaded now, used after this copy)
        const bool more = pos + 1 < end;
        i64 npart = part + 1, nk = k, nm = m;
        bool next_pair = false;
        KvRun nxt = r;
        if (more && npart == nparts) {
            npart = 0;
            const i64 cnt = L::ld(&p->count);
            if (rows_inner) {
                if (++nm == cnt) {
                    nm = 0;
                    if (++nk == nr) {
                        nk = 0;
                        next_pair = true;
                    }
                }
            } else if (++nk == nr) {
                nk = 0;
                if (++nm == cnt) {
                    nm = 0;
                    next_pair = true;
                }
            }
            if (!next_pair && nk != k) nxt = runs.at(nk);
        }
        switch (unit) {
            case 4: kvx_copy_unit<uint4>(sp.s, sp.d, sp.len, lane); break;
            case 3: kvx_copy_unit<u64>(sp.s, sp.d, sp.len, lane); break;
            case 2: kvx_copy_unit<unsigned int>(sp.s, sp.d, sp.len, lane); break;
            case 1: kvx_copy_unit<unsigned short>(sp.s, sp.d, sp.len, lane); break;
            default: kvx_copy_unit<unsigned char>(sp.s, sp.d, sp.len, lane); break;
        }
        if (!more) break;
        ++pos;
        part = npart;
        k = nk;
        m = nm;
        if (next_pair) {
            do {  // pairs without items (no runs of their kind) are skipped
                ++p;
                runs = L::ld(&p->coal) != 0 ? coal_runs : single_runs;
                nr = runs.n;
            } while (nr == 0);
            nxt = runs.at(0);
        }
        r = nxt;
    }
}

extern "C" __global__ void __launch_bounds__(KVX_THREADS, KVX_MIN_BLOCKS)
kv_copy_pairs(const KvPair* __restrict__ pairs, i64 npairs, const i64* __restrict__ coal_runs, i64 ncoal,
              const i64* __restrict__ single_runs, i64 nsingle, i64 nitems, int split_shift, int buf_side,
              i64 item_base, int rows_inner) {
    kvx_pairs<KvxGlobal>(pairs, npairs, KvxRuns64<KvxGlobal>{coal_runs, ncoal},
                         KvxRuns64<KvxGlobal>{single_runs, nsingle}, nitems, split_shift, buf_side, item_base,
                         rows_inner, 0);
}

// ---------------------------------------------------------------------------------------------
// kv_copy_pairs_inline: the same copy with its records in the kernel's parameters (a small
// transfer: a few pairs and runs). Nothing is uploaded before the launch (no staging copy, no
// device buffer), the launch is capturable in a CUDA graph as is, and the warps' first record
// reads hit the constant bank instead of waiting on global memory.
// Layout must match INLINE_DTYPE in kvxfer/ops/kernels.py; the whole struct stays within the
// 4 KiB of parameters every CUDA version accepts.
// ---------------------------------------------------------------------------------------------
#define KVX_INLINE_WORDS 500

struct KvInline {
    i64 npairs, ncoal, nsingle, nitems;
    i64 coal_off, single_off;  // word offsets of the two run tables in `w` (pairs start at 0)
    int split_shift, buf_side;
    int rows_inner;
    int uniform;  // items per pair when every pair holds the same number, else 0
    i64 w[KVX_INLINE_WORDS];  // pair records (12 words each), then the run tables
};

extern "C" __global__ void __launch_bounds__(KVX_THREADS, KVX_MIN_BLOCKS)
kv_copy_pairs_inline(const __grid_constant__ KvInline in) {
    kvx_pairs<KvxParam>((const KvPair*)in.w, in.npairs, KvxRuns64<KvxParam>{in.w + in.coal_off, in.ncoal},
                        KvxRuns64<KvxParam>{in.w + in.single_off, in.nsingle}, in.nitems, in.split_shift,
                        in.buf_side, 0, in.rows_inner, in.uniform);
}

// ---------------------------------------------------------------------------------------------
// kv_copy_pairs_ids: a pipelined gather or scatter (one piece of consecutive pairs per launch)
// with everything in the kernel's parameters: the pair records and the block ids as int32,
// every run one block (the stream places block k of a pair at k * count * run: the coalesced
// form's stream where every run is one block, or where the coalesced pairs have one row;
// the host checks, kvxfer.ops.pairs.ids_params_fit). Up to
// 32 KiB of parameters (CUDA 12.1 and later, compute capability 7.0 and later): a 32-layer
// K/V cache's 64 pairs take 6 KiB, leaving room for ~6,400 block ids. Nothing is uploaded
// and nothing is allocated per transfer; piece i is the same struct with its own
// `item_base` and `nitems`, the pairs array staying whole (item0 numbers the plan's items).
// Layout must match IDS_DTYPE in kvxfer/ops/kernels.py.
// ---------------------------------------------------------------------------------------------
#ifndef KVX_IDS_WORDS
#define KVX_IDS_WORDS 4080
#endif

struct KvIds {
    i64 npairs, nblocks, nitems, item_base;
    i64 sids_off, dids_off;  // int32 offsets of the source and destination ids in `w`
    int split_shift, buf_side;
    int rows_inner;
    int uniform;
    i64 w[KVX_IDS_WORDS];  // pair records (12 words each), then the ids
};

extern "C" __global__ void __launch_bounds__(KVX_THREADS, KVX_MIN_BLOCKS)
kv_copy_pairs_ids(const __grid_constant__ KvIds in) {
    const int* ids = (const int*)in.w;
    const KvxIds32<KvxParam> runs{ids + in.sids_off, ids + in.dids_off, in.nblocks};
    kvx_pairs<KvxParam>((const KvPair*)in.w, in.npairs, runs, runs, in.nitems, in.split_shift, in.buf_side,
                        in.item_base, in.rows_inner, in.uniform);
}
