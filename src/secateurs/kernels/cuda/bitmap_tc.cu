// Unstructured (bitmap) weights on tensor cores for 5-64 tokens (kernels/bitmap.py): Flash-LLM's "load as sparse,
// compute as dense" on the bitmap format. From 2 tokens on the bitmap otherwise runs its expand path (the whole
// weight written into a dense scratch, then cuBLAS), which moves about three times the dense bytes; here each stored
// value, bit and offset is read once per token tile and expanded in registers into tc_tile.cuh's dense shared tile,
// multiplied by mma.sync.m16n8k16. Compiled at run time by NVRTC as a module of its own; matched float64 on an H100
// and offered by default after the expand path (0.35-0.77x cuBLAS at 8-64 tokens there, ahead of the expand path).
//
// The format: bits (N, K/32) one bit per weight (input i of a row at bit i % 32 of word i / 32), values the
// non-zeros in row-major order (1-D, any length, its base 16-byte aligned), offsets (N, K/128) the index in values
// where each 128-input segment of a row starts. K % 128 == 0, so every stage (64 inputs) is half a segment.
//
// The unit (row, 16-input chunk j: the engine's, two per thread per stage):
// - its position bits: half j % 2 of word j / 2; its first value: the segment's offset plus the popcounts of the
//   segment's bits before the chunk. The segment's four words (one 16-byte load) and its offset are read one stage
//   ahead (first() starts the chain; each load() reads those of the thread's next chunk, j + 4), so the values'
//   addresses never wait on a load issued in the same stage;
// - its values: at most 16, from `start` on; the 16-byte vectors that hold them (at most three, from start rounded
//   down to 8 values; only those the chunk needs; near the end of the array value by value, never past it) are
//   loaded into registers, then shifted by start % 8 halves (selects and one byte-permute per register: no indexed
//   register access), so value e of the chunk is half e of the shifted window;
// - its store: the chunk's two 16-byte tile chunks are zeroed, then each value is written, one 16-bit shared store
//   each, at its position: the e-th set bit. Values go from the highest down: bfind names the highest bit left,
//   which is value e's once the values above e are placed, and bmsk clears it. The swizzled byte of position p in
//   tile row r, chunk c, is r * 128 | ((2p) ^ (32c ^ (r & 7) << 4)) (tc_at of chunk 2c + p / 8, byte 2 (p % 8)).
//   The chain of 16 value slots is entered once per unit at the warp's largest popcount (a switch: register
//   indices stay static and no slot tests a bound); a lane with fewer values has its store and clear predicated
//   off. Per value: bfind, a compare, a shift, an xor, a bmsk, the predicated and and store (and a shift for an
//   odd value's high half).

#include "tc_tile.cuh"

struct TcBitmap {
    struct Tables {
        const u32* bits;
        const int* offs;
        int nnz;  // values' length: near its end the values are read one by one, never past it
    };
    struct Unit {
        u32 w[4];  // the bit words of the segment of the thread's next chunk, and that segment's offset
        int off;
        u32 v[3][4];  // this chunk's values: the 16-byte vectors from (start & ~7) on, zero where not loaded
        u32 bits;     // this chunk's 16 position bits
        u32 o;        // start & 7: the chunk's first value is half o of v
    };
    static __device__ __forceinline__ void meta(const Tables& t, size_t row, int K, int j, Unit& u) {
        const int seg = min(j, (K >> 4) - 1) >> 3;
        ld_nc_v4(t.bits + row * (K >> 5) + (size_t)seg * 4, u.w);
        u.off = ld_nc_s32(t.offs + row * (K >> 7) + seg);
    }
    static __device__ __forceinline__ void first(const u16*, const Tables& t, size_t row, int K, int j, Unit& u) {
        meta(t, row, K, j, u);
    }
    static __device__ __forceinline__ void load(const u16* vals, const Tables& t, size_t row, int K, int j, Unit& u) {
        const int q = (j >> 1) & 3, half = j & 1;  // word q of the segment, its low or high 16 inputs
        const u32 word = q == 0 ? u.w[0] : q == 1 ? u.w[1] : q == 2 ? u.w[2] : u.w[3];
        const int before = (q > 0 ? __popc(u.w[0]) : 0) + (q > 1 ? __popc(u.w[1]) : 0) +
                           (q > 2 ? __popc(u.w[2]) : 0) + (half ? __popc(word & 0xffffu) : 0);
        const int start = u.off + before;
        u.bits = half ? word >> 16 : word & 0xffffu;
        u.o = (u32)start & 7u;
        const int a0 = start - (int)u.o, vecs = ((int)u.o + __popc(u.bits) + 7) >> 3;
#pragma unroll
        for (int i = 0; i < 12; ++i) u.v[i >> 2][i & 3] = 0u;
        if (a0 + 24 <= t.nnz) {  // all three vectors inside the array: one address, the needed vectors predicated
#pragma unroll
            for (int i = 0; i < 3; ++i)
                if (i < vecs) ld_stream_v4(vals + a0 + 8 * i, u.v[i]);
        } else {  // the array's last values: never read past its end
#pragma unroll
            for (int h = 0; h < 24; ++h)
                if (h < 8 * vecs && a0 + h < t.nnz)
                    u.v[h >> 3][(h >> 1) & 3] |= ld_stream_u16(vals + a0 + h) << (16 * (h & 1));
        }
        meta(t, row, K, j + 4, u);  // the thread's chunk of the next stage
    }
    static __device__ __forceinline__ void store(const Unit& u, u32 z, u32 at, int r, int c) {
        // the window from half o: first by o / 2 registers (two selects), then by o % 2 halves (a byte-permute)
        const u32 a = u.o >> 1, sel = (u.o & 1u) ? 0x5432u : 0x3210u;
        u32 t2[10], s1[9], w[8];
#pragma unroll
        for (int k = 0; k < 10; ++k) t2[k] = (a & 2u) ? u.v[(k + 2) >> 2][(k + 2) & 3] : u.v[k >> 2][k & 3];
#pragma unroll
        for (int k = 0; k < 9; ++k) s1[k] = (a & 1u) ? t2[k + 1] : t2[k];
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = __byte_perm(s1[k], s1[k + 1], sel);
        tc_st_shared(at + tc_at(r, 2 * c), 0u, 0u, 0u, 0u);
        tc_st_shared(at + tc_at(r, 2 * c + 1), 0u, 0u, 0u, 0u);
        u32 bits = u.bits & z, most;
        const u32 count = __popc(bits);
        const u32 rowkey = (at + (u32)r * 128u) | (u32)((32 * c) ^ ((r & 7) << 4));  // tile row base | swizzle key
        asm("redux.sync.max.u32 %0, %1, %2;" : "=r"(most) : "r"(count), "r"(FULL));
        auto slot = [&](int e) {  // branch-free: a lane with fewer values stores nothing and keeps its bits
            const u16 h = (u16)(w[e >> 1] >> (16 * (e & 1)));
            asm volatile(
                "{ .reg .pred q; .reg .b32 p, a;\n"
                " setp.lt.u32 q, %3, %4;\n"  // e < this lane's popcount
                " bfind.u32 p, %0;\n"        // the highest bit left
                " shl.b32 a, p, 1;\n"
                " xor.b32 a, a, %2;\n"
                " @q st.shared.u16 [a], %1;\n"
                " bmsk.clamp.b32 p, 0, p;\n"  // the bits below it
                " @q and.b32 %0, %0, p; }"
                : "+r"(bits)
                : "h"(h), "r"(rowkey), "r"((u32)e), "r"(count)
                : "memory");
        };
        switch (most) {
            case 16: slot(15); [[fallthrough]];
            case 15: slot(14); [[fallthrough]];
            case 14: slot(13); [[fallthrough]];
            case 13: slot(12); [[fallthrough]];
            case 12: slot(11); [[fallthrough]];
            case 11: slot(10); [[fallthrough]];
            case 10: slot(9); [[fallthrough]];
            case 9: slot(8); [[fallthrough]];
            case 8: slot(7); [[fallthrough]];
            case 7: slot(6); [[fallthrough]];
            case 6: slot(5); [[fallthrough]];
            case 5: slot(4); [[fallthrough]];
            case 4: slot(3); [[fallthrough]];
            case 3: slot(2); [[fallthrough]];
            case 2: slot(1); [[fallthrough]];
            case 1: slot(0); [[fallthrough]];
            default: break;
        }
    }
};

// ---- entry points: tcbm_<dtype>_n<tokens> (kernels/bitmap.py: TC_TOKENS), tcsum_<dtype> ----
// (minimum 1 block per SM: without it ptxas caps sm_80's 64-token kernel at 128 registers and spills)
#define TCBM(DT, BF, TN)                                                                                     \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 1)                                              \
        tcbm_##DT##_n##TN(const u16* x, const u16* vals, const u32* bits, const int* offs, u16* y,            \
                          float* work, int M, int N, int K, int S, int nnz) {                                \
        tc_gemm<TcBitmap, BF, TN>(x, vals, {bits, offs, nnz}, y, work, M, N, K, S);                          \
    }
#define ALL(DT, BF)                                                                                          \
    TCBM(DT, BF, 16)                                                                                         \
    TCBM(DT, BF, 32)                                                                                         \
    TCBM(DT, BF, 64)                                                                                         \
    TCSUM(DT, BF)
ALL(f16, false)
ALL(bf16, true)
