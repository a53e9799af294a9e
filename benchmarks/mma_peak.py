"""Tensor-core issue-rate ceiling of the sm_80 ``mma.sync`` forms on this GPU: dense m16n8k16 against sparse
``mma.sp`` m16n8k32 (fp16 in, fp32 accumulate), from registers only (no memory traffic), every SM busy.

It bounds what a kernel built on these instructions can reach (the 2:4 prompt GEMM of kernels/cuda_ops.py)
against cuBLAS, which uses Hopper's ``wgmma``. Dense-equivalent TFLOP/s: 2·16·8·32 per mma.sp, 2·16·8·16 per mma.

    python benchmarks/mma_peak.py      # needs CuPy
"""

from __future__ import annotations

import cupy as cp

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256) peak(float* out, int iters, int sparse) {
    unsigned a0 = threadIdx.x, a1 = a0 * 3, a2 = a0 * 5, a3 = a0 * 7, b0 = a0 + 1, b1 = a0 + 2, b2 = a0 + 3, b3 = a0 + 4;
    unsigned e = 0x44444444u;  // positions 0 and 1 of every group
    float c[8][4];
    for (int i = 0; i < 8; ++i) for (int q = 0; q < 4; ++q) c[i][q] = 0.f;
    if (sparse) {
        for (int it = 0; it < iters; ++it) {
#pragma unroll
            for (int i = 0; i < 8; ++i)
                asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                             "{%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
                             : "+f"(c[i][0]), "+f"(c[i][1]), "+f"(c[i][2]), "+f"(c[i][3])
                             : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(b2), "r"(b3), "r"(e));
        }
    } else {
        for (int it = 0; it < iters; ++it) {
#pragma unroll
            for (int i = 0; i < 8; ++i)
                asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                             "{%8,%9}, {%0,%1,%2,%3};"
                             : "+f"(c[i][0]), "+f"(c[i][1]), "+f"(c[i][2]), "+f"(c[i][3])
                             : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        }
    }
    float s = 0.f;
    for (int i = 0; i < 8; ++i) for (int q = 0; q < 4; ++q) s += c[i][q];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def main() -> None:
    major, minor = cp.cuda.Device().compute_capability[0], cp.cuda.Device().compute_capability[1]
    kernel = cp.RawModule(code=SOURCE, options=("-std=c++17", f"--gpu-architecture=sm_{major}{minor}")).get_function("peak")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    blocks, threads, iters = sms * 4, 256, 4096
    out = cp.zeros(blocks * threads, dtype=cp.float32)
    for sparse in (0, 1):
        kernel((blocks,), (threads,), (out, cp.int32(iters), cp.int32(sparse)))
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        kernel((blocks,), (threads,), (out, cp.int32(iters), cp.int32(sparse)))
        end.record()
        end.synchronize()
        ms = cp.cuda.get_elapsed_time(start, end)
        mmas = blocks * threads // 32 * iters * 8
        flops = mmas * 2 * 16 * 8 * (32 if sparse else 16)
        print(f"{'mma.sp m16n8k32' if sparse else 'mma m16n8k16   '}: {flops / ms / 1e9:.0f} dense-equivalent TFLOP/s "
              f"({mmas / ms / 1e6 / sms:.2f} G instr/s per SM)")


if __name__ == "__main__":
    main()
