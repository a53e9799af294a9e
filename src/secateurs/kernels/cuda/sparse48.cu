// 4:8 GEMV for decode: y (M, N) = x (M, K) @ W.T with W in the 4:8 format of kernels/nm48.py, M = 1-4
// activation rows; and the expand kernel of its prompt path (8 rows and more: the dense weight written into a
// shared scratch buffer, then cuBLAS). Compiled at run time by NVRTC (kernels/cuda_ops.py) as a module of its own; its load / convert /
// reduce helpers and its GEMV loop (gemv_nm, the work split) are common.cuh's, shared with sparse816.cu.
//
// Decode is bound by the bytes read (4:8 moves 1.1875 bytes per dense fp16 weight: 1.68x fewer than dense),
// and a Hopper SM receives only 13-18 bytes from memory per clock, so the instructions spent per stored
// value decide whether the kernel keeps up. Per 16 inputs (two groups of 8, eight stored values) a lane
// makes one 16-byte load of values, one 2-byte load of the positions' low bits, one 1-byte load of their
// third bits and two 16-byte loads of x per token; each pair of values then costs two multiply-adds to
// build its two byte-permute selectors and three byte-permutes per token: the first two pick the pair's
// activations out of its group's low and high four inputs by the positions' low bits, the third chooses
// between those by the third bits. No gather, no branch, fp32 accumulation.
//
#include "common.cuh"

// ---- one 16-input step: v = the eight stored values (pair i in v[i]), m = the 16-bit word of low position
// bits (value 2i at bits 2i, value 2i+1 at bits 8 + 2i), h = the byte of third bits (value 2i at bit i,
// value 2i+1 at bit 4 + i), xv[t][q] = the 8 inputs of group q for token t.
template <bool BF16, int T>
__device__ __forceinline__ void step48(float (&acc)[T], const u32 (&v)[4], u32 m, u32 h, const u32 (&xv)[T][2][4]) {
    const u32 hs = (h | (h << 4)) & 0x0f0fu;  // value 2i's third bit at bit i, value 2i+1's at bit 8 + i
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        // bytes 2a, 2a+1 and 2b, 2b+1 of a register pair: halves a and b of four inputs
        const u32 pick = ((m >> (2 * i)) & 0x0303u) * 0x22u + 0x1010u;
        // half 0 from the low (0) or high (1) four inputs' result, half 1 likewise
        const u32 half = ((hs >> i) & 0x0101u) * 0x44u + 0x3210u;
        const int q = i >> 1;
        float w0, w1;
        unpack2<BF16>(v[i], w0, w1);
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const u32 lo = __byte_perm(xv[t][q][0], xv[t][q][1], pick);
            const u32 hi = __byte_perm(xv[t][q][2], xv[t][q][3], pick);
            float a, b;
            unpack2<BF16>(__byte_perm(lo, hi, half), a, b);
            acc[t] = fmaf(w0, a, acc[t]);
            acc[t] = fmaf(w1, b, acc[t]);
        }
    }
}

// The format's policy for common.cuh's gemv_nm: per 16-input step a 2-byte word of low position bits and a byte
// of third bits.
struct Fmt48 {
    struct Tables {
        const u8* meta;
        const u8* high;
    };
    struct Row {
        const char* m;
        const char* h;
    };
    struct Meta {
        u32 m, h;
    };
    static __device__ __forceinline__ Row row(const Tables& t, size_t n, int K) {
        return {(const char*)(t.meta + n * (K >> 3)), (const char*)(t.high + n * (K >> 4))};
    }
    static __device__ __forceinline__ Meta load(const Row& r, size_t j) {
        return {ld_stream_u16(r.m + j * 2), ld_stream_u8(r.h + j)};
    }
    template <bool BF16, int T>
    static __device__ __forceinline__ void step(float (&acc)[T], const u32 (&v)[4], const Meta& m,
                                                const u32 (&xv)[T][2][4]) {
        step48<BF16, T>(acc, v, m.m, m.h, xv);
    }
};

// ---- expand: the stored 4:8 weight into a dense (N, K) buffer (the prompt path: kernels/cuda_ops.py's one shared
// scratch, then cuBLAS) ----
// Flat over 16-input chunks (rows hold whole chunks since K % 16 == 0). A thread takes C consecutive chunks per
// step: C 16-byte loads of values, the C position words and C third-bit bytes in one 2C- and one C-byte load, and
// 32C bytes out in 16-byte stores. C = 1 makes every warp-wide access one contiguous run (as expand24, measured at
// 0.65-1.0 of the copy bandwidth); C = 4 spends a quarter of the position loads. The dispatcher times both. Value e
// of a chunk (pair e / 2, half e % 2) goes to bits 16 x (position & 3) of the 64-bit word holding its group's low or
// high four inputs (position & 4), chosen by selects, not a branch. Works on raw 16-bit patterns, so one kernel
// serves fp16 and bf16.
template <int C>
__device__ __forceinline__ void expand48(const u16* __restrict__ vals, const u8* __restrict__ meta,
                                         const u8* __restrict__ high, u16* __restrict__ out, long long units) {
    for (long long i = blockIdx.x * 256ll + threadIdx.x; i < units; i += (long long)gridDim.x * 256) {
        const unsigned long long mw = C == 4 ? ld_stream_u64(meta + i * 8) : ld_stream_u16(meta + i * 2);
        const u32 hw = C == 4 ? ld_stream_u32(high + i * 4) : ld_stream_u8(high + i);
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const long long chunk = i * C + c;
            u32 v[4];
            ld_stream_v4((const char*)vals + chunk * 16, v);
            const u32 m = (u32)(mw >> (16 * c)) & 0xffffu, h = (hw >> (8 * c)) & 0xffu;
            unsigned long long g[2][2] = {{0ull, 0ull}, {0ull, 0ull}};  // [group][low / high four inputs]
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int i2 = e >> 1, second = e & 1;
                const u32 p = ((m >> (2 * i2 + 8 * second)) & 3u) | (((h >> (i2 + 4 * second)) & 1u) << 2);
                const unsigned long long w = (unsigned long long)((v[i2] >> (16 * second)) & 0xffffu) << (16 * (p & 3u));
                g[i2 >> 1][0] |= (p & 4u) ? 0ull : w;
                g[i2 >> 1][1] |= (p & 4u) ? w : 0ull;
            }
            char* dst = (char*)out + chunk * 32;
#pragma unroll
            for (int q = 0; q < 2; ++q)
                asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst + 16 * q), "r"((u32)g[q][0]),
                             "r"((u32)(g[q][0] >> 32)), "r"((u32)g[q][1]), "r"((u32)(g[q][1] >> 32)));
        }
    }
}

// ---- entry points: expand48_c<chunks per thread> (kernels/nm48.py: EXPAND_CHUNKS) ----
#define EXPAND48(C)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        expand48_c##C(const u16* vals, const u8* meta, const u8* high, u16* out, long long units) {         \
        expand48<C>(vals, meta, high, out, units);                                                           \
    }
EXPAND48(1)
EXPAND48(4)

// ---- entry points: gemv48_<dtype>_t<tokens>_r<rows per warp group> (kernels/nm48.py: TOKENS, ROWS) ----
// At most 2 blocks per SM (<= 128 registers), so ptxas keeps every load of an unrolled step in flight.
#define GEMV48(DT, BF, T, R, U)                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                                              \
        gemv48_##DT##_t##T##_r##R(const u16* x, const u16* vals, const u8* meta, const u8* high, u16* y,    \
                                  int M, int N, int K, int S) {                                              \
        gemv_nm<Fmt48, BF, T, R, U>(x, vals, {meta, high}, y, M, N, K, S);                                   \
    }
#define ALL(DT, BF)                                                                                          \
    GEMV48(DT, BF, 1, 1, 4)                                                                                  \
    GEMV48(DT, BF, 1, 2, 4)                                                                                  \
    GEMV48(DT, BF, 1, 4, 2)                                                                                  \
    GEMV48(DT, BF, 2, 1, 4)                                                                                  \
    GEMV48(DT, BF, 2, 2, 2)                                                                                  \
    GEMV48(DT, BF, 2, 4, 2)                                                                                  \
    GEMV48(DT, BF, 4, 1, 2)                                                                                  \
    GEMV48(DT, BF, 4, 2, 2)
ALL(f16, false)
ALL(bf16, true)
