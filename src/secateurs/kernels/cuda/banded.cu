// Banded unstructured GEMV for decode: y (M, N) = x (M, K) @ W.T with W in the banded layout of kernels/banded.py,
// M = 1-4 activation rows; and the expand kernel of its prompt path (the dense weight written into the shared
// scratch, then cuBLAS). Compiled at run time by NVRTC (kernels/cuda_ops.py) as a module of its own; its load /
// convert / reduce helpers are common.cuh's.
//
// The layout (kernels/banded.py): each row's non-zeros, per 2048-input segment, are cut into pieces of exactly P
// entries (P fixed by the density band: 32 for 50-60% zeros, 16 above), the last piece of a segment padded with
// zero values; a gap of more than 15 inputs is bridged by a zero-valued filler entry. Per piece: its first column
// (u16 `starts`), P 4-bit deltas (`deltas`, P/2 bytes: byte j of 32-bit word g holds entry 8g+j's delta in its low
// nibble, entry 8g+4+j's in its high one) and P values, stored in 16-byte chunks interleaved over groups of 8
// pieces (chunk c of piece p at byte ((p/8)*(P/8) + c)*128 + (p%8)*16), so the 8 lanes that read chunk c of 8
// consecutive pieces touch one 128-byte line. `offsets` (N*segments + 1) int32: where each (row, segment)'s pieces
// start.
//
// GEMV: a block of 8 warps; S warps share R output rows and take the pieces of those rows one per lane (balanced
// by non-zero count, not by row). x is staged per 8192/T inputs (whole segments) in shared memory as fp32, the T
// tokens of a column side by side (one 4-, 8- or 16-byte shared load serves every token, which also spreads the
// bank conflicts of random columns over fewer requests). Per piece a lane makes P/8 16-byte loads of values, one
// P/2-byte load of deltas and one 2-byte load of the start; then, with no branch and a fixed trip count of P:
//   per 4 entries: one AND (or shift + AND) isolating four deltas as bytes, one multiply by 0x01010101 that turns
//                  them into four running column offsets (prefix sums <= 60, no carry);
//   per entry:     one byte extract (PRMT), one shift-and-add (LEA) onto the piece cursor (the byte offset in the
//                  staged inputs), one shared load, one fp16/bf16 -> fp32 conversion, one FMA per token.
// The fourth entry's address is the next cursor. Each lane loads its next piece into a second register set before
// multiplying the current one (the first before x is staged), so weight bytes stay in flight. Rows past N and
// tokens past M are computed on clamped (valid) addresses and never stored.

#include "common.cuh"

__device__ __forceinline__ u32 bd_smem(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

#define SEG 2048   // inputs per segment: pieces never cross one
#define STAGE 8192 // fp32 inputs staged per block per token count T: STAGE / T columns (32 KB of shared memory)

// Byte offset of piece p's first 16-byte value chunk (chunk c lies c x 128 bytes further): 32-bit arithmetic, the
// values of one weight hold less than 4 GB.
template <int P>
__device__ __forceinline__ u32 piece_byte(u32 p) {
    return p * 16u + (p & ~7u) * (2u * P - 16u);
}

// The P values, P/2 delta bytes (as P/8 words) and the u16 start of piece p.
template <int P>
__device__ __forceinline__ void load_piece(const char* vals, const u8* deltas, const u16* starts, u32 p,
                                           u32 (&v)[P / 8][4], u32 (&d)[P / 8], u32& start) {
    static_assert(P == 16 || P == 32, "pieces of 16 or 32 entries (banded.py PIECES)");
    const char* vp = vals + piece_byte<P>(p);
#pragma unroll
    for (int c = 0; c < P / 8; ++c) ld_stream_v4(vp + c * 128, v[c]);
    if (P == 32) {
        u32 q[4];
        ld_stream_v4(deltas + p * 16u, q);
#pragma unroll
        for (int g = 0; g < P / 8; ++g) d[g] = q[g];
    } else {
        const unsigned long long q = ld_stream_u64(deltas + p * 8u);
        d[0] = (u32)q;
        d[P / 8 - 1] = (u32)(q >> 32);
    }
    start = ld_stream_u16(starts + p);
}

// The T tokens' inputs of one column, side by side in shared memory: one 4-, 8- or 16-byte load serves every token.
template <int T> struct XCol;
template <> struct __align__(4) XCol<1> { float t[1]; };
template <> struct __align__(8) XCol<2> { float t[2]; };
template <> struct __align__(16) XCol<4> { float t[4]; };

// One piece: P entries, ps[t] = sum of value x x[t][column]. `cur` is the byte offset of the piece's first column
// in the staged inputs (4T bytes a column).
template <bool BF16, int T, int P>
__device__ __forceinline__ void piece_dot(float (&ps)[T], const u32 (&v)[P / 8][4], const u32 (&d)[P / 8], u32 cur,
                                          const XCol<T>* xs) {
    constexpr int SHIFT = T == 1 ? 2 : T == 2 ? 3 : 4;  // log2 of a column's bytes
#pragma unroll
    for (int t = 0; t < T; ++t) ps[t] = 0.f;
#pragma unroll
    for (int g = 0; g < P / 8; ++g) {
        const u32 lo = (d[g] & 0x0f0f0f0fu) * 0x01010101u;         // byte j: delta 0 + ... + delta j (<= 60)
        const u32 hi = ((d[g] >> 4) & 0x0f0f0f0fu) * 0x01010101u;  // the same for entries 4..7
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 pre = h ? hi : lo;
            u32 off[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) off[j] = cur + (__byte_perm(pre, 0u, 0x4440u + j) << SHIFT);
            cur = off[3];
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                float w0, w1;
                unpack2<BF16>(v[g][2 * h + (j >> 1)], w0, w1);
                const XCol<T> x0 = *(const XCol<T>*)((const char*)xs + off[j]);
                const XCol<T> x1 = *(const XCol<T>*)((const char*)xs + off[j + 1]);
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    ps[t] = fmaf(w0, x0.t[t], ps[t]);
                    ps[t] = fmaf(w1, x1.t[t], ps[t]);
                }
            }
        }
    }
}

// Piece i of a warp group's run (rows r = 0..R-1 after one another): its row r and its loads.
template <int P, int R>
__device__ __forceinline__ void fetch(const u16* vals, const u8* deltas, const u16* starts, const int (&a)[R],
                                      const int (&c)[R + 1], int i, u32 (&v)[P / 8][4], u32 (&d)[P / 8], u32& st,
                                      int& r) {
    int base = a[0];
    r = 0;
#pragma unroll
    for (int q = 1; q < R; ++q) {
        r = i >= c[q] ? q : r;
        base = i >= c[q] ? a[q] - c[q] : base;
    }
    load_piece<P>((const char*)vals, deltas, starts, (u32)(base + i), v, d, st);
}

// One piece's products added to its row's sums.
template <bool BF16, int T, int P, int R>
__device__ __forceinline__ void accumulate(float (&acc)[R][T], const u32 (&v)[P / 8][4], const u32 (&d)[P / 8], u32 cur,
                                           int r, const XCol<T>* xs) {
    float ps[T];
    piece_dot<BF16, T, P>(ps, v, d, cur, xs);
#pragma unroll
    for (int q = 0; q < R; ++q)
#pragma unroll
        for (int t = 0; t < T; ++t) acc[q][t] += (R == 1 || r == q) ? ps[t] : 0.f;
}

template <bool BF16, int T, int P, int R>
__device__ __forceinline__ void gemvbd(const u16* __restrict__ x, const u16* __restrict__ vals,
                                       const u8* __restrict__ deltas, const u16* __restrict__ starts,
                                       const int* __restrict__ offs, u16* __restrict__ y, int M, int N, int K, int S,
                                       int nseg) {
    constexpr int KS = STAGE / T;
    __shared__ XCol<T> xs[KS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = warp / S, s = warp % S;
    const int row0 = (blockIdx.x * (WARPS / S) + g) * R;
    float acc[R][T];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
    for (int k0 = 0; k0 < K; k0 += KS) {
        const int kn = min(KS, K - k0);
        // The pieces of this group's R rows in this stage: row r's run [a[r], a[r] + c[r+1] - c[r]), dealt one per
        // lane and step, row r's after row r-1's (only the last step leaves lanes idle).
        const int s0 = k0 / SEG, s1 = min(s0 + KS / SEG, nseg);
        int a[R], c[R + 1];
        c[0] = 0;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const size_t n = (size_t)min(row0 + r, N - 1);
            a[r] = ld_nc_s32(offs + n * nseg + s0);
            const int len = row0 + r < N ? ld_nc_s32(offs + n * nseg + s1) - a[r] : 0;
            c[r + 1] = c[r] + len;
        }
        const int total = c[R], step = 32 * S;
        const u32 kb = (u32)k0 * (4u * T);  // the stage's first column, in staged bytes
        // Two register sets, A and B: the first piece's loads are issued before x is staged, and every step loads
        // the next piece into the other set before multiplying this one, so weight bytes stay in flight.
        u32 va[P / 8][4], da[P / 8], sa, vb[P / 8][4], db[P / 8], sb;
        int ra = 0, rb = 0;
        int i = s * 32 + lane;
        if (i < total) fetch<P, R>(vals, deltas, starts, a, c, i, va, da, sa, ra);
        __syncthreads();  // every warp is done with the previous stage's inputs
        // Stage: 8 columns of every token per thread and step (T 16-byte loads), 8T floats column-major into
        // shared memory in 2T 16-byte stores.
        for (int q = threadIdx.x; q < (kn >> 3); q += blockDim.x) {
            float f[8][T];
#pragma unroll
            for (int t = 0; t < T; ++t) {
                u32 h[4];
                ld_nc_v4(x + (size_t)min(t, M - 1) * K + k0 + q * 8, h);
#pragma unroll
                for (int e = 0; e < 4; ++e) unpack2<BF16>(h[e], f[2 * e][t], f[2 * e + 1][t]);
            }
            const float* flat = &f[0][0];
            const u32 dst = bd_smem(&xs[q * 8]);
#pragma unroll
            for (int e = 0; e < 2 * T; ++e)
                asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(dst + 16 * e), "f"(flat[4 * e]),
                             "f"(flat[4 * e + 1]), "f"(flat[4 * e + 2]), "f"(flat[4 * e + 3]) : "memory");
        }
        __syncthreads();
        while (i < total) {
            if (i + step < total) fetch<P, R>(vals, deltas, starts, a, c, i + step, vb, db, sb, rb);
            accumulate<BF16, T, P, R>(acc, va, da, sa * (4u * T) - kb, ra, xs);
            i += step;
            if (i >= total) break;
            if (i + step < total) fetch<P, R>(vals, deltas, starts, a, c, i + step, va, da, sa, ra);
            accumulate<BF16, T, P, R>(acc, vb, db, sb * (4u * T) - kb, rb, xs);
            i += step;
        }
    }
    finish<BF16, T, R>(acc, y, M, N, row0, S);
}

// ---- expand: the stored weight into a dense (N, K) buffer (the prompt path: kernels/cuda_ops.py's one shared
// scratch, then cuBLAS) ----
// A warp per (row, segment) unit: it zeroes the segment's 2048 halves in shared memory (16-byte stores), each lane
// writes the entries of its pieces at their columns (a padding entry, value zero, sits on its piece's last real
// column, so zero values are not written), then the warp copies the segment out in coalesced 16-byte stores. Raw
// 16-bit patterns: one kernel serves fp16 and bf16.
template <int P>
__device__ __forceinline__ void expandbd(const u16* __restrict__ vals, const u8* __restrict__ deltas,
                                         const u16* __restrict__ starts, const int* __restrict__ offs,
                                         u16* __restrict__ out, int N, int K, int nseg) {
    __shared__ __align__(16) u16 buf[WARPS][SEG];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u16* sb = buf[warp];
    const int units = N * nseg;
    for (int unit = blockIdx.x * WARPS + warp; unit < units; unit += gridDim.x * WARPS) {
        const int n = unit / nseg, seg = unit - n * nseg;
        const int c0 = seg * SEG, width = min(SEG, K - c0);
        for (int i = lane * 8; i < width; i += 256)
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(bd_smem(sb + i)), "r"(0u) : "memory");
        __syncwarp();
        const int p0 = ld_nc_s32(offs + unit), p1 = ld_nc_s32(offs + unit + 1);
        for (int p = p0 + lane; p < p1; p += 32) {
            u32 v[P / 8][4], d[P / 8], st;
            load_piece<P>((const char*)vals, deltas, starts, (u32)p, v, d, st);
            u32 cur = (st - (u32)c0) * 2u;  // byte offset in the segment's u16 buffer
#pragma unroll
            for (int g = 0; g < P / 8; ++g) {
                const u32 lo = (d[g] & 0x0f0f0f0fu) * 0x02020202u;
                const u32 hi = ((d[g] >> 4) & 0x0f0f0f0fu) * 0x02020202u;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u32 pre = h ? hi : lo;
                    u32 off[4];
#pragma unroll
                    for (int j = 0; j < 4; ++j) off[j] = cur + __byte_perm(pre, 0u, 0x4440u + j);
                    cur = off[3];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const u32 word = v[g][2 * h + (j >> 1)];
                        const u32 bits = (j & 1) ? (word >> 16) : (word & 0xffffu);
                        if (bits & 0x7fffu)
                            asm volatile("st.shared.u16 [%0], %1;" ::"r"(bd_smem(sb) + off[j]), "h"((u16)bits) : "memory");
                    }
                }
            }
        }
        __syncwarp();
        u16* dst = out + (size_t)n * K + c0;
        for (int i = lane * 8; i < width; i += 256) {
            u32 q[4];
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(q[0]), "=r"(q[1]), "=r"(q[2]), "=r"(q[3])
                         : "r"(bd_smem(sb + i)) : "memory");
            asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst + i), "r"(q[0]), "r"(q[1]), "r"(q[2]),
                         "r"(q[3]));
        }
        __syncwarp();
    }
}

// ---- entry points: expandbd_p<P>, gemvbd_<dtype>_t<tokens>_p<P>_r<rows per warp group> (kernels/banded.py) ----
#define EXPANDBD(P)                                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                 \
        expandbd_p##P(const u16* vals, const u8* deltas, const u16* starts, const int* offs, u16* out, int N, \
                      int K, int nseg) {                                                                     \
        expandbd<P>(vals, deltas, starts, offs, out, N, K, nseg);                                            \
    }
EXPANDBD(16)
EXPANDBD(32)

#define GEMVBD(DT, BF, T, P, R)                                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                                              \
        gemvbd_##DT##_t##T##_p##P##_r##R(const u16* x, const u16* vals, const u8* deltas, const u16* starts, \
                                         const int* offs, u16* y, int M, int N, int K, int S, int nseg) {    \
        gemvbd<BF, T, P, R>(x, vals, deltas, starts, offs, y, M, N, K, S, nseg);                          \
    }
#define ALL(DT, BF)                                                                                          \
    GEMVBD(DT, BF, 1, 32, 1)                                                                              \
    GEMVBD(DT, BF, 1, 32, 2)                                                                              \
    GEMVBD(DT, BF, 1, 16, 1)                                                                              \
    GEMVBD(DT, BF, 1, 16, 2)                                                                              \
    GEMVBD(DT, BF, 2, 32, 1)                                                                              \
    GEMVBD(DT, BF, 2, 32, 2)                                                                              \
    GEMVBD(DT, BF, 2, 16, 1)                                                                              \
    GEMVBD(DT, BF, 2, 16, 2)                                                                              \
    GEMVBD(DT, BF, 4, 32, 1)                                                                              \
    GEMVBD(DT, BF, 4, 32, 2)                                                                              \
    GEMVBD(DT, BF, 4, 16, 1)                                                                              \
    GEMVBD(DT, BF, 4, 16, 2)
ALL(f16, false)
ALL(bf16, true)
