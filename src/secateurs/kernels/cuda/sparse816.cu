// 8:16 GEMV for decode: y (M, N) = x (M, K) @ W.T with W in the 8:16 format of kernels/nm816.py, M = 1-4
// activation rows; and the expand kernel of its prompt path (8 rows and more: the dense weight written into the
// shared scratch buffer, then cuBLAS). Compiled at run time by NVRTC (kernels/cuda_ops.py) as a module of its own;
// its helpers and its GEMV loop (gemv_nm: lanes striding along K, U steps of loads in flight, split-K across
// warps) are common.cuh's, shared with sparse48.cu.
//
// The layout is the cleanest N:M one: per 16 inputs, eight fp16 values (one 16-byte load) and eight ascending
// 4-bit positions (one 32-bit word, value e's at bits 4e..4e+3): 1.25 bytes per dense fp16 weight, a byte limit
// of 1.6x over dense.
//
// Decode: eight ascending positions out of 16 put value e at position e..e+8, so value pair i (values 2i, 2i+1)
// lies within inputs 2i..2i+9: five x registers, not eight. Subtracting 2i from both positions of pair i (one
// subtraction for the whole word, no borrow since positions ascend) gives offsets r0 in 0..8 and r1 in 1..9; per
// token four byte-permutes pick the pair's two activations: two inside x registers (i, i+1) and (i+2, i+3) by the
// offsets' low two bits, one between those by bit 2, one between that and register i+4 (inputs 2i+8, 2i+9) by
// bit 3. The selectors are table lookups (byte-permutes of constants) indexed by the offsets themselves, two
// pairs per lookup: about 20 integer instructions per 16 inputs, shared by the tokens. No gather from memory, no
// branch, fp32 accumulation. Main loop (nvcc 13, sm_90, benchmarks/sass_count.py): 9.4 / 14.4 / 22.7 SASS
// instructions per stored value at 1 / 2 / 4 tokens (rows per warp 2), against 4:8's 10.0 / 14.6 / 21.5.

#include "common.cuh"

// PTX prmt in its default mode, not __byte_perm (which clears bit 3 of every selector nibble first, one more
// instruction per dynamic selector): a nibble with bit 3 set gives its byte's sign (0x00 for the tables here).
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
    return d;
}

// ---- one 16-input step: v = the eight stored values (pair i in v[i]), p = their ascending 4-bit positions (value
// e at bits 4e), xv[t][q][k] = x register 4q + k (inputs 8q + 2k, 8q + 2k + 1) of token t.
template <bool BF16, int T>
__device__ __forceinline__ void step816(float (&acc)[T], const u32 (&v)[4], u32 p, const u32 (&xv)[T][2][4]) {
    const u32 rel = p - 0x66442200u;  // nibble e: r = position - 2 * (e / 2); value 2i's r0 in 0..8, 2i+1's r1 in 1..9
    // The three selectors of pair i come from byte-permute table lookups indexed by the pair's two nibbles (a
    // selector nibble picks a table byte; r >= 8 sets bit 3, giving 0x00, a selector whose result level 3
    // overrides). One lookup serves two pairs: result bytes 0-1 for pair 2j, 2-3 for pair 2j+1.
    // level 3: table index (r & 1) | (r >= 8) << 1 | (high half) << 2
    const u32 idx3 = (rel & 0x11111111u) | ((rel >> 2) & 0x22222222u) | 0x40404040u;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const u32 r = rel >> (16 * j), q = idx3 >> (16 * j);
        // level 1: bytes 2 (r & 3), +1 of a register pair; level 2: the first (r < 4) or second register pair's
        // result, + 0x22 in the high half's byte; level 3: the result of level 2 or register i + 4's low / high half
        const u32 s1w = prmt(0x76543210u, 0x76543210u, r);
        const u32 s2w = prmt(0x10101010u, 0x54545454u, r) + 0x22002200u;
        const u32 s3w = prmt(0x00541010u, 0x76543232u, q);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int i = 2 * j + h;
            const u32 s1 = s1w >> (16 * h), s2 = s2w >> (16 * h), s3 = s3w >> (16 * h);
            float w0, w1;
            unpack2<BF16>(v[i], w0, w1);
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const u32 a = prmt(xv[t][i >> 2][i & 3], xv[t][(i + 1) >> 2][(i + 1) & 3], s1);
                const u32 b = prmt(xv[t][(i + 2) >> 2][(i + 2) & 3], xv[t][(i + 3) >> 2][(i + 3) & 3], s1);
                const u32 ab = prmt(a, b, s2);
                float xa, xb;
                unpack2<BF16>(prmt(ab, xv[t][(i + 4) >> 2][(i + 4) & 3], s3), xa, xb);
                acc[t] = fmaf(w0, xa, acc[t]);
                acc[t] = fmaf(w1, xb, acc[t]);
            }
        }
    }
}

// The format's policy for common.cuh's gemv_nm: one 32-bit position word per 16-input step.
struct Fmt816 {
    struct Tables {
        const u32* pos;
    };
    typedef const char* Row;
    typedef u32 Meta;
    static __device__ __forceinline__ Row row(const Tables& t, size_t n, int K) {
        return (const char*)(t.pos + n * (K >> 4));
    }
    static __device__ __forceinline__ Meta load(const Row& r, size_t j) { return ld_stream_u32(r + j * 4); }
    template <bool BF16, int T>
    static __device__ __forceinline__ void step(float (&acc)[T], const u32 (&v)[4], const Meta& p,
                                                const u32 (&xv)[T][2][4]) {
        step816<BF16, T>(acc, v, p, xv);
    }
};

// ---- expand: the stored 8:16 weight into a dense (N, K) buffer (the prompt path: kernels/cuda_ops.py's one
// shared scratch, then cuBLAS) ----
// Flat over 16-input chunks (rows hold whole chunks since K % 16 == 0). A thread takes C consecutive chunks per step:
// C 16-byte loads of values and the C position words in one 4C-byte load, 32C bytes out in 16-byte stores. C = 1
// makes every warp-wide access one contiguous run; C = 4 loads four chunks' positions at once. Value e goes to
// bits 16 x (position & 3) of the 64-bit word holding inputs 4q..4q+3, q = position >> 2, chosen by selects among
// the words its ascending position can reach (e >> 2 .. (e + 8) >> 2), not a branch. Works on raw 16-bit patterns,
// so one kernel serves fp16 and bf16.
template <int C>
__device__ __forceinline__ void expand816(const u16* __restrict__ vals, const u32* __restrict__ pos,
                                          u16* __restrict__ out, long long units) {
    for (long long i = blockIdx.x * 256ll + threadIdx.x; i < units; i += (long long)gridDim.x * 256) {
        u32 pw[C];
        if (C == 4) {
            u32 q[4];
            ld_stream_v4(pos + i * 4, q);
#pragma unroll
            for (int c = 0; c < C; ++c) pw[c] = q[c & 3];
        } else {
#pragma unroll
            for (int c = 0; c < C; ++c) pw[c] = ld_stream_u32(pos + i * C + c);
        }
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const long long chunk = i * C + c;
            u32 v[4];
            ld_stream_v4((const char*)vals + chunk * 16, v);
            unsigned long long g[4] = {0ull, 0ull, 0ull, 0ull};  // inputs 4q .. 4q + 3
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const u32 p = (pw[c] >> (4 * e)) & 15u;
                const unsigned long long w = (unsigned long long)((v[e >> 1] >> (16 * (e & 1))) & 0xffffu) << (16 * (p & 3u));
#pragma unroll
                for (int q = e >> 2; q <= ((e + 8) >> 2 < 3 ? (e + 8) >> 2 : 3); ++q) g[q] |= (p >> 2) == (u32)q ? w : 0ull;
            }
            char* dst = (char*)out + chunk * 32;
#pragma unroll
            for (int q = 0; q < 2; ++q)
                asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst + 16 * q), "r"((u32)g[2 * q]),
                             "r"((u32)(g[2 * q] >> 32)), "r"((u32)g[2 * q + 1]), "r"((u32)(g[2 * q + 1] >> 32)));
        }
    }
}

// ---- entry points: expand816_c<chunks per thread> (kernels/nm816.py: EXPAND_CHUNKS) ----
#define EXPAND816(C)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                        \
        expand816_c##C(const u16* vals, const u32* pos, u16* out, long long units) {                        \
        expand816<C>(vals, pos, out, units);                                                                 \
    }
EXPAND816(1)
EXPAND816(4)

// ---- entry points: gemv816_<dtype>_t<tokens>_r<rows per warp group> (kernels/nm816.py: TOKENS, ROWS) ----
// At most 2 blocks per SM (<= 128 registers), so ptxas keeps every load of an unrolled step in flight; the
// instantiations (and U, the steps in flight) are 4:8's, measured for that kernel, not yet for this one.
#define GEMV816(DT, BF, T, R, U)                                                                             \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                                              \
        gemv816_##DT##_t##T##_r##R(const u16* x, const u16* vals, const u32* pos, u16* y, int M, int N,     \
                                   int K, int S) {                                                           \
        gemv_nm<Fmt816, BF, T, R, U>(x, vals, {pos}, y, M, N, K, S);                                         \
    }
#define ALL(DT, BF)                                                                                          \
    GEMV816(DT, BF, 1, 1, 4)                                                                                 \
    GEMV816(DT, BF, 1, 2, 4)                                                                                 \
    GEMV816(DT, BF, 1, 4, 2)                                                                                 \
    GEMV816(DT, BF, 2, 1, 4)                                                                                 \
    GEMV816(DT, BF, 2, 2, 2)                                                                                 \
    GEMV816(DT, BF, 2, 4, 2)                                                                                 \
    GEMV816(DT, BF, 4, 1, 2)                                                                                 \
    GEMV816(DT, BF, 4, 2, 2)
ALL(f16, false)
ALL(bf16, true)
