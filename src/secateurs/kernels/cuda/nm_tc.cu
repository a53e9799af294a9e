// N:M on tensor cores for 5-64 tokens (4:8 and 8:16, kernels/nm48.py and kernels/nm816.py): "load as sparse, compute
// as dense". y (M, N) = x (M, K) @ W.T with W read in its stored layout (values plus position tables), expanded in
// registers into a dense shared-memory tile, then multiplied by dense mma.sync.m16n8k16 (fp16 or bf16 in, fp32
// accumulate). At 8-64 tokens the expand path (the whole weight written to a dense scratch, then cuBLAS) moves about
// three times the dense bytes, and the CUDA-core GEMVs are instruction-bound past 4 tokens; here the stored bytes are
// read once and the decode is paid once per weight, whatever the token count. Compiled at run time by NVRTC
// (kernels/cuda_ops.py) as a module of its own; correct on an H100 (468 checks against float64), offered beside
// the expand path at 5-64 tokens and chosen by the dispatcher's timing (kernels/nm.py).
//
// The work split, tiles, fragments and split-K are tc_tile.cuh's engine (shared with bitmap_tc.cu); this file is the
// N:M unit it loads and stores: per (feature row, 16-input chunk) one 16-byte load of the chunk's eight stored values
// and its positions (the format's F::load), decoded by F::expand into the chunk's 16 dense halves and written as the
// two 16-byte chunks of its tile row.
//
// The ring entry points (tcr48_*, tcr816_*; checked on an H100; depth 4 opt-in) run the units through tc_tile.cuh's
// tc_gemm_ring: D stages of units in registers, each stage's loads issued D - 1 stages before its decode. Why: on an
// H100 the 4:8 block linears of a batch-8 decode read 1.22 TB/s with tc_gemm; in its sm_90 SASS at 16 tokens each
// stored-byte load is first read 34-131 instructions after it is issued (the stage's 8 MMAs between), and one stage
// (64 rows x 64 inputs, 4,864 stored bytes) is in flight per block, with ~3 blocks per SM at the Llama-2-7B split-K
// grids: ~14 KB per SM. Depths: 3 and 4 at 16 and 32 tokens, 2 at 64 (its accumulators leave no room for more
// without a spill on sm_80).

#include "tc_tile.cuh"

// ---- the format's decode step: a 16-input chunk's eight stored values v (value e in half e % 2 of v[e / 2]) and
// its positions into d[i] = dense inputs 2i, 2i+1 (raw 16-bit patterns: one decode serves fp16 and bf16). The
// same decode as the format's expand kernel (sparse48.cu, sparse816.cu): value e lands at bits 16 * (position & 3)
// of the 64-bit word of its four inputs, chosen by selects, not a branch.
struct Tc48 {  // per chunk: a 16-bit word of low position bits (value 2i at bits 2i, 2i+1 at 8 + 2i), a byte of third bits
    struct Tables {
        const u8* meta;
        const u8* high;
    };
    struct Meta {
        u32 m, h;
    };
    static __device__ __forceinline__ Meta load(const Tables& t, size_t row, int K, int j) {
        return {ld_stream_u16(t.meta + row * (K >> 3) + j * 2), ld_stream_u8(t.high + row * (K >> 4) + j)};
    }
    static __device__ __forceinline__ void expand(const u32 (&v)[4], const Meta& m, u32 (&d)[8]) {
        unsigned long long q[4] = {0ull, 0ull, 0ull, 0ull};  // inputs 4i .. 4i + 3
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int pair = e >> 1, second = e & 1;
            const u32 p = ((m.m >> (2 * pair + 8 * second)) & 3u) | (((m.h >> (pair + 4 * second)) & 1u) << 2);
            const unsigned long long w = (unsigned long long)((v[pair] >> (16 * second)) & 0xffffu) << (16 * (p & 3u));
            q[2 * (pair >> 1)] |= (p & 4u) ? 0ull : w;  // group pair / 2 of the chunk, its low or high four inputs
            q[2 * (pair >> 1) + 1] |= (p & 4u) ? w : 0ull;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            d[2 * i] = (u32)q[i];
            d[2 * i + 1] = (u32)(q[i] >> 32);
        }
    }
};

struct Tc816 {  // per chunk (one group): a 32-bit word of ascending 4-bit positions, value e at bits 4e
    struct Tables {
        const u32* pos;
    };
    typedef u32 Meta;
    static __device__ __forceinline__ Meta load(const Tables& t, size_t row, int K, int j) {
        return ld_stream_u32(t.pos + row * (K >> 4) + j);
    }
    static __device__ __forceinline__ void expand(const u32 (&v)[4], const Meta& m, u32 (&d)[8]) {
        unsigned long long q[4] = {0ull, 0ull, 0ull, 0ull};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const u32 p = (m >> (4 * e)) & 15u;
            const unsigned long long w = (unsigned long long)((v[e >> 1] >> (16 * (e & 1))) & 0xffffu) << (16 * (p & 3u));
#pragma unroll
            for (int i = e >> 2; i <= ((e + 8) >> 2 < 3 ? (e + 8) >> 2 : 3); ++i) q[i] |= (p >> 2) == (u32)i ? w : 0ull;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            d[2 * i] = (u32)q[i];
            d[2 * i + 1] = (u32)(q[i] >> 32);
        }
    }
};

// ---- the engine's unit for a stored N:M format P (Tc48, Tc816): eight values (one 16-byte load at halves
// row * K/2 + 8j) and P's positions of chunk j ----
template <class P>
struct TcNm {
    typedef typename P::Tables Tables;
    struct Unit {
        u32 v[4];
        typename P::Meta meta;
    };
    static __device__ __forceinline__ void first(const u16*, const Tables&, size_t, int, int, Unit&) {}
    static __device__ __forceinline__ void load(const u16* vals, const Tables& t, size_t row, int K, int j, Unit& u) {
        ld_stream_v4((const char*)vals + (row * (K >> 1) + (size_t)j * 8) * 2, u.v);
        u.meta = P::load(t, row, K, j);
    }
    static __device__ __forceinline__ void store(const Unit& u, u32 z, u32 at, int r, int c) {
        const u32 vz[4] = {u.v[0] & z, u.v[1] & z, u.v[2] & z, u.v[3] & z};
        u32 d[8];
        P::expand(vz, u.meta, d);
        tc_st_shared(at + tc_at(r, 2 * c), d[0], d[1], d[2], d[3]);
        tc_st_shared(at + tc_at(r, 2 * c + 1), d[4], d[5], d[6], d[7]);
    }
};

// ---- entry points: tc48_<dtype>_n<tokens>, tc816_<dtype>_n<tokens> (kernels/nm.py: TC_TOKENS), tcsum_<dtype> ----
#define TC48(DT, BF, TN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                                 \
        tc48_##DT##_n##TN(const u16* x, const u16* vals, const u8* meta, const u8* high, u16* y, float* work, \
                          int M, int N, int K, int S) {                                                      \
        tc_gemm<TcNm<Tc48>, BF, TN>(x, vals, {meta, high}, y, work, M, N, K, S);                             \
    }
#define TC816(DT, BF, TN)                                                                                    \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                                 \
        tc816_##DT##_n##TN(const u16* x, const u16* vals, const u32* pos, u16* y, float* work, int M, int N, \
                           int K, int S) {                                                                   \
        tc_gemm<TcNm<Tc816>, BF, TN>(x, vals, {pos}, y, work, M, N, K, S);                                   \
    }
// ring entry points: tcr48_<dtype>_n<tokens>_d<stages>, tcr816_..., tc_gemm_ring's D stages in registers
#define TCR48(DT, BF, TN, D)                                                                                 \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                                 \
        tcr48_##DT##_n##TN##_d##D(const u16* x, const u16* vals, const u8* meta, const u8* high, u16* y,       \
                                  float* work, int M, int N, int K, int S) {                                 \
        tc_gemm_ring<TcNm<Tc48>, BF, TN, D>(x, vals, {meta, high}, y, work, M, N, K, S);                     \
    }
#define TCR816(DT, BF, TN, D)                                                                                \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                                 \
        tcr816_##DT##_n##TN##_d##D(const u16* x, const u16* vals, const u32* pos, u16* y, float* work, int M,  \
                                   int N, int K, int S) {                                                    \
        tc_gemm_ring<TcNm<Tc816>, BF, TN, D>(x, vals, {pos}, y, work, M, N, K, S);                           \
    }
#define ALL(DT, BF)                                                                                          \
    TC48(DT, BF, 16)                                                                                         \
    TC48(DT, BF, 32)                                                                                         \
    TC48(DT, BF, 64)                                                                                         \
    TC816(DT, BF, 16)                                                                                        \
    TC816(DT, BF, 32)                                                                                        \
    TC816(DT, BF, 64)                                                                                        \
    TCSUM(DT, BF)                                                                                            \
    TCR48(DT, BF, 16, 3)                                                                                     \
    TCR48(DT, BF, 16, 4)                                                                                     \
    TCR48(DT, BF, 32, 3)                                                                                     \
    TCR48(DT, BF, 32, 4)                                                                                     \
    TCR48(DT, BF, 64, 2)                                                                                     \
    TCR816(DT, BF, 16, 3)                                                                                    \
    TCR816(DT, BF, 16, 4)                                                                                    \
    TCR816(DT, BF, 32, 3)                                                                                    \
    TCR816(DT, BF, 32, 4)                                                                                    \
    TCR816(DT, BF, 64, 2)
ALL(f16, false)
ALL(bf16, true)
