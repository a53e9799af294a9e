// Sparse kernels for decode: y (M, N) = x (M, K) @ W.T with W held compressed (kernels/formats.py),
// M = 1-16 activation rows: a 2:4 GEMV and a bitmap GEMV on the CUDA cores, a 2:4 kernel on tensor cores.
// Compiled at run time by NVRTC (kernels/cuda_ops.py); the loads, conversions, the split-K ending and the N:M
// GEMV loop (gemv_nm, which the 2:4 GEMV shares with sparse48.cu and sparse816.cu) are in common.cuh (no CUDA
// header needed).
//
// Both kernels are memory-bound: they read each compressed weight byte once, with as few instructions
// per byte as the format allows, because a Hopper SM receives 13-18 bytes from memory per clock.
//
// Work split (the two GEMVs): a block of 8 warps; S warps share R output rows and split K between them
// (S > 1 for narrow shapes such as a 1024-row k/v projection, so every SM has enough loads in flight),
// their partial sums meet in shared memory. Rows past N and tokens past M are computed on clamped
// (valid) addresses and never stored.

#include "common.cuh"

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

// The format's policy for common.cuh's gemv_nm (the row split and loop the 4:8 and 8:16 GEMVs share): per
// 16-input step one 16-bit word of positions.
struct Fmt24 {
    using Tables = const u16*;
    using Row = const char*;
    using Meta = u32;
    static __device__ __forceinline__ Row row(Tables meta, size_t n, int K) { return (const char*)(meta + n * (K >> 4)); }
    static __device__ __forceinline__ Meta load(Row r, size_t j) { return ld_stream_u16(r + j * 2); }
    template <bool BF16, int T>
    static __device__ __forceinline__ void step(float (&acc)[T], const u32 (&v)[4], Meta m, const u32 (&xv)[T][2][4]) {
        step24<BF16, T>(acc, v, m, xv);
    }
};

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

// ---- 2:4 on tensor cores for 1-32 tokens: mma.sp.m16n8k32, the weight as the sparse operand ----
// A block owns 16 output rows; its warps split K in 64-input blocks. Per block a lane loads 16 bytes of
// values from each of its two rows (rows g and g+8, g = lane / 4): the 4 groups of inputs
// 16t..16t+15 (t = lane % 4), in the stored layout. K is permuted inside each 32-input MMA so that these
// registers are the A fragment as they are: MMA 0 takes groups 4j (slot j) and 4j+1 (slot 4+j) of the
// block, MMA 1 groups 4j+2 and 4j+3; x (the B operand, tokens on the N side) is read in the same order.
// The positions are read from the stored table itself (one table in memory): the 8 bytes of each of the
// two rows for the block (four 16-input words), from which lane t takes nibble t of every word (meta24_word),
// row g low, row g+8 high: what sparsity selector 0 (lanes t = 0, 1) and 1 (t = 2, 3) read.
// One mma.sp.m16n8k32 (fp32 accumulate) on input type TY under sparsity selector SEL (an immediate).
#define MMA_SP(TY, SEL)                                                                                      \
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, " \
                 "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, " SEL ";"                               \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                             \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e))
template <bool BF16>
__device__ __forceinline__ void mma_sp(float (&c)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e, int selector) {
    if (BF16) {
        if (selector == 0) MMA_SP("bf16", "0x0");
        else MMA_SP("bf16", "0x1");
    } else {
        if (selector == 0) MMA_SP("f16", "0x0");
        else MMA_SP("f16", "0x1");
    }
}
#undef MMA_SP

__device__ __forceinline__ void ld_nc_v2(const void* p, u32& a, u32& b) {
    asm("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

// Nibble t of each of a row's four 16-bit position words (lo = words 0, 1; hi = words 2, 3) gathered into
// bytes 0 and 2 of the result (word j's nibble at bit 4j of the 16 bits those two bytes form).
__device__ __forceinline__ u32 meta24_nibbles(u32 lo, u32 hi, int t) {
    u32 v = __byte_perm(lo, hi, (u32)(t >> 1) * 0x1111u + 0x6420u);  // byte j: the byte of word j holding nibble t
    v = (v >> (4 * (t & 1))) & 0x0f0f0f0fu;                          // byte j: nibble t of word j
    return v | (v >> 4);                                              // bytes 0, 2: words 0-1, 2-3
}
// The metadata register of lane t for one 64-input block: row g's 16 bits low, row g+8's high.
__device__ __forceinline__ u32 meta24_word(const char* row_g, const char* row_g8, int t) {
    u32 a0, a1, b0, b1;
    ld_nc_v2(row_g, a0, a1);
    ld_nc_v2(row_g8, b0, b1);
    return __byte_perm(meta24_nibbles(a0, a1, t), meta24_nibbles(b0, b1, t), 0x6420u);
}

// The R x NT MMA accumulators of mma24 and wide24, zeroed before their K loops.
template <int R, int NT>
__device__ __forceinline__ void mma24_zero(float (&c)[R][NT][4]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) c[r][nt][i] = 0.f;
}

template <bool BF16, int NT, int R, int W, int U>
__device__ __forceinline__ void mma24(const u16* __restrict__ x, const u16* __restrict__ vals,
                                      const u8* __restrict__ meta, u16* __restrict__ y, int M, int N, int K) {
    // R row tiles per block share each x fragment a warp loads (x is re-read from L1 once per 16R rows,
    // which is what limits 16 tokens); W warps split K.
    __shared__ float red[W][R * NT * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, odd = t & 1;
    const int KB = K >> 6;
    const int tiles = (N + 15) >> 4;
    const char* va[R];
    const char* vb[R];
    const char* ma[R];
    const char* mb[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int tile = min(blockIdx.x * R + r, tiles - 1);
        const size_t rg = min(tile * 16 + g, N - 1), rg8 = min(tile * 16 + g + 8, N - 1);
        va[r] = (const char*)(vals + rg * (K >> 1)) + t * 16;
        vb[r] = (const char*)(vals + rg8 * (K >> 1)) + t * 16;
        ma[r] = (const char*)(meta + rg * (K >> 3));
        mb[r] = (const char*)(meta + rg8 * (K >> 3));
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
    mma24_zero(c);
    for (int kb0 = warp; kb0 < KB; kb0 += U * W) {
        u32 ra[U][R][4], rb[U][R][4], e[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int kb = min(kb0 + u * W, KB - 1);
                ld_stream_v4(va[r] + (size_t)kb * 64, ra[u][r]);
                ld_stream_v4(vb[r] + (size_t)kb * 64, rb[u][r]);
                e[u][r] = meta24_word(ma[r] + (size_t)kb * 8, mb[r] + (size_t)kb * 8, t);
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

// ---- 2:4 GEMM for prompts (32-8192 tokens): block tiles over (output features x tokens) ----
// mma.sp.m16n8k32 with the weight as the sparse A operand and tokens on the N side, reading the stored
// values and positions directly: no copy, no derived table. K runs in natural order in 64-input stages (two
// 32-input MMAs, sparsity selector 0 then 1), so that:
//  - A fragments come from the stored values by one ldmatrix.x4 per 16 rows and MMA (compressed columns
//    2t, 2t+1 of row g are the two kept values of group t);
//  - B fragments come from the activation tile (tokens x inputs, row-major as x is) by one ldmatrix.x4 per
//    8 tokens and MMA;
//  - the metadata register of lane (g, t) is the stored 16-bit position word t of the stage for row g (low)
//    and row g+8 (high): lanes t = 0, 1 give selector 0's (MMA 0: inputs 0-31), lanes 2, 3 selector 1's.
// A ring of STAGES shared-memory stages is filled by cp.async (values 16 bytes, positions 8 bytes, x 16
// bytes a copy) while the warps multiply the oldest one. Value rows (64 bytes a stage) and x rows (128
// bytes) are XOR-swizzled by 16-byte chunk, so the eight 16-byte rows an ldmatrix phase reads sit in
// distinct banks. Rows past N and tokens past M load clamped (valid) addresses and are never stored.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <bool BF16, int BM, int BN, int WM, int WN, int STAGES>
__device__ __forceinline__ void gemm24(const u16* __restrict__ x, const u16* __restrict__ vals,
                                       const u8* __restrict__ meta, u16* __restrict__ y, int M, int N, int K) {
    constexpr int THREADS = WM * WN * 32;
    constexpr int MT = BM / WM / 16, NT = BN / WN / 8;  // 16-row and 8-token tiles of a warp
    constexpr int A_BYTES = BM * 64, E_BYTES = BM * 8, B_BYTES = BN * 128;
    constexpr int STAGE_BYTES = A_BYTES + E_BYTES + B_BYTES;
    extern __shared__ __align__(128) unsigned char smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp % WM, wn = warp / WM;
    // Blocks walk token tiles inside groups of GROUP feature tiles, so the blocks in flight share weight tiles.
    constexpr int GROUP = 8;
    const int ftiles = (N + BM - 1) / BM, ttiles = (M + BN - 1) / BN;
    const int pid = blockIdx.x, per_group = GROUP * ttiles;
    const int first = (pid / per_group) * GROUP, size = min(GROUP, ftiles - first);
    const int ft = first + (pid % per_group) % size, tt = (pid % per_group) / size;
    const int row0 = ft * BM, tok0 = tt * BN;
    const int KB = K >> 6;
    const u32 base = smem_u32(smem);

    // What each thread copies per stage: value chunks (BM rows x 4), position rows (BM x 8 bytes), x chunks (BN x 8).
    auto load = [&](int slot, int kb) {
        const u32 sa = base + slot * STAGE_BYTES, se = sa + A_BYTES, sb = se + E_BYTES;
#pragma unroll
        for (int i = threadIdx.x; i < BM * 4; i += THREADS) {
            const int r = i >> 2, c = i & 3;
            const size_t row = min(row0 + r, N - 1);
            cp_async16(sa + r * 64 + ((c ^ ((r >> 1) & 3)) << 4), (const char*)vals + row * K + kb * 64 + c * 16);
        }
#pragma unroll
        for (int r = threadIdx.x; r < BM; r += THREADS) {
            const size_t row = min(row0 + r, N - 1);
            cp_async8(se + r * 8, meta + row * (K >> 3) + kb * 8);
        }
#pragma unroll
        for (int i = threadIdx.x; i < BN * 8; i += THREADS) {
            const int r = i >> 3, c = i & 7;
            const size_t tok = min(tok0 + r, M - 1);
            cp_async16(sb + r * 128 + ((c ^ (r & 7)) << 4), (const char*)x + tok * K * 2 + kb * 128 + c * 16);
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KB) load(s, s);
        cp_async_commit();
    }
    // ldmatrix row addresses of this lane (matrix lane >> 3, its row lane & 7), relative to a stage.
    const int mat = lane >> 3, mrow = lane & 7;
    for (int kb = 0; kb < KB; ++kb) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {  // refill the slot every warp finished with at the previous step
            const int next = kb + STAGES - 1;
            if (next < KB) load(next % STAGES, next);
            cp_async_commit();
        }
        const int slot = kb % STAGES;
        const u32 sa = base + slot * STAGE_BYTES, sb = sa + A_BYTES + E_BYTES;
        const u16* se = (const u16*)(smem + slot * STAGE_BYTES + A_BYTES);
        u32 e[MT];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const int r = wm * (MT * 16) + i * 16 + g;
            e[i] = (u32)se[r * 4 + t] | ((u32)se[(r + 8) * 4 + t] << 16);
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            u32 a[MT][4], b[NT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int r = wm * (MT * 16) + i * 16 + mrow + ((mat & 1) << 3);
                const int chunk = 2 * c + (mat >> 1);
                ldmatrix_x4(a[i], sa + r * 64 + ((chunk ^ ((r >> 1) & 3)) << 4));
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int r = wn * (NT * 8) + j * 8 + mrow;
                const int chunk = 4 * c + mat;
                ldmatrix_x4(b[j], sb + r * 128 + ((chunk ^ (r & 7)) << 4));
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_sp<BF16>(acc[i][j], a[i], b[j], e[i], c);
        }
    }
    cp_async_wait<0>();
    // acc[i][j]: rows (g, g+8) of 16-row tile i, tokens (2t, 2t+1) of 8-token tile j.
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int r = row0 + wm * (MT * 16) + i * 16 + g;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int tok = tok0 + wn * (NT * 8) + j * 8 + 2 * t;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int row = r + (q >> 1) * 8, token = tok + (q & 1);
                if (row < N && token < M) y[(size_t)token * N + row] = pack1<BF16>(acc[i][j][q]);
            }
        }
    }
}

// ---- 2:4 on tensor cores for 17-64 tokens (wide24): every SM streams weights, x staged in shared memory ----
// Why beside mma24: at four 8-token tiles mma24 (the kernel picked at 32 rows on an H100, where the batch-32 linears
// read 1.34 TB/s) keeps one 64-input step of weights in flight per warp (its SASS uses each step's loads within 2 MMAs
// and issues the next step's only after the loop's back edge; its accumulators and x registers leave no room for
// more): 16 warps x 2.3 KB = 37 KB in flight per SM, half of what its 8-token form keeps (32 warps x 2 steps x 1.15 KB),
// while every warp also re-reads x from L1 by 16 16-byte loads a step, each touching 8 token rows. Here:
//  - weights go from memory into registers in mma24's fragment layout (lane (g, t) loads the 16 bytes of inputs
//    16t..16t+15 of rows g and g+8 of each of its R 16-row tiles per 64-input step, and both rows' 8 position bytes,
//    made into its metadata register by meta24_nibbles as mma24 does), U steps ahead: step kb + WK U is loaded into
//    step kb's registers right after step kb's MMAs (ptxas may issue some later; tests/test_mma24_wide.py checks in
//    the SASS that every weight load is issued 5 MMAs or more before its first use), so every warp keeps loads in
//    flight through its compute phase;
//  - x goes to shared memory by cp.async (8 bytes a copy, zero-filled for tokens past M and steps past the block's
//    K-slice), double-buffered, one slot
//    holding U steps of each of the block's WK K-groups, shared by the WR warps of a K-group. A step's x tile is TN
//    token rows of 128 bytes; 16-byte chunk c = 2 sigma + j of a row holds the 4-input groups 8j + sigma and 8j + 4 +
//    sigma (bytes 0-7, 8-15), at chunk c ^ (row & 7). One ldmatrix.x4 over chunks 0-3 (4-7) of an 8-token tile then
//    gives lane (g, t) exactly mma24's B fragment of MMA 0 (MMA 1): word t of chunk 2 sigma + j is word t & 1 of group
//    8j + 4 (t >> 1) + sigma, the inputs mma24 reads from global memory for b[2 (sigma & 1) + j]; the eight rows of a
//    phase fall in distinct bank groups;
//  - K is split twice: the WK K-groups of a block take interleaved runs of U steps of the block's K-slice and meet in
//    shared memory at the end in K-group order; the S blocks of a row tile (split-K over blocks, enough to give every
//    SM blocks to run on narrow weights) write fp32 partial sums to their slice of a workspace (S, M, N), and the last
//    of them to finish (a per-tile counter, incremented after a fence, then reset to 0 for the next launch) adds the
//    S slices in split order and stores y: no second kernel, and both sums in a fixed order, so the result is
//    deterministic whichever block finishes last. The counters are one buffer shared by every launch on the stream.
// Block b: row tile b % tiles (WR R 16 rows), split b / tiles. Rows past N load a clamped (valid) row, never stored.

__device__ __forceinline__ void wide_cp_async8(u32 dst, const void* src, u32 bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// Another block's partial sum, read from L2 (its writes are not in this SM's L1).
__device__ __forceinline__ float wide_ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
}
// The split-K hand-over in inline PTX (no CUDA header): a device-wide fence, and a tile counter's old value after +1.
__device__ __forceinline__ void wide_fence() { asm volatile("membar.gl;" ::: "memory"); }
__device__ __forceinline__ u32 wide_arrive(unsigned* p) {
    u32 old;
    asm volatile("atom.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
    return old;
}
// Byte offset of the 4-input group gi (inputs 4 gi..4 gi + 3 of a 64-input step) of token row r in a step's x tile.
__device__ __forceinline__ u32 wide_x_at(int r, int gi) {
    const int c = 2 * (gi & 3) + (gi >> 3);
    return (u32)(r * 128 + ((c ^ (r & 7)) << 4) + ((gi >> 2) & 1) * 8);
}

template <bool BF16, int NT, int R, int WR, int WK, int U>
__device__ __forceinline__ void wide24(const u16* __restrict__ x, const u16* __restrict__ vals,
                                       const u8* __restrict__ meta, u16* __restrict__ y, float* __restrict__ work,
                                       unsigned* __restrict__ count, int M, int N, int K, int S) {
    constexpr int TN = NT * 8, THREADS = WR * WK * 32;
    constexpr int STEP_X = TN * 128;       // bytes of one step's x tile
    constexpr int SLOT = WK * U * STEP_X;  // one buffer: U steps of every K-group
    extern __shared__ __align__(128) unsigned char wide_smem[];
    const u32 base = smem_u32(wide_smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int q = warp / WR, rw = warp % WR;
    const int tiles = (N + WR * R * 16 - 1) / (WR * R * 16);
    const int tile = blockIdx.x % tiles, s = blockIdx.x / tiles;
    const int KB = K >> 6;
    const int kb0 = (int)((long long)s * KB / S), kb1 = (int)((long long)(s + 1) * KB / S);
    const int iters = (kb1 - kb0 + WK * U - 1) / (WK * U);
    const int row0 = (tile * WR + rw) * R * 16;
    const char* va[R];
    const char* vb[R];
    const char* ma[R];
    const char* mb[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const size_t rg = min(row0 + r * 16 + g, N - 1), rg8 = min(row0 + r * 16 + g + 8, N - 1);
        va[r] = (const char*)(vals + rg * (K >> 1)) + t * 16;
        vb[r] = (const char*)(vals + rg8 * (K >> 1)) + t * 16;
        ma[r] = (const char*)(meta + rg * (K >> 3));
        mb[r] = (const char*)(meta + rg8 * (K >> 3));
    }
    u32 wa[U][R][4], wb[U][R][4], ea[U][R][2], eb[U][R][2];
    auto load_w = [&](int u, int kb) {  // step kb (clamped into the slice) into register set u
        const size_t k = (size_t)min(kb, kb1 - 1);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            ld_stream_v4(va[r] + k * 64, wa[u][r]);
            ld_stream_v4(vb[r] + k * 64, wb[u][r]);
            ld_nc_v2(ma[r] + k * 8, ea[u][r][0], ea[u][r][1]);
            ld_nc_v2(mb[r] + k * 8, eb[u][r][0], eb[u][r][1]);
        }
    };
    // x copies: 16 threads a token row (thread % 16 copies 4-input group gi of each step), THREADS / 16 rows at once,
    // so a thread copies rows r_0 + RT jr of every step of the slot.
    constexpr int RT = THREADS / 16, RJ = TN / RT;
    const int gi = threadIdx.x & 15, r_0 = threadIdx.x >> 4;
    const u16* xrow[RJ];
    u32 xdst[RJ], xlen[RJ];
#pragma unroll
    for (int jr = 0; jr < RJ; ++jr) {
        const int r = r_0 + RT * jr;
        xrow[jr] = x + (size_t)min(r, M - 1) * K + gi * 4;
        xdst[jr] = base + wide_x_at(r, gi);
        xlen[jr] = r < M ? 8u : 0u;
    }
    auto load_x = [&](int buf, int i) {  // iteration i's x: K-group qq's step u (qu = qq U + u) is step kb0 + i WK U + qu
#pragma unroll
        for (int qu = 0; qu < WK * U; ++qu) {
            const int kb = kb0 + i * WK * U + qu;
            const size_t k = (size_t)min(kb, kb1 - 1) * 64;
#pragma unroll
            for (int jr = 0; jr < RJ; ++jr)
                wide_cp_async8(xdst[jr] + buf * SLOT + qu * STEP_X, xrow[jr] + k, kb < kb1 ? xlen[jr] : 0u);
        }
        cp_async_commit();
    };

    float c[R][NT][4];
    mma24_zero(c);
    if (iters > 0) {
        load_x(0, 0);
#pragma unroll
        for (int u = 0; u < U; ++u) load_w(u, kb0 + q * U + u);
    }
    // ldmatrix row of this lane: token lane % 8 of an 8-token tile, chunk lane / 8 (MMA 0) or 4 + lane / 8 (MMA 1)
    const u32 xa0 = (u32)((lane & 7) * 128 + (((lane >> 3) ^ (lane & 7)) << 4));
    const u32 xa1 = (u32)((lane & 7) * 128 + (((4 + (lane >> 3)) ^ (lane & 7)) << 4));
    for (int i = 0; i < iters; ++i) {
        cp_async_wait<0>();
        __syncthreads();  // iteration i's x is in; every warp is done with the other buffer
        if (i + 1 < iters) load_x((i + 1) & 1, i + 1);
        const u32 xs = base + (i & 1) * SLOT + q * U * STEP_X;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // A step past the slice (the last iteration's) multiplies the slice's last step again against an x tile
            // of zeros: no branch, so ptxas keeps every weight load in flight across the step.
            u32 e[R];
#pragma unroll
            for (int r = 0; r < R; ++r)
                e[r] = __byte_perm(meta24_nibbles(ea[u][r][0], ea[u][r][1], t),
                                   meta24_nibbles(eb[u][r][0], eb[u][r][1], t), 0x6420u);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                u32 b0[4], b1[4];
                ldmatrix_x4(b0, xs + u * STEP_X + nt * 1024 + xa0);
                ldmatrix_x4(b1, xs + u * STEP_X + nt * 1024 + xa1);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const u32 a0[4] = {wa[u][r][0], wb[u][r][0], wa[u][r][1], wb[u][r][1]};
                    mma_sp<BF16>(c[r][nt], a0, b0, e[r], 0);
                    const u32 a1[4] = {wa[u][r][2], wb[u][r][2], wa[u][r][3], wb[u][r][3]};
                    mma_sp<BF16>(c[r][nt], a1, b1, e[r], 1);
                }
            }
            load_w(u, kb0 + ((i + 1) * WK + q) * U + u);
        }
    }
    bool owner = true;  // K-group 0's warps store the block's sums
    if (WK > 1) {  // the K-groups' sums meet in shared memory (the x buffers' space), added in K-group order
        float* red = (float*)wide_smem;  // [warp][R NT 4][32]
        cp_async_wait<0>();
        __syncthreads();
        if (q > 0)
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) red[(warp * R * NT * 4 + (r * NT + nt) * 4 + i) * 32 + lane] = c[r][nt][i];
        __syncthreads();
        owner = q == 0;
        if (owner)
            for (int qq = 1; qq < WK; ++qq)
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int i = 0; i < 4; ++i)
                            c[r][nt][i] += red[((qq * WR + rw) * R * NT * 4 + (r * NT + nt) * 4 + i) * 32 + lane];
    }
    // c[r][nt][i]: row row0 + 16 r + g + 8 (i / 2), token 8 nt + 2 t + i % 2
    if (owner)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int row = row0 + r * 16 + g + (i >> 1) * 8, token = nt * 8 + 2 * t + (i & 1);
                    if (row < N && token < M) {
                        if (S == 1) y[(size_t)token * N + row] = pack1<BF16>(c[r][nt][i]);
                        else work[((size_t)s * M + token) * N + row] = c[r][nt][i];
                    }
                }
    if (S == 1) return;  // S is the same for every thread: the whole block leaves
    __shared__ unsigned last;
    wide_fence();  // this block's partial sums are visible before its count
    __syncthreads();
    if (threadIdx.x == 0) last = wide_arrive(count + tile) == (u32)S - 1u;
    __syncthreads();
    if (!last) return;
    wide_fence();  // every other split's partial sums are visible to the loads below
    const int first = tile * WR * R * 16;
    for (int idx = threadIdx.x; idx < WR * R * 16 * M; idx += THREADS) {
        const int row = first + idx % (WR * R * 16), token = idx / (WR * R * 16);
        if (row >= N) continue;
        float sum = 0.f;
        for (int k = 0; k < S; ++k) sum += wide_ld_cg(work + ((size_t)k * M + token) * N + row);
        y[(size_t)token * N + row] = pack1<BF16>(sum);
    }
    if (threadIdx.x == 0) count[tile] = 0u;  // the next launch on the stream starts from 0
}

// ---- expand: the stored 2:4 weight into a dense (N, K) buffer (for cuBLAS on one shared scratch) ----
// Flat over 16-input chunks: chunk i is 16 bytes of values (four groups' two values), position word i and
// 32 bytes of output, whatever the shape (rows hold whole chunks since K % 16 == 0). Works on raw 16-bit
// patterns, so one kernel serves fp16 and bf16.
extern "C" __global__ void __launch_bounds__(256) expand24(const u16* __restrict__ vals, const u16* __restrict__ meta,
                                                           u16* __restrict__ out, long long chunks) {
    for (long long i = blockIdx.x * 256ll + threadIdx.x; i < chunks; i += (long long)gridDim.x * 256) {
        u32 v[4];
        ld_stream_v4((const char*)vals + i * 16, v);
        const u32 m = ld_stream_u16(meta + i);
        u32 o[8];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const u32 code = m >> (4 * q);
            const int p0 = code & 3, p1 = (code >> 2) & 3;
            const unsigned long long w = ((unsigned long long)(v[q] & 0xffffu) << (16 * p0)) |
                                         ((unsigned long long)(v[q] >> 16) << (16 * p1));
            o[2 * q] = (u32)w;
            o[2 * q + 1] = (u32)(w >> 32);
        }
        char* dst = (char*)out + i * 32;
        asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(o[0]), "r"(o[1]), "r"(o[2]), "r"(o[3]));
        asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst + 16), "r"(o[4]), "r"(o[5]), "r"(o[6]), "r"(o[7]));
    }
}

// ---- expand: a bitmap weight into a dense (N, K) buffer (its prompt path, 2 rows and more: one shared scratch,
// then cuBLAS) ----
// A warp owns 32 consecutive words of the flat (N*K/32) bitmap, 1024 inputs (segments never straddle rows, and
// the flat word order is the values' order, so the warp's values are one contiguous run). Lane l loads word l (one
// 128-byte access per warp); its first value is its segment's offset plus the popcounts of the words before it in
// the segment (a 4-lane scan). The warp copies its run into shared memory in 16-byte loads (16-byte aligned: the
// caller checks the values' address; the last partial vector is read value by value, never past the end), then
// each lane writes 16-byte chunks, contiguous across the warp: chunk j of the warp's 128 (8 inputs) takes its
// word and first value from lane j / 4 by shuffle, skips the popcount of the word's lower bytes, and reads its
// values from shared memory in bit order. Raw 16-bit patterns: one kernel serves fp16 and bf16.
#define EXPAND_RUN 1040  // halves staged per warp: 32 x 32 values plus up to 7 before and 7 after, 16-byte aligned
extern "C" __global__ void __launch_bounds__(WARPS * 32) expandbm(const u16* __restrict__ vals, const u32* __restrict__ bits,
                                                                  const int* __restrict__ offs, u16* __restrict__ out,
                                                                  long long words, long long nnz) {
    __shared__ __align__(16) u16 run[WARPS][EXPAND_RUN];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u16* s = run[warp];
    for (long long w0 = (blockIdx.x * (long long)WARPS + warp) * 32; w0 < words; w0 += (long long)gridDim.x * WARPS * 32) {
        const bool ok = w0 + lane < words;  // words % 4 == 0: a tail warp's valid lanes are whole segments
        const u32 word = ok ? ld_stream_u32(bits + w0 + lane) : 0u;
        const int c = __popc(word);
        int p = c;
        const int p1 = __shfl_up_sync(FULL, p, 1, 4);
        if ((lane & 3) >= 1) p += p1;
        const int p2 = __shfl_up_sync(FULL, p, 2, 4);
        if ((lane & 3) >= 2) p += p2;
        const long long start = (ok ? (long long)ld_nc_s32(offs + ((w0 + lane) >> 2)) : 0ll) + (p - c);
        const int last = words - w0 > 32 ? 31 : (int)(words - w0 - 1);
        const long long first = __shfl_sync(FULL, start, 0), end = __shfl_sync(FULL, start + c, last);
        const long long a0 = first & ~7ll;  // s[i] holds value a0 + i
        const int vecs = (int)((end - a0 + 7) >> 3);
        for (int v = lane; v < vecs; v += 32) {
            const long long e = a0 + 8ll * v;
            u32 q[4] = {0u, 0u, 0u, 0u};
            if (e + 8 <= nnz) {
                ld_stream_v4(vals + e, q);
            } else {
                for (int i = 0; e + i < nnz; ++i) q[i >> 1] |= ld_stream_u16(vals + e + i) << (16 * (i & 1));
            }
            asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(smem_u32(s + 8 * v)), "r"(q[0]), "r"(q[1]),
                         "r"(q[2]), "r"(q[3]) : "memory");
        }
        __syncwarp();
        const int rel = (int)(start - a0);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int j = u * 32 + lane, src = j >> 2, q = j & 3;  // chunk j: byte q of word src
            const u32 wd = __shfl_sync(FULL, word, src);
            const u32 byte = (wd >> (8 * q)) & 0xffu;
            int r = __shfl_sync(FULL, rel, src) + __popc(wd & ((1u << (8 * q)) - 1u));
            u32 o[4];
#pragma unroll
            for (int b = 0; b < 8; b += 2) {
                const u32 lo = (byte >> b) & 1u ? (u32)s[r] : 0u;
                r += (byte >> b) & 1u;
                const u32 hi = (byte >> (b + 1)) & 1u ? (u32)s[r] : 0u;
                r += (byte >> (b + 1)) & 1u;
                o[b >> 1] = lo | (hi << 16);
            }
            if (w0 + src < words) {
                char* dst = (char*)out + (w0 * 32 + 8ll * j) * 2;
                asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(o[0]), "r"(o[1]), "r"(o[2]), "r"(o[3]));
            }
        }
        __syncwarp();
    }
}

// ---- entry points: <format>_<dtype>_t<tokens>_r<rows per warp group> ----
// The 2:4 kernels ask for at most 2 blocks per SM (<= 128 registers) so that ptxas keeps every load of an
// unrolled step in flight at once instead of trading them for occupancy (it sinks them next to their use).
#define GEMV24(DT, BF, T, R, U)                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                                              \
        gemv24_##DT##_t##T##_r##R(const u16* x, const u16* vals, const u16* meta, u16* y, int M, int N,     \
                                  int K, int S) {                                                            \
        gemv_nm<Fmt24, BF, T, R, U>(x, vals, meta, y, M, N, K, S);                                       \
    }
#define GEMVBM(DT, BF, T, R)                                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                 \
        gemvbm_##DT##_t##T##_r##R(const u16* x, const u16* vals, const u32* bits, const int* offs, u16* y,  \
                                  int M, int N, int K, int S) {                                              \
        gemv_bitmap<BF, T, R>(x, vals, bits, offs, y, M, N, K, S);                                           \
    }
#define MMA24(DT, BF, NT, R, W, U)                                                                           \
    extern "C" __global__ void __launch_bounds__(W * 32, W < 32 ? 2 : 1)                                     \
        mma24_##DT##_n##NT##_r##R##_w##W(const u16* x, const u16* vals, const u8* meta, u16* y, int M,      \
                                         int N, int K) {                                                     \
        mma24<BF, NT, R, W, U>(x, vals, meta, y, M, N, K);                                                   \
    }
#define GEMM24(DT, BF, BM, BN, WM, WN, S)                                                                    \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32, (WM * WN * 32 <= 128) ? 4 : (BM * BN > 128 * 128 ? 1 : 2)) \
        gemm24_##DT##_m##BM##_n##BN##_s##S(const u16* x, const u16* vals, const u8* meta, u16* y, int M,   \
                                           int N, int K) {                                                   \
        gemm24<BF, BM, BN, WM, WN, S>(x, vals, meta, y, M, N, K);                                            \
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
    MMA24(DT, BF, 4, 1, 8, 2)                                                                                \
    MMA24(DT, BF, 4, 2, 8, 1)                                                                                \
    MMA24(DT, BF, 4, 1, 16, 1)                                                                               \
    GEMM24(DT, BF, 128, 128, 2, 4, 4)                                                                        \
    GEMM24(DT, BF, 256, 128, 4, 2, 3)                                                                        \
    GEMM24(DT, BF, 128, 256, 2, 4, 3)                                                                        \
    GEMM24(DT, BF, 128, 64, 4, 2, 4)                                                                         \
    GEMM24(DT, BF, 64, 64, 2, 2, 4)                                                                          \
    GEMM24(DT, BF, 64, 32, 2, 2, 4)                                                                          \
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

// wide24_<dtype>_n<token tiles>_r<row tiles a warp>_k<K-groups a block>_u<steps in flight a warp>: 8 warps a block
// (8 / WK a K-group), at least 2 blocks an SM (<= 128 registers a thread); dynamic shared memory as
// cuda_ops.wide_shared_bytes says.
#define WIDE24(DT, BF, NT, R, WK, U)                                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                                              \
        wide24_##DT##_n##NT##_r##R##_k##WK##_u##U(const u16* x, const u16* vals, const u8* meta, u16* y,    \
                                                  float* work, unsigned* count, int M, int N, int K, int S) { \
        wide24<BF, NT, R, WARPS / WK, WK, U>(x, vals, meta, y, work, count, M, N, K, S);                     \
    }
#define WIDE(DT, BF)                                                                                         \
    WIDE24(DT, BF, 4, 1, 1, 2)                                                                               \
    WIDE24(DT, BF, 4, 1, 1, 4)                                                                               \
    WIDE24(DT, BF, 4, 1, 1, 6)                                                                               \
    WIDE24(DT, BF, 4, 1, 2, 2)                                                                               \
    WIDE24(DT, BF, 8, 1, 1, 2)                                                                               \
    WIDE24(DT, BF, 8, 1, 1, 4)                                                                               \
    WIDE24(DT, BF, 8, 1, 2, 2)
WIDE(f16, false)
WIDE(bf16, true)
