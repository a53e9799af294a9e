// 2:4 GEMM for prompts (32-8192 tokens) on Hopper: wgmma.mma_async.sp (sm_90a only; kernels/wgmma.py compiles
// it with NVRTC for sm_90a and offers it only on compute capability 9.0). y (M, N) = x (M, K) @ W.T with W
// stored 2:4 (kernels/sparse24.py): values (N, K/2), the two kept weights of each group of 4 inputs in column
// order; meta (N, K/8) bytes, read as (N, K/16) little-endian 16-bit words, group q of a word at bits 4q
// (first position | second << 2). Both are read as stored: no copy, no derived metadata table.
//
// The weight is the sparse A operand (output features on M), the activations the B operand (tokens on N).
// A block of two warpgroups (256 threads) owns BM = 128 MW features x BN tokens; warpgroup wg multiplies its MW
// 64-feature tiles (features 64 MW wg ..) by all BN tokens, one m64nBNk32 instruction per tile and 32 inputs. K
// runs in stages of 64 inputs, a ring of STAGES shared-memory slots filled by cp.async (all 256 threads copy; no
// producer warp):
//
//   slot = | A: BM rows x 64 B (32 kept values) | E: BM rows x 8 B (4 position words) | B: BN rows x 128 B |
//
// A is laid out as the K-major 64-byte-swizzle canonical layout of the PTX ISA ("Shared Memory Matrix Layout" of the
// asynchronous warpgroup-level MMA section; CUTLASS's Layout_K_SW64): row r at byte 64r, its 16-byte chunk c at chunk
// c ^ ((r >> 1) & 3), atoms of 8 rows (512 B); B as the 128-byte-swizzle one (Layout_K_SW128): token row r at
// byte 128r, chunk c at c ^ (r & 7), atoms of 8 rows (1024 B). Slots start on 1024-byte boundaries, so the
// descriptors' base offset is 0. Descriptors ("Matrix Descriptor Format"): start address >> 4
// in bits 0-13, leading byte offset >> 4 in 16-29 (unused by swizzled K-major layouts; 1), stride byte offset
// >> 4 in 32-45 (the distance between 8-row groups: 512 for A, 1024 for B), swizzle mode in 62-63 (1 = 128 B,
// 2 = 64 B). The second 32-input step of a stage starts 32 bytes (A: 16 kept values) and 64 bytes (B) further.
//
// Metadata ("Matrix fragments for warpgroup-level multiply-accumulate operation with sparse matrix A",
// 9.7.15.6.2; its figure for m64nNk32 f16/bf16 is the one of mma.sp m16n8k32): warp w of a warpgroup gives rows
// 16w..16w+15 of the instruction's 64; lane (g = lane / 4, t = lane % 4) holds in bits 0-15 the positions of
// row 16w+g and in bits 16-31 those of row 16w+g+8, for 16 inputs: inputs 0-15 (t = 0) and 16-31 (t = 1) of the
// instruction under sparsity selector 0, lanes t = 2, 3 under selector 1. So with the first 32 inputs of a stage
// under selector 0 and the next 32 under selector 1, lane t's register is stored position word t of the stage
// for the two rows, as they are: the register the mma.sp GEMM of sparse_gemv.cu builds (verified on GPUs).
//
// Stages of 128 inputs (KS = 128: half the barriers and cp.async waits per K, four wgmma a tile between them): a
// slot is | A: BM rows x 128 B (64 kept values) | E: BM rows x 16 B (8 position words) | B: 2 parts of BN rows x
// 128 B |, A in the 128-byte-swizzle layout (chunk c of row r at c ^ (r & 7), stride byte offset 1024, swizzle mode
// 1), B part h holding inputs 64h..64h+63 of each token as the 64-input B part. Half h of the stage is a 64-input
// stage's two steps: A from byte 64h of the rows (then 32 bytes on), B from part h, and lane t's register is
// position word 4h + t of the stage for its two rows.
//
// Pipelining, per stage kb: wait for the stage's cp.async group, fence.proxy.async.shared::cta (cp.async writes made
// visible to the async proxy, the tensor cores' reads, by each copying thread), barrier, the stage's metadata
// registers, wgmma.fence, 2 MW wgmma.mma_async.sp, commit; then, by INFLIGHT (the wgmma groups left running):
//
// - 0 (m128_n128_s4, the configuration checked on an H100): the copy of stage kb + STAGES - 1 into the slot of
//   stage kb - 1, whose products finished at the last wait, then wgmma.wait_group 0. The tensor cores idle while
//   each stage's products drain, and the next stage's barrier and metadata loads wait for them.
// - 1: wgmma.wait_group 1 (stage kb - 1's products finished, kb's still running), then the copy of stage
//   kb + STAGES - 2 into the slot of stage kb - 2. Not kb - 1: a thread past stage kb's barrier knows that every
//   thread of the block finished its iteration kb - 1, whose wait_group 1 retired stage kb - 2 in both warpgroups,
//   but the other warpgroup's wgmma of stage kb - 1 may still be reading its slot (that warpgroup retires it in its
//   own iteration kb, which this barrier does not order). So copies run STAGES - 2 stages ahead (STAGES >= 3).
//
// The metadata register with a group in flight: the PTX ISA restricts only the accumulator and A-fragment
// registers of a wgmma not yet waited for, but four configurations that left one stage in flight multiplied wrongly
// on an H100 (relative error 0.11-0.57), and nvcc 13.0's SASS of them shows the likely cause: the one HGMMA
// instruction of the loop reads one physical register every trip, and the next stage's metadata was written into
// it while the previous stage's HGMMA was pending, so the tensor cores evidently read the metadata register after
// issue. (CUTLASS's sm90 sparse mainloop keeps no MMA in flight: K_PIPE_MMAS = 0.) With INFLIGHT 1 the loop body is
// therefore unrolled twice (two HGMMA instructions, each reading its own register), and each stage's metadata
// registers are kept alive (keep_alive) until the wait that retires their group, so the two stages' registers are
// live together and ptxas must keep them apart. tests/test_wgmma.py checks the SASS of every entry point: no
// metadata register is written between an HGMMA and the wait that retires it (only a GPU run shows the products
// right). The descriptors need no such care: ptxas itself moves them into uniform registers and rewrites those
// between the two HGMMAs of one group (nvcc 13.0's SASS of m128_n128_s4, which multiplied correctly on an H100), so
// they are read at issue.
//
// Rows past N and tokens past M load clamped (valid) rows and are never stored.
#include "common.cuh"

__device__ __forceinline__ void wg_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ u32 lds_u16(u32 addr) {
    u32 v;
    asm volatile("ld.shared.u16 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}
// Keeps the compiler from moving accumulator reads or writes across a wgmma wait (the registers are written
// by the tensor cores asynchronously, which the compiler cannot see).
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Keeps register r allocated, its value intact, up to this point. ptxas, not the C++ front end, assigns physical
// registers, from the uses it sees in PTX, and deletes instructions that have no side effect and whose result is
// unused: an empty asm statement leaves no use in PTX, and a register-to-itself mov is deleted (both checked in
// the SASS of nvcc 13.0). A shared-memory store of r predicated on K < 0 is a use ptxas keeps, and it never
// stores (K is a positive multiple of 64): one predicated-off instruction.
__device__ __forceinline__ void keep_alive(u32 r, int K, u32 addr) {
    asm volatile("{\n\t.reg .pred never;\n\tsetp.lt.s32 never, %1, 0;\n\t@never st.shared.b32 [%2], %0;\n\t}"
                 ::"r"(r), "r"(K), "r"(addr)
                 : "memory");
}
// A shared-memory matrix descriptor (K-major, swizzled): start address, leading byte offset 1 (unused),
// stride byte offset, swizzle mode (1 = 128 B, 2 = 64 B).
__device__ __forceinline__ unsigned long long wg_desc(u32 addr, u32 stride, unsigned long long mode) {
    return (unsigned long long)((addr & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(stride >> 4) << 32) |
           (mode << 62);
}

// ---- wgmma.mma_async.sp wrappers: D (64 x N, fp32) += A (64 x 32, 2:4, from shared memory by descriptor) x
// B (32 x N, K-major in shared memory), sparsity selector SEL; one macro per width holds the long operand list for
// both input types, built from the same accumulator lists ----
#define WG_ACC8(o)                                                                                           \
    "+f"(d[(o)]), "+f"(d[(o) + 1]), "+f"(d[(o) + 2]), "+f"(d[(o) + 3]), "+f"(d[(o) + 4]), "+f"(d[(o) + 5]),  \
        "+f"(d[(o) + 6]), "+f"(d[(o) + 7])
#define WG_ACC64(o)                                                                                          \
    WG_ACC8(o), WG_ACC8((o) + 8), WG_ACC8((o) + 16), WG_ACC8((o) + 24), WG_ACC8((o) + 32), WG_ACC8((o) + 40), \
        WG_ACC8((o) + 48), WG_ACC8((o) + 56)
#define WG_OPERANDS_0_63                                                                                     \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                                  \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                        \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                        \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_OPERANDS_64_127                                                                                   \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"                        \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"                        \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"            \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define WGMMA_SP_N128(TY)                                                                                    \
    asm volatile("wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." TY "." TY " {" WG_OPERANDS_0_63 "}, "     \
                 "%64, %65, %66, %67, 1, 1, 1, 0, 0;"                                                        \
                 : WG_ACC64(0)                                                                               \
                 : "l"(da), "l"(db), "r"(e), "n"(SEL))
#define WGMMA_SP_N256(TY)                                                                                    \
    asm volatile("wgmma.mma_async.sp.sync.aligned.m64n256k32.f32." TY "." TY " {" WG_OPERANDS_0_63 ","        \
                 WG_OPERANDS_64_127 "}, %128, %129, %130, %131, 1, 1, 1, 0, 0;"                              \
                 : WG_ACC64(0), WG_ACC64(64)                                                                 \
                 : "l"(da), "l"(db), "r"(e), "n"(SEL))
template <int SEL>
__device__ __forceinline__ void wgmma_sp_n128_f16(float (&d)[64], unsigned long long da, unsigned long long db, u32 e) {
    WGMMA_SP_N128("f16");
}
template <int SEL>
__device__ __forceinline__ void wgmma_sp_n128_bf16(float (&d)[64], unsigned long long da, unsigned long long db, u32 e) {
    WGMMA_SP_N128("bf16");
}
template <int SEL>
__device__ __forceinline__ void wgmma_sp_n256_f16(float (&d)[128], unsigned long long da, unsigned long long db,
                                                  u32 e) {
    WGMMA_SP_N256("f16");
}
template <int SEL>
__device__ __forceinline__ void wgmma_sp_n256_bf16(float (&d)[128], unsigned long long da, unsigned long long db,
                                                   u32 e) {
    WGMMA_SP_N256("bf16");
}
#undef WGMMA_SP_N128
#undef WGMMA_SP_N256
#undef WG_OPERANDS_0_63
#undef WG_OPERANDS_64_127
#undef WG_ACC64
#undef WG_ACC8

// ---- the kernel ----
template <bool BF16, int BN>
__device__ __forceinline__ void wgmma_pair(float (&d)[BN / 2], unsigned long long da, unsigned long long db, u32 e) {
    // 32 inputs under selector 0, the next 32 under selector 1: A 32 bytes (16 kept values) on, B 64 bytes on.
    static_assert(BN == 128 || BN == 256, "only the m64n128k32 and m64n256k32 wrappers are written");
    if constexpr (BN == 256) {
        if constexpr (BF16) { wgmma_sp_n256_bf16<0>(d, da, db, e); wgmma_sp_n256_bf16<1>(d, da + 2, db + 4, e); }
        else { wgmma_sp_n256_f16<0>(d, da, db, e); wgmma_sp_n256_f16<1>(d, da + 2, db + 4, e); }
    } else if constexpr (BF16) { wgmma_sp_n128_bf16<0>(d, da, db, e); wgmma_sp_n128_bf16<1>(d, da + 2, db + 4, e); }
    else { wgmma_sp_n128_f16<0>(d, da, db, e); wgmma_sp_n128_f16<1>(d, da + 2, db + 4, e); }
}

#define WG_THREADS 256

// MW 64-feature tiles per warpgroup (BM = 128 MW features a block), BN tokens, KS inputs a stage (64 or 128: KH =
// KS / 64 halves, each one metadata register and one wgmma pair a tile; the header gives both slot layouts), STAGES
// slots, INFLIGHT wgmma groups left running across a stage (0 or 1; the header says how the ring and the metadata
// registers follow), MINB blocks an SM (the entry point's __launch_bounds__: 2 caps ptxas at 128 registers a
// thread, so two blocks' 256 threads share the 64K-register file, and one block's barrier and metadata loads overlap
// the other's wgmma). Split K (splits > 1, for weights with few tiles): block b takes tile b % tiles and the K
// stages [KB s / splits, KB (s + 1) / splits) of split s = b / tiles, and stores its fp32 sums in ws[s] (splits x M
// x N), which the launcher sums by one reduction (deterministic) and rounds once.
template <bool BF16, int MW, int BN, int KS, int STAGES, int INFLIGHT, int MINB>
__device__ __forceinline__ void wgmma24(const u16* __restrict__ x, const u16* __restrict__ vals,
                                        const u8* __restrict__ meta, u16* __restrict__ y, float* __restrict__ ws,
                                        int M, int N, int K, int splits) {
    constexpr int BM = 128 * MW, KH = KS / 64, KS_LOG = 5 + KH;
    // rows: A KS bytes (KS / 2 kept values), E KS / 8 bytes; B KH parts of BN tokens x 128 bytes (64 inputs each)
    constexpr int A_ROW = KS, E_ROW = KS / 8, B_PART = BN * 128;
    constexpr int A_BYTES = BM * A_ROW, E_BYTES = BM * E_ROW, B_BYTES = KH * B_PART;
    constexpr int STAGE_BYTES = A_BYTES + E_BYTES + B_BYTES;  // a multiple of 1024
    constexpr unsigned long long A_SWIZZLE = KH == 1 ? 2ull : 1ull;  // descriptor modes: 64-byte, 128-byte swizzle
    static_assert(KS == 64 || KS == 128, "stages of 64 or 128 inputs");
    constexpr int AHEAD = STAGES - 1 - INFLIGHT;               // stages being copied while one is multiplied
    static_assert(INFLIGHT == 0 || INFLIGHT == 1, "at most one stage's products in flight");
    static_assert(AHEAD >= 1, "a ring of at least two slots, three with one stage in flight");
    static_assert(MW * BN <= 256, "accumulators: at most 128 registers a thread");
    static_assert(MINB == 1 || (MINB == 2 && MW * BN <= 128), "two blocks an SM: 64 accumulators of 128 registers");
    // Hopper: 228 KB of shared memory an SM, 1 KB of it reserved per block; the ring plus its alignment slack
    static_assert(MINB * (STAGES * STAGE_BYTES + 1024 + 1024) <= 228 * 1024, "the ring of MINB blocks fits an SM");
    extern __shared__ __align__(1024) unsigned char wg_smem[];
    const u32 base = (smem_u32(wg_smem) + 1023u) & ~1023u;  // the launch asks for 1024 bytes more
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp inside it (PTX: %warpid % 4 names its 16 rows)
    const int g = lane >> 2, t = lane & 3;
    // Blocks walk token tiles inside groups of 8 feature tiles, so the blocks in flight share weight tiles.
    const int ftiles = (N + BM - 1) / BM, ttiles = (M + BN - 1) / BN, tiles = ftiles * ttiles;
    const int split = blockIdx.x / tiles, pid = blockIdx.x % tiles, per_group = 8 * ttiles;
    const int first = (pid / per_group) * 8, size = min(8, ftiles - first);
    const int ft = first + (pid % per_group) % size, tt = (pid % per_group) / size;
    const int row0 = ft * BM, tok0 = tt * BN;
    const int kb0 = (int)((long long)(K >> KS_LOG) * split / splits);
    const int KB = (int)((long long)(K >> KS_LOG) * (split + 1) / splits) - kb0;  // this block's stages

    auto load = [&](int slot, int kb) {  // kb: the stage's index in K
        const u32 sa = base + slot * STAGE_BYTES, se = sa + A_BYTES, sb = se + E_BYTES;
#pragma unroll
        for (int i = tid; i < BM * 4 * KH; i += WG_THREADS) {  // values: 4 KH chunks of 16 bytes per row
            const int r = i >> (1 + KH), c = i & (4 * KH - 1);
            const size_t row = min(row0 + r, N - 1);
            // 64-byte swizzle for 64-input stages, 128-byte for 128, written out here: through a helper or a named
            // variable nvcc 13.0 assembled the 64-input kernels to other SASS than the kernel checked on an H100
            cp_async16(sa + r * A_ROW + ((KH == 1 ? c ^ ((r >> 1) & 3) : c ^ (r & 7)) << 4),
                       (const char*)vals + row * K + kb * KS + c * 16);
        }
#pragma unroll
        for (int i = tid; i < BM * KH; i += WG_THREADS) {  // positions: the stage's KS / 8 bytes of each row, by 8
            const int r = i >> (KH - 1), h = i & (KH - 1);
            const size_t row = min(row0 + r, N - 1);
            cp_async8(se + r * E_ROW + h * 8, meta + row * (K >> 3) + kb * E_ROW + h * 8);
        }
#pragma unroll
        for (int i = tid; i < BN * 8 * KH; i += WG_THREADS) {  // activations: 8 KH chunks of 16 bytes per token
            const int r = i >> (2 + KH), c = i & (8 * KH - 1);  // chunk c of part c >> 3
            const size_t tok = min(tok0 + r, M - 1);
            cp_async16(sb + (c >> 3) * B_PART + r * 128 + (((c & 7) ^ (r & 7)) << 4),
                       (const char*)x + tok * K * 2 + kb * (2 * KS) + c * 16);
        }
    };

    float d[MW][BN / 2];
#pragma unroll
    for (int mt = 0; mt < MW; ++mt) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) d[mt][i] = 0.f;
        fence_regs(d[mt]);
    }

#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
        if (s < KB) load(s, kb0 + s);
        wg_cp_commit();
    }
    u32 e_prev[MW][KH];  // INFLIGHT 1: the metadata registers of the stage whose products may still be in flight
#pragma unroll
    for (int mt = 0; mt < MW; ++mt) {
#pragma unroll
        for (int h = 0; h < KH; ++h) e_prev[mt][h] = 0u;
    }
    // INFLIGHT 1: two copies of the body, so two HGMMA instructions, each reading its own metadata register. One
    // instruction in a loop reads one physical register every trip, so the next stage's metadata would be written
    // into the register the stage in flight reads: in nvcc 13.0's SASS of a loop not unrolled, keep_alive kept the
    // value, but ptxas moved it to another register and wrote the next stage's metadata into the HGMMA's.
#pragma unroll(INFLIGHT + 1)
    for (int kb = 0; kb < KB; ++kb) {
        wg_cp_wait<AHEAD - 1>();
        fence_proxy_async();
        __syncthreads();
        const int slot = kb % STAGES;
        const u32 sa = base + slot * STAGE_BYTES, se = sa + A_BYTES, sb = se + E_BYTES;
        const unsigned long long db = wg_desc(sb, 1024, 1ull);
        u32 e[MW][KH];
#pragma unroll
        for (int mt = 0; mt < MW; ++mt) {
            // This lane's metadata rows (PTX: row 16w + g of the 64 in bits 0-15, row 16w + g + 8 in 16-31); half h:
            // position word 4h + t of the row.
            const int er = (wg * MW + mt) * 64 + wq * 16 + g;
#pragma unroll
            for (int h = 0; h < KH; ++h)
                e[mt][h] = lds_u16(se + er * E_ROW + h * 8 + t * 2) |
                           (lds_u16(se + (er + 8) * E_ROW + h * 8 + t * 2) << 16);
        }
        wgmma_fence();
#pragma unroll
        for (int mt = 0; mt < MW; ++mt) {
            const unsigned long long da = wg_desc(sa + (wg * MW + mt) * (64 * A_ROW), 8 * A_ROW, A_SWIZZLE);
#pragma unroll
            for (int h = 0; h < KH; ++h)  // half h: A 64 bytes (32 kept values) on, B the next part
                wgmma_pair<BF16, BN>(d[mt], da + h * 4, db + h * (B_PART >> 4), e[mt][h]);
        }
        wgmma_commit();
        if constexpr (INFLIGHT == 1) {
            wgmma_wait<1>();  // stage kb - 1's products are finished, stage kb's still in flight
#pragma unroll
            for (int mt = 0; mt < MW; ++mt) {
#pragma unroll
                for (int h = 0; h < KH; ++h) {
                    keep_alive(e_prev[mt][h], K, base);  // read by stage kb - 1's wgmma until the wait above
                    e_prev[mt][h] = e[mt][h];
                }
            }
        }
        {  // refill the slot of stage kb - 1 - INFLIGHT, which no wgmma reads any more (the header says why)
            const int next = kb + AHEAD;
            if (next < KB) load(next % STAGES, kb0 + next);
            wg_cp_commit();
        }
        if constexpr (INFLIGHT == 0) wgmma_wait<0>();
    }
    wgmma_wait<0>();  // INFLIGHT 1: the last stage's products; INFLIGHT 0: none pending, kept (the SASS checked on
                      // an H100)
    if constexpr (INFLIGHT == 1) {
#pragma unroll
        for (int mt = 0; mt < MW; ++mt) {
#pragma unroll
            for (int h = 0; h < KH; ++h) keep_alive(e_prev[mt][h], K, base);
        }
    }
#pragma unroll
    for (int mt = 0; mt < MW; ++mt) fence_regs(d[mt]);
    wg_cp_wait<0>();
    // d[mt][i]: feature 16w + g + 8 * ((i >> 1) & 1) of 64-feature tile mt of the warpgroup, token
    // 8 * (i >> 2) + 2t + (i & 1) of the block.
#pragma unroll
    for (int mt = 0; mt < MW; ++mt) {
        const int fbase = row0 + (wg * MW + mt) * 64 + wq * 16 + g;
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) {
            const int row = fbase + 8 * ((i >> 1) & 1), token = tok0 + 8 * (i >> 2) + 2 * t + (i & 1);
            if (row < N && token < M) {
                if (splits == 1) y[(size_t)token * N + row] = pack1<BF16>(d[mt][i]);
                else ws[((size_t)split * M + token) * N + row] = d[mt][i];
            }
        }
    }
}

// ---- entry points: wgmma24_<dtype>_<configuration name of kernels/wgmma.py's CONFIGS> ----
#define WGMMA24(DT, BF, MW, BN, KS, S, F, B, NAME)                                                           \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, B)                                              \
        wgmma24_##DT##_##NAME(const u16* x, const u16* vals, const u8* meta, u16* y, float* ws, int M, int N,\
                              int K, int splits) {                                                          \
        wgmma24<BF, MW, BN, KS, S, F, B>(x, vals, meta, y, ws, M, N, K, splits);                             \
    }
#define WG_ALL(DT, BF)                                                                                       \
    WGMMA24(DT, BF, 1, 128, 64, 4, 0, 1, m128_n128_s4)                                                       \
    WGMMA24(DT, BF, 1, 128, 64, 5, 1, 1, m128_n128_s5_f1)                                                    \
    WGMMA24(DT, BF, 1, 256, 64, 4, 1, 1, m128_n256_s4_f1)                                                    \
    WGMMA24(DT, BF, 2, 128, 64, 4, 1, 1, m256_n128_s4_f1)                                                    \
    WGMMA24(DT, BF, 1, 128, 64, 4, 1, 2, m128_n128_s4_f1)                                                    \
    WGMMA24(DT, BF, 1, 128, 128, 4, 0, 1, m128_n128_s4_sk128)
WG_ALL(f16, false)
WG_ALL(bf16, true)
