// Helpers every kernel source shares (sparse_gemv.cu, sparse48.cu, sparse816.cu, banded.cu, sparse24_wgmma.cu, nm_tc.cu):
// halves travel as 16-bit integers and are converted with inline PTX, so no CUDA header is needed; NVRTC receives
// this file as an in-memory header (kernels/cuda_ops.py), nvcc finds it beside the sources.
#pragma once
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned char u8;

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
__device__ __forceinline__ u32 ld_stream_u8(const void* p) {
    u32 v;
    asm("ld.global.cs.u8 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 ld_stream_u32(const void* p) {
    u32 v;
    asm("ld.global.cs.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned long long ld_stream_u64(const void* p) {
    unsigned long long v;
    asm("ld.global.cs.u64 %0, [%1];" : "=l"(v) : "l"(p));
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

// ---- shared-memory staging for the tensor-core kernels (sparse_gemv.cu's GEMM, sparse24_wgmma.cu, nm_tc.cu) ----
// The 32-bit shared-memory address cp.async, ldmatrix and wgmma descriptors take, of a generic pointer.
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
// Asynchronous global -> shared copies: 16 bytes past L1 (streamed tiles), 8 bytes through it.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async8(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src));
}

// ---- the N:M GEMV loop every stored N:M format shares (sparse_gemv.cu's 2:4, sparse48.cu, sparse816.cu):
// y (M, N) = x (M, K) @ W.T for M = 1-4 activation rows, W stored as values (N, K/2) in column order plus
// position tables. A format is a policy F: F::Tables (the tables' base pointers), F::Row (one row's pointers
// into them), F::Meta (the positions of one 16-input step), F::row(tables, n, K), F::load(row, j) (step j's
// positions, evict-first) and F::step<BF16, T>(acc, v, meta, xv): the eight stored values v of a step against
// xv[t][q] = the 8 inputs of its group q (two 16-byte registers' worth) of token t.
//
// Lanes stride along K by 16-input steps (consecutive lanes read consecutive 16-byte value vectors, so every
// load of a warp is one contiguous 512-byte run); each lane issues the loads of U steps per row before using
// any, so enough bytes are in flight to cover memory latency. Work split: a block of 8 warps; S warps share R
// output rows and split K between them (S > 1 for narrow shapes such as a 1024-row k/v projection, so every
// SM has enough loads in flight); their partial sums meet in shared memory. Rows past N and tokens past M are
// computed on clamped (valid) addresses, never stored.
template <bool BF16, int T>
__device__ __forceinline__ void load_x16(const char* const (&xp)[T], size_t j, u32 (&xv)[T][2][4]) {
#pragma unroll
    for (int t = 0; t < T; ++t) {
        ld_nc_v4(xp[t] + j * 32, xv[t][0]);
        ld_nc_v4(xp[t] + j * 32 + 16, xv[t][1]);
    }
}

template <class F, bool BF16, int T, int R, int U>
__device__ __forceinline__ void gemv_nm(const u16* __restrict__ x, const u16* __restrict__ vals,
                                        const typename F::Tables tables, u16* __restrict__ y, int M, int N,
                                        int K, int S) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = warp / S, s = warp % S;
    const int row0 = (blockIdx.x * (WARPS / S) + g) * R;
    const int W = K >> 4;
    const char* vp[R];
    typename F::Row mp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const size_t n = (size_t)min(row0 + r, N - 1);
        vp[r] = (const char*)(vals + n * (K >> 1));
        mp[r] = F::row(tables, n, K);
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
        u32 v[U][R][4];
        typename F::Meta m[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const size_t jj = j + u * stride;
                ld_stream_v4(vp[r] + jj * 16, v[u][r]);
                m[u][r] = F::load(mp[r], jj);
            }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            u32 xv[T][2][4];
            load_x16<BF16, T>(xp, j + u * stride, xv);
#pragma unroll
            for (int r = 0; r < R; ++r) F::template step<BF16, T>(acc[r], v[u][r], m[u][r], xv);
        }
    }
    for (; j < W; j += stride) {
        u32 xv[T][2][4];
        load_x16<BF16, T>(xp, j, xv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            u32 v[4];
            ld_stream_v4(vp[r] + (size_t)j * 16, v);
            F::template step<BF16, T>(acc[r], v, F::load(mp[r], j), xv);
        }
    }
    finish<BF16, T, R>(acc, y, M, N, row0, S);
}
