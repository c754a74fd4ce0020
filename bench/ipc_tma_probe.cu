// ipc_tma_probe.cu: peer copies of paged blocks through the Hopper bulk-copy (TMA) engine.
//
// Probe for bench/ipc_tma_probe.py (sm_90). Each CTA is one issuer (lane 0 of its one warp):
// it walks its share of the transfer's chunks through a ring of KVX_STAGES shared-memory slots,
// `cp.async.bulk` global -> shared (completion on the slot's mbarrier), then shared -> global
// (bulk groups). KVX_LEAD loads are in flight ahead of the stores; a slot is reloaded once the
// store that read it has finished reading (wait_group.read). Pieces are given as absolute source
// and destination addresses (either may be a peer GPU's memory); a piece is cut into chunks of
// `chunk` bytes (16-byte aligned, a divisor of the piece).

typedef unsigned long long u64;
typedef long long i64;

#ifndef KVX_STAGES
#define KVX_STAGES 4
#endif
#ifndef KVX_LEAD
#define KVX_LEAD 2
#endif

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}

__device__ __forceinline__ void mbar_init(u64* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(u64* bar, unsigned parity) {
    unsigned done = 0;
    while (!done) {
        asm volatile(
            "{\n .reg .pred p;\n"
            " mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            " selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    }
}

__device__ __forceinline__ void bulk_load(void* smem, const void* gsrc, unsigned bytes, u64* bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_addr(smem)), "l"(gsrc), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

__device__ __forceinline__ void bulk_store(void* gdst, const void* smem, unsigned bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                 ::"l"(gdst), "r"(smem_addr(smem)), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

extern "C" __global__ void __launch_bounds__(32)
tma_copy(const u64* __restrict__ src, const u64* __restrict__ dst, i64 npieces, int piece_bytes, int chunk) {
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ __align__(8) u64 bars[KVX_STAGES];
    if (threadIdx.x != 0) return;
    const i64 per_piece = piece_bytes / chunk;
    const i64 total = npieces * per_piece;
    const i64 per = (total + gridDim.x - 1) / gridDim.x;
    const i64 lo = (i64)blockIdx.x * per;
    const i64 n = min(lo + per, total) - lo;
    if (n <= 0) return;
    for (int s = 0; s < KVX_STAGES; ++s) mbar_init(&bars[s]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    for (i64 i = 0; i < n + KVX_LEAD; ++i) {
        const i64 j = i - KVX_LEAD;
        if (j >= 0) {  // chunk j has been loaded into its slot: store it
            const int slot = (int)(j % KVX_STAGES);
            mbar_wait(&bars[slot], (unsigned)((j / KVX_STAGES) & 1));
            const i64 c = lo + j;
            bulk_store((char*)dst[c / per_piece] + (c % per_piece) * chunk, ring + (i64)slot * chunk, chunk);
        }
        if (i < n) {  // load chunk i once the store that last read its slot is done reading
            const int slot = (int)(i % KVX_STAGES);
            if (i >= KVX_STAGES) asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(KVX_STAGES - KVX_LEAD) : "memory");
            const i64 c = lo + i;
            bulk_load(ring + (i64)slot * chunk, (const char*)src[c / per_piece] + (c % per_piece) * chunk, chunk,
                      &bars[slot]);
        }
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
