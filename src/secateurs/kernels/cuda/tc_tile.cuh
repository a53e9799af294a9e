// The tensor-core engine of "load as sparse, compute as dense" at 5-64 tokens, shared by every stored format that
// has such a kernel (nm_tc.cu: 4:8 and 8:16; bitmap_tc.cu: unstructured). y (M, N) = x (M, K) @ W.T with W read
// in its stored layout, expanded by the format into a dense shared-memory tile, then multiplied by dense
// mma.sync.m16n8k16 (fp16 or bf16 in, fp32 accumulate). Everything here is independent of the format; a format is
// a policy F (below) that loads one unit of its stored tensors and writes it, dense, into the tile. NVRTC receives
// this file as an in-memory header like common.cuh (kernels/cuda_ops.py: HEADERS); nvcc finds it beside the sources.
//
// Work split: a block of 4 warps owns 64 output features (warp w: features 16w..16w+15, every token of the block's
// tile), TN tokens (16, 32 or 64: x^T is the B operand, tokens on the N side, TN / 8 n8 tiles) and a K-slice of
// whole 64-input stages (split-K: S blocks share a feature tile; each writes fp32 partial sums to its own slice of a
// workspace and tcsum adds them in a fixed order, so the result is deterministic; with S = 1 the block stores y).
// Block b: feature tile b % tiles, split (b / tiles) % S, token tile b / (tiles * S).
//
// Per stage (64 inputs) a thread owns two units, (feature row, 16-input chunk) each: F::load reads a unit's stored
// bytes into registers, F::store writes its 16 dense halves as the two 16-byte chunks of its tile row. The tile is
// 64 features x 128 bytes; 16-byte chunk c of row r sits at chunk c ^ (r & 7), so the eight rows an ldmatrix phase
// reads (rows r..r+7, one logical chunk) and the rows a quarter-warp stores fall in distinct bank groups. x goes to
// its own tile (TN tokens x 128 bytes, the same swizzle) by cp.async, zero-filled for tokens past M and inputs past
// K. Two buffers of each: the next stage's units are in registers and its x in flight while the warps multiply the
// current one. Rows past N load a clamped (valid) address, are stored as zeros and never written to y.
//
// Fragments (PTX ISA, m16n8k16, lane = 4g + t): A (W, row-major 16 x 16) a0 = row g cols 2t, 2t+1; a1 = row g+8;
// a2 = row g cols 2t+8, 2t+9; a3 = row g+8 cols 2t+8, 2t+9: one ldmatrix.x4 whose matrices are (rows 0-7, cols 0-7),
// (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15). B (x^T, k x n, read from x's token rows)
// b0 = k 2t, 2t+1 of token g; b1 = k 2t+8, 2t+9: one ldmatrix.x4 over one token tile's inputs 0-31 (or 32-63) gives
// the B fragments of two k16 steps. C: c0, c1 = row g tokens 2t, 2t+1; c2, c3 = row g+8.
//
// The format policy F (every value array is u16 halves, passed to the engine as vals):
//   F::Tables                            the format's other stored tensors (and sizes), passed to the kernel by value;
//   F::Unit                              what one unit keeps in registers between its load and its store;
//   F::first(vals, tables, row, K, j, u) before the first load of a K-slice: what load(j) needs ahead of it (a
//                                        format that reads its positions a stage early starts that chain here);
//   F::load(vals, tables, row, K, j, u)  unit (row, chunk j) into u: loads whose results are not used yet (they
//                                        arrive while the warps multiply the current stage);
//   F::store(u, z, at, r, c)             the unit's 16 dense halves into tile row r, chunks 2c (inputs 0-7) and
//                                        2c + 1 (8-15), of the tile at shared address at (tc_at gives the swizzled
//                                        place); z = 0 (a row past N) stores zeros, z = ~0 the weights.
#pragma once
#include "common.cuh"

#define TC_THREADS 128
#define TC_ROWS 64  // output features per block

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

// ---- the engine's pieces, shared by its two loops (tc_gemm, tc_gemm_ring) ----
// x's stage kb (TN tokens x 64 inputs) into buffer buf of its tile by cp.async, one commit group
template <int TN>
__device__ __forceinline__ void tc_load_x(const u16* __restrict__ x, u32 base_x, int buf, int kb, int tid, int tok0,
                                          int M, int K) {
    constexpr int XU = TN * 8 / TC_THREADS;
#pragma unroll
    for (int i = 0; i < XU; ++i) {
        const int idx = tid + TC_THREADS * i, r = idx >> 3, cx = idx & 7;
        const int token = tok0 + r, input = kb * 64 + cx * 8;
        const bool ok = token < M && input < K;
        const u16* src = x + (size_t)min(token, M - 1) * K + (ok ? input : 0);
        tc_cp_async16(base_x + buf * (TN * 128) + tc_at(r, cx), src, ok ? 16u : 0u);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// one stage's four k16 steps of this warp: acc += the weight tile at aw (its 16 features) x the x tile at ax
template <bool BF16, int NT>
__device__ __forceinline__ void tc_mma_stage(float (&acc)[NT][4], u32 aw, u32 ax, int ra, int ca, int rb, int cb) {
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

// the warp's sums: into y (S = 1) or split s's fp32 slice of work
template <bool BF16, int NT>
__device__ __forceinline__ void tc_store_y(const float (&acc)[NT][4], u16* __restrict__ y, float* __restrict__ work,
                                           int row0, int warp, int g, int t, int tok0, int M, int N, int S, int s) {
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

// The block's place in the launch (blockIdx.x = row tile + tiles (split + S token tile)): its first output row and
// token, its split and that split's K-slice [kb_begin, kb_end) of 64-input stages (chunks = K / 16 a row); the two
// loops split a launch the same way, the way the host sizes the grid and tcsum adds the splits' slices.
template <int TN>
__device__ __forceinline__ void tc_place(int N, int K, int S, int& first_row, int& first_token, int& split, int& chunks,
                                         int& kb_begin, int& kb_end) {
    const int tiles = (N + TC_ROWS - 1) / TC_ROWS;
    const int tile = blockIdx.x % tiles, rest = blockIdx.x / tiles, s = rest % S, tt = rest / S;
    split = s;
    first_row = tile * TC_ROWS;
    first_token = tt * TN;
    chunks = K >> 4;
    const int KB = (chunks + 3) >> 2;
    const int kb0 = (int)((long long)s * KB / S), kb1 = (int)((long long)(s + 1) * KB / S);
    kb_begin = kb0;
    kb_end = kb1;
}

// unit i of thread tid: tile row r = (tid + 128 i) / 4 (chunk tid % 4 of each stage); rows past N read row N - 1
// (live false: stored as zeros)
template <int UNITS>
__device__ __forceinline__ void tc_unit_rows(int tid, int row0, int N, size_t (&vrow)[UNITS], bool (&live)[UNITS]) {
#pragma unroll
    for (int i = 0; i < UNITS; ++i) {
        const int r = (tid + TC_THREADS * i) >> 2;
        live[i] = row0 + r < N;
        vrow[i] = (size_t)min(row0 + r, N - 1);
    }
}

// the warp's NT 8-token accumulators, zeroed before a K-slice (both loops start from 0)
template <int NT>
__device__ __forceinline__ void tc_zero(float (&acc)[NT][4]) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[n][q] = 0.f;
}

// ---- the engine: one loop, F's load and store per (row, 16-input chunk) unit ----
template <class F, bool BF16, int TN>
__device__ __forceinline__ void tc_gemm(const u16* __restrict__ x, const u16* __restrict__ vals,
                                        const typename F::Tables tables, u16* __restrict__ y, float* __restrict__ work,
                                        int M, int N, int K, int S) {
    constexpr int NT = TN / 8, UNITS = TC_ROWS * 4 / TC_THREADS;
    __shared__ __align__(128) u16 sw[2][TC_ROWS * 64];
    __shared__ __align__(128) u16 sx[2][TN * 64];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    int row0, tok0, s, W, kb0, kb1;
    tc_place<TN>(N, K, S, row0, tok0, s, W, kb0, kb1);
    const u32 base_w = smem_u32(sw), base_x = smem_u32(sx);

    const int c = tid & 3;
    size_t vrow[UNITS];
    bool live[UNITS];
    tc_unit_rows(tid, row0, N, vrow, live);
    typename F::Unit unit[UNITS];
    auto load_w = [&](int kb) {
#pragma unroll
        for (int i = 0; i < UNITS; ++i) F::load(vals, tables, vrow[i], K, min(kb * 4 + c, W - 1), unit[i]);
    };
    auto store_w = [&](int buf, int kb) {
#pragma unroll
        for (int i = 0; i < UNITS; ++i) {
            const u32 z = (live[i] && kb * 4 + c < W) ? 0xffffffffu : 0u;
            const int r = (tid + TC_THREADS * i) >> 2;
            const u32 at = base_w + buf * (TC_ROWS * 128);
            F::store(unit[i], z, at, r, c);
        }
    };

    float acc[NT][4];
    tc_zero(acc);

    if (kb0 < kb1) {
#pragma unroll
        for (int i = 0; i < UNITS; ++i) F::first(vals, tables, vrow[i], K, min(kb0 * 4 + c, W - 1), unit[i]);
        load_w(kb0);
        tc_load_x<TN>(x, base_x, 0, kb0, tid, tok0, M, K);
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
            tc_load_x<TN>(x, base_x, cur ^ 1, kb + 1, tid, tok0, M, K);
        }
        tc_mma_stage<BF16, NT>(acc, base_w + cur * (TC_ROWS * 128), base_x + cur * (TN * 128), ra, ca, rb, cb);
    }
    tc_store_y<BF16, NT>(acc, y, work, row0, warp, g, t, tok0, M, N, S, s);
}

// ---- the ring engine (matched float64 on an H100): tc_gemm's tiles, fragments, split-K and stores, with D
// stages of units in registers. tc_gemm issues stage kb + 1's loads after stage kb's barrier and decodes them right
// after stage kb's MMAs (8-32 a warp at 16-64 tokens): in its sm_90 SASS each load is first read 34-218 instructions
// after it is issued, one stage (64 rows x 64 inputs: 4,864 stored 4:8 bytes) is in flight per block, and a K-slice
// runs load latency + decode per stage. Here
// stage k + D - 1 is loaded before stage k is decoded, into the slot stage k - 1 left (slot = stage index % D from
// the slice's first stage; the loop is unrolled D times so a slot is a register set, not an indexed array): D - 1
// stages in flight per block, each load first read D - 1 stages of decode and MMA after it is issued. Each slot is
// a unit of its own, so F::load must need nothing an earlier load left in the unit (true of nm_tc.cu's TcNm, whose
// F::first is empty; a format that chains its loads, like bitmap_tc.cu's, cannot use this loop as it is).
template <class F, bool BF16, int TN, int D>
__device__ __forceinline__ void tc_gemm_ring(const u16* __restrict__ x, const u16* __restrict__ vals,
                                             const typename F::Tables tables, u16* __restrict__ y,
                                             float* __restrict__ work, int M, int N, int K, int S) {
    constexpr int NT = TN / 8, UNITS = TC_ROWS * 4 / TC_THREADS;
    __shared__ __align__(128) u16 sw[2][TC_ROWS * 64];
    __shared__ __align__(128) u16 sx[2][TN * 64];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    int row0, tok0, s, W, kb0, kb1;
    tc_place<TN>(N, K, S, row0, tok0, s, W, kb0, kb1);
    const u32 base_w = smem_u32(sw), base_x = smem_u32(sx);

    const int c = tid & 3;
    size_t vrow[UNITS];
    bool live[UNITS];
    tc_unit_rows(tid, row0, N, vrow, live);
    typename F::Unit ring[D][UNITS];
    auto load_w = [&](typename F::Unit (&unit)[UNITS], int kb) {
#pragma unroll
        for (int i = 0; i < UNITS; ++i) F::load(vals, tables, vrow[i], K, min(kb * 4 + c, W - 1), unit[i]);
    };
    auto store_w = [&](const typename F::Unit (&unit)[UNITS], int buf, int kb) {
#pragma unroll
        for (int i = 0; i < UNITS; ++i) {
            const u32 z = (live[i] && kb * 4 + c < W) ? 0xffffffffu : 0u;
            const int r = (tid + TC_THREADS * i) >> 2;
            F::store(unit[i], z, base_w + buf * (TC_ROWS * 128), r, c);
        }
    };

    float acc[NT][4];
    tc_zero(acc);

    if (kb0 < kb1) {
#pragma unroll
        for (int i = 0; i < UNITS; ++i) F::first(vals, tables, vrow[i], K, min(kb0 * 4 + c, W - 1), ring[0][i]);
#pragma unroll
        for (int p = 0; p < D - 1; ++p)  // stages kb0 .. kb0 + D - 2 into slots 0 .. D - 2
            if (kb0 + p < kb1) load_w(ring[p], kb0 + p);
        tc_load_x<TN>(x, base_x, 0, kb0, tid, tok0, M, K);
    }
    const int ra = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ca = lane >> 4;
    const int rb = lane & 7, cb = lane >> 3;
    for (int kb = kb0; kb < kb1; kb += D) {
#pragma unroll
        for (int q = 0; q < D; ++q) {  // stage k = kb + q sits in slot q
            const int k = kb + q, cur = (k - kb0) & 1;
            if (k < kb1) {
                if (k + D - 1 < kb1) load_w(ring[(q + D - 1) % D], k + D - 1);  // the slot stage k - 1 left
                store_w(ring[q], cur, k);  // this tile buffer was last read two stages ago, before the last barrier
                asm volatile("cp.async.wait_group 0;" ::: "memory");
                __syncthreads();
                if (k + 1 < kb1) tc_load_x<TN>(x, base_x, cur ^ 1, k + 1, tid, tok0, M, K);
                tc_mma_stage<BF16, NT>(acc, base_w + cur * (TC_ROWS * 128), base_x + cur * (TN * 128), ra, ca, rb,
                                       cb);
            }
        }
    }
    tc_store_y<BF16, NT>(acc, y, work, row0, warp, g, t, tok0, M, N, S, s);
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

// tcsum_<dtype>: every module built on this engine has its own (a module is compiled and loaded alone)
#define TCSUM(DT, BF)                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) tcsum_##DT(const float* work, u16* y, int count, \
                                                                        int S) {                             \
        tc_sum<BF>(work, y, count, S);                                                                       \
    }
