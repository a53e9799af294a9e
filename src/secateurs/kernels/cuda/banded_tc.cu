// The banded layout (kernels/banded.py) on tensor cores for 5-64 tokens: "load as sparse, compute as dense" on the
// layout's stored tensors as they are. From 2 tokens the layout otherwise runs its expand path (the whole weight
// written into a dense scratch, then cuBLAS: about three times the dense bytes); here each stored entry is read
// once or twice per token tile and scattered in registers into tc_tile.cuh's dense shared tile, multiplied by
// mma.sync.m16n8k16. Compiled at run time by NVRTC as a module of its own; matched float64 on an H100 (936 checks) and
// offered by default after the expand path: the dispatcher's timing picks it (the fastest at 8-32 tokens from 60%).
//
// The layout (banded.cu has it in full): per (row, 2048-input segment) pieces of P entries (16 or 32), each entry a
// value and a 4-bit delta from the previous entry's column; per piece a u16 start (its first column, absolute in
// the row), P/2 delta bytes (byte j of word g: entry 8g+j's delta in the low nibble, 8g+4+j's in the high one) and
// P values in 16-byte chunks of 8 (chunk c of piece p at halves ((p/8)*(P/8) + c)*64 + (p%8)*8); offsets (N*segments
// + 1) where each (row, segment)'s pieces start. A row's pieces are contiguous and their columns rise across its
// segments; zero-valued fillers sit on zero columns, zero-valued padding (a segment's last piece) on its last real
// column, so only non-zero values are written (a padding entry would overwrite that column's value).
//
// The unit. The engine gives the four lanes of a quad (tid & 3 = c) one tile row and a 64-input stage [x, x + 64);
// the entries of that window are a run of the row's entry stream, which here is read in grains of 8 entries (one
// 16-byte value chunk and one delta word). Each row keeps a cursor (all four lanes hold it): its first grain not
// consumed by the slice's earlier stages, or at the slice's first stage the first grain of the piece first() finds.
// Per stage lane c takes grains cursor + c + 4k, k = 0, 1, ... (a round each): R rounds are loaded one stage ahead by
// load(); a round past R is loaded in store() itself, entered only while some quad of the warp has consumed all four
// grains of its last round and has more (R = 2; in the CPU emulation, 128 x 4096 at 16 tokens, the busiest of a
// block's four warps took about 2 rounds a stage at 50-60% zeros, 1.5 at 70%, 1 at 80-90%; a window of more than
// eight grains, a dense run of inputs, takes rounds past R). A grain is consumed when its last column is below the
// window's end (x + 64); the quad's count of consumed grains (a ballot) moves the cursor. first() finds a K-slice's
// first cursor: the row's pieces of x's segment (two offsets), then the last one starting at or before x, by a 9-ary
// search over their starts (at most 129 pieces a segment: 3 steps of 8 independent loads); a slice starting on a
// segment skips the search.
//
// The scatter: the lane's two tile chunks are zeroed, the warp synchronised, then each entry of the lane's grain
// is written (one 16-bit shared store) if it is non-zero and in the window. Per grain: the base column (the
// piece's start plus the nibble sums of its earlier delta words, by dp4a), two ANDs and two multiplies by
// 0x02020202 turn the word's eight deltas into running byte offsets of twice the column (the high four on top of
// the low four's total: at most 210, no carry). Per entry: the byte extract and add (l = 2 * (column - x)), the
// window test (l < 128 unsigned, ANDed with the value's non-zero test), the swizzled address rowkey ^ l (tile row r
// at at + 128r, its chunk bits keyed by (r & 7) << 4: tc_at of chunk l / 16, byte l % 16) and the store.

#include "tc_tile.cuh"

// dp4a.u32: a + the dot product of the four bytes of x and y (NVRTC's implicit headers need not declare __dp4a)
__device__ __forceinline__ u32 bd_dp4a(u32 x, u32 y, u32 a) {
    u32 d;
    asm("dp4a.u32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(x), "r"(y), "r"(a));
    return d;
}

template <int P, int R>
struct TcBanded {
    static_assert(P == 16 || P == 32, "pieces of 16 or 32 entries (banded.py PIECES)");
    static constexpr int CH = P / 8;  // grains (8 entries, one delta word) per piece
    struct Tables {
        const u8* deltas;
        const u16* starts;
        const int* offs;
        int nseg;
    };
    struct Grain {
        u32 v[4];   // its 8 values
        u32 d[CH];  // its piece's delta words
        u32 start;  // its piece's first column
    };
    struct Unit {
        const u16* vals;  // what a round past R reads in store()
        Tables t;
        int cur, end;  // the row's grains: the first not yet consumed, one past its last
        int x;         // the stage's first input
        Grain g[R];    // rounds 0 .. R-1 of the stage: grain cur + c + 4k
    };

    // grain G of the weight (the row's last where G is past it: a valid address, never stored)
    static __device__ __forceinline__ void grain(const u16* vals, const Tables& t, int G, int end, Grain& g) {
        const u32 q = (u32)max(min(G, end - 1), 0), p = q / CH, ch = q % CH;
        ld_nc_v4(vals + (((p >> 3) * CH + ch) * 64 + (p & 7) * 8), g.v);
        if (P == 32) {
            u32 w[4];
            ld_nc_v4(t.deltas + p * 16u, w);
#pragma unroll
            for (int i = 0; i < CH; ++i) g.d[i] = w[i];
        } else {
            asm("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(g.d[0]), "=r"(g.d[CH - 1]) : "l"(t.deltas + p * 8u));
        }
        g.start = ld_nc_u16(t.starts + p);
    }
    static __device__ __forceinline__ void first(const u16* vals, const Tables& t, size_t row, int K, int j, Unit& u) {
        u.vals = vals;
        u.t = t;
        const int x = (j >> 2) << 6, seg = x >> 11;
        const size_t unit = row * t.nseg + seg;
        int lo = ld_nc_s32(t.offs + unit), hi = ld_nc_s32(t.offs + unit + 1);
        u.end = ld_nc_s32(t.offs + (row + 1) * t.nseg) * CH;
        if (x & 2047) {  // the last piece of the segment starting at or before x (or its first)
            while (hi - lo > 1) {
                const int step = (hi - lo + 8) / 9;
                int count = 0;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const int q = lo + step * (i + 1);
                    count += (q < hi && (int)ld_nc_u16(t.starts + min(q, hi - 1)) <= x) ? 1 : 0;
                }
                hi = min(hi, lo + step * (count + 1));
                lo += step * count;
            }
        }
        u.cur = lo * CH;
    }
    static __device__ __forceinline__ void load(const u16* vals, const Tables& t, size_t, int, int j, Unit& u) {
        u.x = (j >> 2) << 6;
        const int c = threadIdx.x & 3;
#pragma unroll
        for (int k = 0; k < R; ++k) grain(vals, t, u.cur + c + 4 * k, u.end, u.g[k]);
    }
    // one round's grain G: its non-zero entries in the window to the tile row (rowkey: its base | swizzle key);
    // whether it is consumed (ends before the window does)
    static __device__ __forceinline__ bool scatter(const Grain& g, int G, const Unit& u, bool live, u32 rowkey) {
        const u32 ch = (u32)G % CH;
        u32 sum16 = 0u, w = g.d[0];  // 16 x the nibble sum of the piece's words before the grain's
#pragma unroll
        for (int i = 1; i < CH; ++i) {
            const u32 before = (u32)i <= ch ? g.d[i - 1] : 0u;
            sum16 = bd_dp4a(before & 0xf0f0f0f0u, 0x01010101u, bd_dp4a(before & 0x0f0f0f0fu, 0x10101010u, sum16));
            w = (u32)i == ch ? g.d[i] : w;
        }
        const u32 plo = (w & 0x0f0f0f0fu) * 0x02020202u;  // byte j: 2 x (deltas of entries 0..j)
        const u32 phi = ((w >> 4) & 0x0f0f0f0fu) * 0x02020202u + __byte_perm(plo, 0u, 0x3333u);  // entries 4..7
        const int b2 = (live && G < u.end) ? 2 * ((int)g.start + (int)(sum16 >> 4) - u.x) : 0x40000000;
#pragma unroll
        for (int m = 0; m < 4; ++m) {  // entries 2m, 2m + 1: the low and high half of v[m]
            const u32 pre = m < 2 ? plo : phi, e = 2 * (m & 1);
            const u32 l0 = (u32)b2 + __byte_perm(pre, 0u, 0x4440u + e);
            const u32 l1 = (u32)b2 + (e == 2 ? pre >> 24 : __byte_perm(pre, 0u, 0x4441u));
            asm volatile(
                "{ .reg .pred p, q; .reg .b32 a, h;\n"
                " setp.neu.f16x2 p|q, %0, %4;\n"  // each half non-zero: bits & 0x7fff (fp16 or bf16: +0 is padding)
                " setp.lt.and.u32 p, %1, 128, p;\n"  // and in the window
                " setp.lt.and.u32 q, %2, 128, q;\n"
                " xor.b32 a, %1, %3;\n"
                " @p st.shared.u16 [a], %0;\n"
                " xor.b32 a, %2, %3;\n"
                " shr.b32 h, %0, 16;\n"
                " @q st.shared.u16 [a], h; }"
                ::"r"(g.v[m]), "r"(l0), "r"(l1), "r"(rowkey), "r"(0u)
                : "memory");
        }
        return b2 + (int)(phi >> 24) < 128;
    }
    static __device__ __forceinline__ void store(Unit& u, u32 z, u32 at, int r, int c) {
        tc_st_shared(at + tc_at(r, 2 * c), 0u, 0u, 0u, 0u);
        tc_st_shared(at + tc_at(r, 2 * c + 1), 0u, 0u, 0u, 0u);
        const int quad = (r & 7) * 4;  // the row's four lanes in the warp
        const bool live = (__ballot_sync(FULL, z != 0u) >> quad & 15u) != 0u;  // a row past N: all four z are 0
        const u32 rowkey = (at + (u32)r * 128u) | (u32)((r & 7) << 4);
        __syncwarp();  // every lane of the row has zeroed its chunks before any writes into them
        int done = 0;
        bool more = true;
#pragma unroll
        for (int k = 0; k < R; ++k) {
            if (more) {
                const u32 ate = __ballot_sync(FULL, scatter(u.g[k], u.cur + c + 4 * k, u, live, rowkey)) >> quad & 15u;
                done += __popc(ate);
                more = __any_sync(FULL, ate == 15u && u.cur + 4 * (k + 1) < u.end);
            }
        }
        for (int k = R; more; ++k) {  // a window with more grains than the rounds loaded ahead
            Grain g;
            grain(u.vals, u.t, u.cur + c + 4 * k, u.end, g);
            const u32 ate = __ballot_sync(FULL, scatter(g, u.cur + c + 4 * k, u, live, rowkey)) >> quad & 15u;
            done += __popc(ate);
            more = __any_sync(FULL, ate == 15u && u.cur + 4 * (k + 1) < u.end);
        }
        u.cur += done;
    }
};

// ---- entry points: tcbd_<dtype>_p<piece>_n<tokens> (kernels/banded.py), two rounds loaded ahead; tcsum_<dtype> ----
// (minimum 1 block per SM, as bitmap_tc.cu: the 64-token kernels use 169-187 registers)
#define TCBD(DT, BF, P, TN)                                                                                   \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 1)                                               \
        tcbd_##DT##_p##P##_n##TN(const u16* x, const u16* vals, const u8* deltas, const u16* starts,          \
                                 const int* offs, u16* y, float* work, int M, int N, int K, int S, int nseg) { \
        tc_gemm<TcBanded<P, 2>, BF, TN>(x, vals, {deltas, starts, offs, nseg}, y, work, M, N, K, S);         \
    }
#define ALL(DT, BF)      \
    TCBD(DT, BF, 16, 16) \
    TCBD(DT, BF, 16, 32) \
    TCBD(DT, BF, 16, 64) \
    TCBD(DT, BF, 32, 16) \
    TCBD(DT, BF, 32, 32) \
    TCBD(DT, BF, 32, 64) \
    TCSUM(DT, BF)
ALL(f16, false)
ALL(bf16, true)
