// N:M on tensor cores for 5-64 tokens (4:8 and 8:16, kernels/nm48.py and kernels/nm816.py): "load as sparse, compute
// as dense". y (M, N) = x (M, K) @ W.T with W read in its stored layout (values plus position tables), expanded in
// registers into a dense shared-memory tile, then multiplied by dense mma.sync.m16n8k16 (fp16 or bf16 in, fp32
// accumulate). At 8-64 tokens the expand path (the whole weight written to a dense scratch, then cuBLAS) moves about
// three times the dense bytes, and the CUDA-core GEMVs are instruction-bound past 4 tokens; here the stored bytes are
// read once and the decode is paid once per weight, whatever the token count. Compiled at run time by NVRTC
// (kernels/cuda_ops.py) as a module of its own; correct on an H100 (468 checks against float64), offered beside
// the expand path at 5-64 tokens and chosen by the dispatcher's timing (kernels/nm.py).
//
// Work split: a block of 4 warps owns 64 output features (warp w: features 16w..16w+15, every token of the block's
// tile), TN tokens (16, 32 or 64: x^T is the B operand, tokens on the N side, TN / 8 n8 tiles) and a K-slice of
// whole 64-input stages (split-K: S blocks share a feature tile; each writes fp32 partial sums to its own slice of a
// workspace and tcsum adds them in a fixed order, so the result is deterministic; with S = 1 the block stores y).
// Block b: feature tile b % tiles, split (b / tiles) % S, token tile b / (tiles * S).
//
// Per stage (64 inputs) a thread decodes two (feature row, 16-input chunk) units: one 16-byte load of the chunk's
// eight stored values and its positions (the format's F::load), decoded by F::expand into the chunk's 16 dense
// halves and written as two 16-byte rows of the shared tile. The tile is 64 features x 128 bytes; 16-byte chunk c of
// row r sits at chunk c ^ (r & 7), so the eight rows an ldmatrix phase reads (rows r..r+7, one logical chunk) and the
// rows a quarter-warp stores fall in distinct bank groups. x goes to its own tile (TN tokens x 128 bytes, the same
// swizzle) by cp.async, zero-filled for tokens past M and inputs past K. Two buffers of each: the next stage's
// values and positions are in registers and its x in flight while the warps multiply the current one. Rows past N
// load a clamped (valid) address with zeroed values and are never stored.
//
// Fragments (PTX ISA, m16n8k16, lane = 4g + t): A (W, row-major 16 x 16) a0 = row g cols 2t, 2t+1; a1 = row g+8;
// a2 = row g cols 2t+8, 2t+9; a3 = row g+8 cols 2t+8, 2t+9: one ldmatrix.x4 whose matrices are (rows 0-7, cols 0-7),
// (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15). B (x^T, k x n, read from x's token rows)
// b0 = k 2t, 2t+1 of token g; b1 = k 2t+8, 2t+9: one ldmatrix.x4 over one token tile's inputs 0-31 (or 32-63) gives
// the B fragments of two k16 steps. C: c0, c1 = row g tokens 2t, 2t+1; c2, c3 = row g+8.

#include "common.cuh"

#define TC_THREADS 128
#define TC_ROWS 64  // output features per block

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

// ---- shared memory and tensor-core wrappers ----
__device__ __forceinline__ void tc_st_shared(u32 addr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
}
// 16 bytes, or 16 zero bytes where bytes == 0 (a token past M, inputs past K)
__device__ __forceinline__ void tc_cp_async16(u32 dst, const void* src, u32 bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tc_ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
template <bool BF16>
__device__ __forceinline__ void tc_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// byte offset of 16-byte chunk c (0-7) of 128-byte row r in a swizzled tile
__device__ __forceinline__ u32 tc_at(int r, int c) { return (u32)(r * 128 + ((c ^ (r & 7)) << 4)); }

// ---- the engine every stored N:M format shares: one loop, F's load and decode per 16-input chunk ----
template <class F, bool BF16, int TN>
__device__ __forceinline__ void tc_nm(const u16* __restrict__ x, const u16* __restrict__ vals,
                                      const typename F::Tables tables, u16* __restrict__ y, float* __restrict__ work,
                                      int M, int N, int K, int S) {
    constexpr int NT = TN / 8, XU = TN * 8 / TC_THREADS, UNITS = TC_ROWS * 4 / TC_THREADS;
    __shared__ __align__(128) u16 sw[2][TC_ROWS * 64];
    __shared__ __align__(128) u16 sx[2][TN * 64];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int tiles = (N + TC_ROWS - 1) / TC_ROWS;
    const int tile = blockIdx.x % tiles, rest = blockIdx.x / tiles, s = rest % S, tt = rest / S;
    const int row0 = tile * TC_ROWS, tok0 = tt * TN;
    const int W = K >> 4, KB = (W + 3) >> 2;
    const int kb0 = (int)((long long)s * KB / S), kb1 = (int)((long long)(s + 1) * KB / S);
    const u32 base_w = smem_u32(sw), base_x = smem_u32(sx);

    // unit i of this thread: tile row r = (tid + 128 i) / 4, chunk c = tid % 4 of each stage
    const int c = tid & 3;
    size_t vrow[UNITS];
    bool live[UNITS];
#pragma unroll
    for (int i = 0; i < UNITS; ++i) {
        const int r = (tid + TC_THREADS * i) >> 2;
        live[i] = row0 + r < N;
        vrow[i] = (size_t)min(row0 + r, N - 1);
    }
    u32 v[UNITS][4];
    typename F::Meta meta[UNITS];
    auto load_w = [&](int kb) {
#pragma unroll
        for (int i = 0; i < UNITS; ++i) {
            const int j = min(kb * 4 + c, W - 1);
            ld_stream_v4((const char*)vals + (vrow[i] * (K >> 1) + (size_t)j * 8) * 2, v[i]);
            meta[i] = F::load(tables, vrow[i], K, j);
        }
    };
    auto store_w = [&](int buf, int kb) {
#pragma unroll
        for (int i = 0; i < UNITS; ++i) {
            const u32 z = (live[i] && kb * 4 + c < W) ? 0xffffffffu : 0u;
            const u32 vz[4] = {v[i][0] & z, v[i][1] & z, v[i][2] & z, v[i][3] & z};
            u32 d[8];
            F::expand(vz, meta[i], d);
            const int r = (tid + TC_THREADS * i) >> 2;
            const u32 at = base_w + buf * (TC_ROWS * 128);
            tc_st_shared(at + tc_at(r, 2 * c), d[0], d[1], d[2], d[3]);
            tc_st_shared(at + tc_at(r, 2 * c + 1), d[4], d[5], d[6], d[7]);
        }
    };
    auto load_x = [&](int buf, int kb) {
#pragma unroll
        for (int i = 0; i < XU; ++i) {
            const int idx = tid + TC_THREADS * i, r = idx >> 3, cx = idx & 7;
            const int token = tok0 + r, input = kb * 64 + cx * 8;
            const bool ok = token < M && input < K;
            const u16* src = x + (size_t)min(token, M - 1) * K + (ok ? input : 0);
            tc_cp_async16(base_x + buf * (TN * 128) + tc_at(r, cx), src, ok ? 16u : 0u);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[n][q] = 0.f;

    if (kb0 < kb1) {
        load_w(kb0);
        load_x(0, kb0);
    }
    // ldmatrix row of this lane: matrix lane / 8, its row lane % 8
    const int ra = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ca = lane >> 4;
    const int rb = lane & 7, cb = lane >> 3;
    for (int kb = kb0; kb < kb1; ++kb) {
        const int cur = (kb - kb0) & 1;
        store_w(cur, kb);  // this buffer was last read two stages ago, before the previous barrier
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();  // the tile and x of this stage are in; every warp is done with the other buffers
        if (kb + 1 < kb1) {
            load_w(kb + 1);
            load_x(cur ^ 1, kb + 1);
        }
        const u32 aw = base_w + cur * (TC_ROWS * 128), ax = base_x + cur * (TN * 128);
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // inputs 32h .. 32h + 31: two k16 steps
            u32 a[2][4];
#pragma unroll
            for (int k = 0; k < 2; ++k) tc_ldmatrix_x4(a[k], aw + tc_at(ra, 4 * h + 2 * k + ca));
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                u32 b[4];
                tc_ldmatrix_x4(b, ax + tc_at(n * 8 + rb, 4 * h + cb));
                tc_mma<BF16>(acc[n], a[0], b[0], b[1]);
                tc_mma<BF16>(acc[n], a[1], b[2], b[3]);
            }
        }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int row = row0 + warp * 16 + g + (q >> 1) * 8, token = tok0 + n * 8 + 2 * t + (q & 1);
            if (row < N && token < M) {
                if (S == 1) y[(size_t)token * N + row] = pack1<BF16>(acc[n][q]);
                else work[((size_t)s * M + token) * N + row] = acc[n][q];
            }
        }
}

// ---- split-K ending: y = the S partial sums of work (S, M * N), added in split order ----
template <bool BF16>
__device__ __forceinline__ void tc_sum(const float* __restrict__ work, u16* __restrict__ y, int count, int S) {
    const int i = blockIdx.x * (WARPS * 32) + threadIdx.x;
    if (i >= count) return;
    float sum = 0.f;
    for (int s = 0; s < S; ++s) sum += work[(size_t)s * count + i];
    y[i] = pack1<BF16>(sum);
}

// ---- entry points: tc48_<dtype>_n<tokens>, tc816_<dtype>_n<tokens> (kernels/nm.py: TC_TOKENS), tcsum_<dtype> ----
#define TC48(DT, BF, TN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                                 \
        tc48_##DT##_n##TN(const u16* x, const u16* vals, const u8* meta, const u8* high, u16* y, float* work, \
                          int M, int N, int K, int S) {                                                      \
        tc_nm<Tc48, BF, TN>(x, vals, {meta, high}, y, work, M, N, K, S);                                     \
    }
#define TC816(DT, BF, TN)                                                                                    \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                                 \
        tc816_##DT##_n##TN(const u16* x, const u16* vals, const u32* pos, u16* y, float* work, int M, int N, \
                           int K, int S) {                                                                   \
        tc_nm<Tc816, BF, TN>(x, vals, {pos}, y, work, M, N, K, S);                                           \
    }
#define TCSUM(DT, BF)                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) tcsum_##DT(const float* work, u16* y, int count, \
                                                                        int S) {                             \
        tc_sum<BF>(work, y, count, S);                                                                       \
    }
#define ALL(DT, BF)                                                                                          \
    TC48(DT, BF, 16)                                                                                         \
    TC48(DT, BF, 32)                                                                                         \
    TC48(DT, BF, 64)                                                                                         \
    TC816(DT, BF, 16)                                                                                        \
    TC816(DT, BF, 32)                                                                                        \
    TC816(DT, BF, 64)                                                                                        \
    TCSUM(DT, BF)
ALL(f16, false)
ALL(bf16, true)
