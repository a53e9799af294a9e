// Helpers every kernel source shares (sparse_gemv.cu, sparse48.cu): halves travel as 16-bit integers and are
// converted with inline PTX, so no CUDA header is needed; NVRTC receives this file as an in-memory header
// (kernels/cuda_ops.py), nvcc finds it beside the sources.
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
