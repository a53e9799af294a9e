// Sparse kernels for decode: y (M, N) = x (M, K) @ W.T with W held compressed (kernels/formats.py),
// M = 1-16 activation rows: a 2:4 GEMV and a bitmap GEMV on the CUDA cores, a 2:4 kernel on tensor cores. Compiled at run time by NVRTC (kernels/cuda_ops.py), so this file includes
// no header: halves travel as 16-bit integers and are converted with inline PTX.
//
// Both kernels are memory-bound: they read each compressed weight byte once, with as few instructions
// per byte as the format allows, because a Hopper SM receives 13-18 bytes from memory per clock.
//
// Work split (the two GEMVs): a block of 8 warps; S warps share R output rows and split K between them
// (S > 1 for narrow shapes such as a 1024-row k/v projection, so every SM has enough loads in flight),
// their partial sums meet in shared memory. Rows past N and tokens past M are computed on clamped
// (valid) addresses and never stored.

typedef unsigned short u16;
typedef unsigned int u32;

#define WARPS 8
#define FULL 0xffffffffu

// ---- loads: weights are streamed (evict-first), activations go through the read-only cache ----
__device__ __forceinline__ void ld_stream_v4(const void* p, u32 (&v)[4]) {
    asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
}
__device__ __forceinline__ u32 ld_stream_u16(const void* p) {
    u32 v;
    asm("ld.global.cs.u16 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 ld_stream_u32(const void* p) {
    u32 v;
    asm("ld.global.cs.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ void ld_nc_v4(const void* p, u32 (&v)[4]) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
}
__device__ __forceinline__ u32 ld_nc_u16(const void* p) {
    u32 v;
    asm("ld.global.nc.u16 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ int ld_nc_s32(const void* p) {
    int v;
    asm("ld.global.nc.s32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// ---- 16-bit floats <-> fp32 ----
template <bool BF16>
__device__ __forceinline__ void unpack2(u32 v, float& lo, float& hi) {
    if (BF16) {
        lo = __uint_as_float(v << 16);
        hi = __uint_as_float(v & 0xffff0000u);
    } else {
        asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;}"
            : "=f"(lo), "=f"(hi) : "r"(v));
    }
}
template <bool BF16>
__device__ __forceinline__ float unpack1(u32 v) {
    if (BF16) return __uint_as_float(v << 16);
    float f;
    asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %1;\n cvt.f32.f16 %0, l;}" : "=f"(f) : "r"(v));
    return f;
}
template <bool BF16>
__device__ __forceinline__ u16 pack1(float f) {
    u16 h;
    if (BF16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// ---- shared ending: warp sums, split-K sums in shared memory, one store per (row, token) ----
template <bool BF16, int T, int R>
__device__ __forceinline__ void finish(float (&acc)[R][T], u16* __restrict__ y, int M, int N, int row0, int S) {
    __shared__ float red[WARPS][R * T];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, s = warp % S;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t)
#pragma unroll
            for (int o = 16; o; o >>= 1) acc[r][t] += __shfl_xor_sync(FULL, acc[r][t], o);
    if (S > 1) {
        if (lane == 0)
#pragma unroll
            for (int i = 0; i < R * T; ++i) red[warp][i] = acc[i / T][i % T];
        __syncthreads();
        if (lane == 0 && s == 0)
#pragma unroll
            for (int i = 0; i < R * T; ++i) {
                float sum = 0.f;
                for (int k = 0; k < S; ++k) sum += red[warp + k][i];
                acc[i / T][i % T] = sum;
            }
    }
    if (lane == 0 && s == 0)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t)
                if (row0 + r < N && t < M) y[(size_t)t * N + row0 + r] = pack1<BF16>(acc[r][t]);
}

// ---- 2:4 ----
// values (N, K/2): the two kept weights of each group of 4 inputs, in column order; meta read as (N, K/16)
// 16-bit words, 4 bits per group (first position | second << 2), group g of a word at bits 4g.
// Per 16 inputs a lane loads 16 bytes of values, 2 bytes of positions and 32 bytes of x per token; for
// each group one byte-permute picks the two activations the positions name out of the group's four.
template <bool BF16, int T>
__device__ __forceinline__ void step24(float (&acc)[T], const u32 (&v)[4], u32 m, const u32 (&xv)[T][2][4]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const u32 code = m >> (4 * q);
        const u32 sel = (code & 3u) * 0x22u + ((code >> 2) & 3u) * 0x2200u + 0x1010u;
        float w0, w1;
        unpack2<BF16>(v[q], w0, w1);
#pragma unroll
        for (int t = 0; t < T; ++t) {
            float a, b;
            unpack2<BF16>(__byte_perm(xv[t][q >> 1][2 * (q & 1)], xv[t][q >> 1][2 * (q & 1) + 1], sel), a, b);
            acc[t] = fmaf(w0, a, acc[t]);
            acc[t] = fmaf(w1, b, acc[t]);
        }
    }
}

template <bool BF16, int T, int R, int U>
__device__ __forceinline__ void gemv24(const u16* __restrict__ x, const u16* __restrict__ vals,
                                       const u16* __restrict__ meta, u16* __restrict__ y, int M, int N, int K,
                                       int S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = warp / S, s = warp % S;
    const int row0 = (blockIdx.x * (WARPS / S) + g) * R;
    const int W = K >> 4;
    const char* vp[R];
    const char* mp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const size_t n = (size_t)min(row0 + r, N - 1);
        vp[r] = (const char*)(vals + n * (K >> 1));
        mp[r] = (const char*)(meta + n * W);
    }
    const char* xp[T];
#pragma unroll
    for (int t = 0; t < T; ++t) xp[t] = (const char*)(x + (size_t)min(t, M - 1) * K);
    float acc[R][T];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
    const int stride = 32 * S;
    int j = s * 32 + lane;
    for (; j + (U - 1) * stride < W; j += U * stride) {
        u32 v[U][R][4], m[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const size_t jj = j + u * stride;
                ld_stream_v4(vp[r] + jj * 16, v[u][r]);
                m[u][r] = ld_stream_u16(mp[r] + jj * 2);
            }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            u32 xv[T][2][4];
            const size_t jj = j + u * stride;
#pragma unroll
            for (int t = 0; t < T; ++t) {
                ld_nc_v4(xp[t] + jj * 32, xv[t][0]);
                ld_nc_v4(xp[t] + jj * 32 + 16, xv[t][1]);
            }
#pragma unroll
            for (int r = 0; r < R; ++r) step24<BF16, T>(acc[r], v[u][r], m[u][r], xv);
        }
    }
    for (; j < W; j += stride) {
        u32 xv[T][2][4];
#pragma unroll
        for (int t = 0; t < T; ++t) {
            ld_nc_v4(xp[t] + (size_t)j * 32, xv[t][0]);
            ld_nc_v4(xp[t] + (size_t)j * 32 + 16, xv[t][1]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            u32 v[4];
            ld_stream_v4(vp[r] + (size_t)j * 16, v);
            step24<BF16, T>(acc[r], v, ld_stream_u16(mp[r] + (size_t)j * 2), xv);
        }
    }
    finish<BF16, T, R>(acc, y, M, N, row0, S);
}

// ---- bitmap (unstructured) ----
// bits (N, K/32) one bit per weight, values the non-zeros in row-major order, offsets (N, K/128) the index
// in values where each 128-input segment of a row starts. A lane owns one 32-input word at a time: its
// values start at the segment offset plus the popcounts of the words before it in the segment (a 4-lane
// scan), and it walks its set bits. x is staged per K tile in shared memory as fp32, transposed so the 32
// inputs of a word sit in one bank: lane l always reads bank l, whatever bit it is at (no conflicts).
#define KT 4096
template <bool BF16, int T, int R>
__device__ __forceinline__ void gemv_bitmap(const u16* __restrict__ x, const u16* __restrict__ vals,
                                            const u32* __restrict__ bits, const int* __restrict__ offs,
                                            u16* __restrict__ y, int M, int N, int K, int S) {
    __shared__ float xs[T][KT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = warp / S, s = warp % S;
    const int row0 = (blockIdx.x * (WARPS / S) + g) * R;
    const int words = K >> 5, segs = K >> 7;
    float acc[R][T];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
    for (int k0 = 0; k0 < K; k0 += KT) {
        const int tw = min(KT, K - k0) >> 5;
        __syncthreads();
        // Stage: each thread converts 8 inputs of one word; consecutive threads take consecutive words.
        for (int i = threadIdx.x; i < tw * 4; i += blockDim.x) {
            const int w = i % tw, q = i / tw;
            float* dst = &xs[0][(w >> 5) * 1024 + q * 8 * 32 + (w & 31)];
#pragma unroll
            for (int t = 0; t < T; ++t) {
                u32 h[4];
                ld_nc_v4(x + (size_t)min(t, M - 1) * K + k0 + w * 32 + q * 8, h);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float a, b;
                    unpack2<BF16>(h[e], a, b);
                    dst[t * KT + (2 * e) * 32] = a;
                    dst[t * KT + (2 * e + 1) * 32] = b;
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const size_t n = (size_t)min(row0 + r, N - 1);
            for (int base = s * 32; base < tw; base += 32 * S) {
                const int w = base + lane;
                const bool ok = w < tw;
                const int gw = (k0 >> 5) + w;
                u32 word = ok ? ld_stream_u32(bits + n * words + gw) : 0u;
                const int off = ok ? ld_nc_s32(offs + n * segs + (gw >> 2)) : 0;
                const int c = __popc(word);
                int p = c;
                const int p1 = __shfl_up_sync(FULL, p, 1, 4);
                if ((lane & 3) >= 1) p += p1;
                const int p2 = __shfl_up_sync(FULL, p, 2, 4);
                if ((lane & 3) >= 2) p += p2;
                const u16* vp = vals + off + (p - c);
                const float* xl = &xs[0][(w >> 5) * 1024 + (w & 31)];
                while (word) {
                    const int b = __ffs(word) - 1;
                    word &= word - 1;
                    const float wv = unpack1<BF16>(ld_nc_u16(vp++));
#pragma unroll
                    for (int t = 0; t < T; ++t) acc[r][t] = fmaf(wv, xl[t * KT + b * 32], acc[r][t]);
                }
            }
        }
    }
    finish<BF16, T, R>(acc, y, M, N, row0, S);
}

// ---- 2:4 on tensor cores for 2-16 tokens: mma.sp.m16n8k32, the weight as the sparse operand ----
// A block owns 16 output rows; its 8 warps split K in 64-input blocks. Per block a lane loads 16 bytes of
// values from each of its two rows (rows g and g+8, g = lane / 4): the 4 groups of inputs
// 16t..16t+15 (t = lane % 4), in the stored layout. K is permuted inside each 32-input MMA so that these
// registers are the A fragment as they are: MMA 0 takes groups 4j (slot j) and 4j+1 (slot 4+j) of the
// block, MMA 1 groups 4j+2 and 4j+3; x (the B operand, tokens on the N side) is read in the same order,
// and the positions come from a derived (N/16, K/64, 32) table built once per weight (cuda_ops.py):
// lane t's word holds nibble t of the block's four 16-input position words, row g low, row g+8 high,
// which is what sparsity selector 0 (lanes t = 0, 1) and 1 (t = 2, 3) read.
template <bool BF16>
__device__ __forceinline__ void mma_sp(float (&c)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e, int selector) {
    if (BF16) {
        if (selector == 0)
            asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                         "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
        else
            asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                         "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x1;"
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
    } else {
        if (selector == 0)
            asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                         "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
        else
            asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                         "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x1;"
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
    }
}

template <bool BF16, int NT, int R, int W, int U>
__device__ __forceinline__ void mma24(const u16* __restrict__ x, const u16* __restrict__ vals,
                                      const u32* __restrict__ fmeta, u16* __restrict__ y, int M, int N, int K) {
    // R row tiles per block share each x fragment a warp loads (x is re-read from L1 once per 16R rows,
    // which is what limits 16 tokens); W warps split K.
    __shared__ float red[W][R * NT * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, odd = t & 1;
    const int KB = K >> 6;
    const int tiles = (N + 15) >> 4;
    const char* va[R];
    const char* vb[R];
    const u32* mp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int tile = min(blockIdx.x * R + r, tiles - 1);
        va[r] = (const char*)(vals + (size_t)min(tile * 16 + g, N - 1) * (K >> 1)) + t * 16;
        vb[r] = (const char*)(vals + (size_t)min(tile * 16 + g + 8, N - 1) * (K >> 1)) + t * 16;
        mp[r] = fmeta + (size_t)tile * KB * 32 + lane;
    }
    const char* xp[NT];
    bool xok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int token = nt * 8 + g;
        xok[nt] = token < M;
        xp[nt] = (const char*)(x + (size_t)min(token, M - 1) * K) + (t >> 1) * 32;
    }
    float c[R][NT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) c[r][nt][i] = 0.f;
    for (int kb0 = warp; kb0 < KB; kb0 += U * W) {
        u32 ra[U][R][4], rb[U][R][4], e[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int kb = min(kb0 + u * W, KB - 1);
                ld_stream_v4(va[r] + (size_t)kb * 64, ra[u][r]);
                ld_stream_v4(vb[r] + (size_t)kb * 64, rb[u][r]);
                e[u][r] = ld_stream_u32(mp[r] + (size_t)kb * 32);
            }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // Past the end of K the step repeats the last block with zero weights: no branch, so ptxas
            // keeps all the loads in flight ahead of the MMAs.
            const bool live = kb0 + u * W < KB;
            const int kb = min(kb0 + u * W, KB - 1);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                u32 lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0}, lo2[4] = {0, 0, 0, 0}, hi2[4] = {0, 0, 0, 0};
                if (xok[nt]) {
                    const char* p = xp[nt] + (size_t)kb * 128;
                    ld_nc_v4(p, lo);
                    ld_nc_v4(p + 16, hi);
                    ld_nc_v4(p + 64, lo2);
                    ld_nc_v4(p + 80, hi2);
                }
                const u32 b0[4] = {odd ? lo[1] : lo[0], odd ? lo2[1] : lo2[0], odd ? lo[3] : lo[2], odd ? lo2[3] : lo2[2]};
                const u32 b1[4] = {odd ? hi[1] : hi[0], odd ? hi2[1] : hi2[0], odd ? hi[3] : hi[2], odd ? hi2[3] : hi2[2]};
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const u32 z = live ? 0xffffffffu : 0u;
                    const u32 a0[4] = {ra[u][r][0] & z, rb[u][r][0] & z, ra[u][r][1] & z, rb[u][r][1] & z};
                    mma_sp<BF16>(c[r][nt], a0, b0, e[u][r], 0);
                    const u32 a1[4] = {ra[u][r][2] & z, rb[u][r][2] & z, ra[u][r][3] & z, rb[u][r][3] & z};
                    mma_sp<BF16>(c[r][nt], a1, b1, e[u][r], 1);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][(r * NT + nt) * 4 + i][lane] = c[r][nt][i];
    __syncthreads();
    // The W partial sums of each (row, token) are added by W-strided threads of the block.
    for (int j = threadIdx.x; j < R * NT * 4 * 32; j += W * 32) {
        const int l = j & 31, slot = j >> 5, i = slot & 3, nt = (slot >> 2) % NT, r = (slot >> 2) / NT;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) sum += red[w][slot][l];
        const int row = (blockIdx.x * R + r) * 16 + (l >> 2) + (i >> 1) * 8;
        const int token = nt * 8 + 2 * (l & 3) + (i & 1);
        if (row < N && token < M) y[(size_t)token * N + row] = pack1<BF16>(sum);
    }
}

// ---- entry points: <format>_<dtype>_t<tokens>_r<rows per warp group> ----
// The 2:4 kernels ask for at most 2 blocks per SM (<= 128 registers) so that ptxas keeps every load of an
// unrolled step in flight at once instead of trading them for occupancy (it sinks them next to their use).
#define GEMV24(DT, BF, T, R, U)                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                                              \
        gemv24_##DT##_t##T##_r##R(const u16* x, const u16* vals, const u16* meta, u16* y, int M, int N,     \
                                  int K, int S) {                                                            \
        gemv24<BF, T, R, U>(x, vals, meta, y, M, N, K, S);                                                   \
    }
#define GEMVBM(DT, BF, T, R)                                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                 \
        gemvbm_##DT##_t##T##_r##R(const u16* x, const u16* vals, const u32* bits, const int* offs, u16* y,  \
                                  int M, int N, int K, int S) {                                              \
        gemv_bitmap<BF, T, R>(x, vals, bits, offs, y, M, N, K, S);                                           \
    }
#define MMA24(DT, BF, NT, R, W, U)                                                                           \
    extern "C" __global__ void __launch_bounds__(W * 32, W < 32 ? 2 : 1)                                     \
        mma24_##DT##_n##NT##_r##R##_w##W(const u16* x, const u16* vals, const u32* fmeta, u16* y, int M,    \
                                         int N, int K) {                                                     \
        mma24<BF, NT, R, W, U>(x, vals, fmeta, y, M, N, K);                                                  \
    }
#define ALL(DT, BF)                                                                                          \
    MMA24(DT, BF, 1, 1, 8, 4)                                                                                \
    MMA24(DT, BF, 1, 2, 8, 2)                                                                                \
    MMA24(DT, BF, 1, 1, 16, 2)                                                                               \
    MMA24(DT, BF, 2, 1, 8, 4)                                                                                \
    MMA24(DT, BF, 2, 2, 8, 2)                                                                                \
    MMA24(DT, BF, 2, 4, 8, 1)                                                                                \
    MMA24(DT, BF, 2, 1, 16, 2)                                                                               \
    MMA24(DT, BF, 1, 1, 32, 2)                                                                               \
    MMA24(DT, BF, 2, 1, 32, 2)                                                                               \
    GEMV24(DT, BF, 1, 1, 4)                                                                                  \
    GEMV24(DT, BF, 1, 2, 4)                                                                                  \
    GEMV24(DT, BF, 2, 1, 4)                                                                                  \
    GEMV24(DT, BF, 2, 2, 2)                                                                                  \
    GEMV24(DT, BF, 4, 1, 2)                                                                                  \
    GEMV24(DT, BF, 4, 2, 2)                                                                                  \
    GEMV24(DT, BF, 1, 4, 2)                                                                                  \
    GEMV24(DT, BF, 2, 4, 2)                                                                                  \
    GEMV24(DT, BF, 4, 4, 1)                                                                                  \
    GEMVBM(DT, BF, 1, 1)                                                                                     \
    GEMVBM(DT, BF, 1, 2)                                                                                     \
    GEMVBM(DT, BF, 2, 1)                                                                                     \
    GEMVBM(DT, BF, 2, 2)
ALL(f16, false)
ALL(bf16, true)
