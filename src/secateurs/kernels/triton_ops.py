"""Triton kernels that read compressed weights and multiply on tensor cores ("load as sparse, compute as dense").

Both kernels compute ``y = x @ W.T`` for ``x`` (M, K) and a compressed (N, K) weight. Each program
owns a BLOCK_M x BLOCK_N tile of ``y``; per K step it loads the compressed tile (the only bytes that
come from memory), expands it to a dense BLOCK_N x BLOCK_K tile in registers and feeds ``tl.dot``.
Skinny (decode) shapes are weight-bound and leave most SMs idle with one program per N tile, so
``SPLIT_K`` > 1 splits K across programs that write fp32 partial sums, added afterwards in a fixed
order (deterministic, unlike atomics).

For one to a few activation rows (batch-1 decode) a tensor-core tile is mostly padding and the
expansion's register shuffles cost more than the bytes saved, so ``gemv`` configurations use a
second pair of kernels: each program streams its rows of compressed values with wide loads, looks
up the activation each kept value multiplies (a gather from a vector that sits in L1), and
accumulates in fp32 on the CUDA cores, one activation row per program.

With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how CI checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import SEGMENT, Bitmap, Sparse24

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional extra; callers fall back to the reference path
    triton = None
    tl = None

HAVE_TRITON = triton is not None


@dataclass(frozen=True)
class Config:
    """One launch configuration: tile sizes, K split, warps and pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False


if HAVE_TRITON:

    @triton.jit
    def _sparse24_kernel(
        x_ptr, v_ptr, m_ptr, y_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        G: tl.constexpr = BLOCK_K // 4
        half = K // 2
        eighth = K // 8
        pos = tl.arange(0, 4)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            n_ok = offs_n[:, None] < N
            vals = tl.load(v_ptr + offs_n[:, None] * half + offs_v[None, :],
                           mask=n_ok & (offs_v[None, :] < half), other=0.0)
            meta = tl.load(m_ptr + offs_n[:, None] * eighth + offs_b[None, :],
                           mask=n_ok & (offs_b[None, :] < eighth), other=0).to(tl.int32)
            nibbles = tl.reshape(tl.join(meta & 15, meta >> 4), (BLOCK_N, G))
            v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, G, 2)))
            i0 = (nibbles & 3)[:, :, None]
            i1 = (nibbles >> 2)[:, :, None]
            zero = tl.zeros((BLOCK_N, G, 4), dtype=vals.dtype)
            dense = tl.where(pos[None, None, :] == i0, v0[:, :, None],
                             tl.where(pos[None, None, :] == i1, v1[:, :, None], zero))
            w = tl.reshape(dense, (BLOCK_N, BLOCK_K))
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_hi), other=0.0)
            acc += tl.dot(x, tl.trans(w))
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            base = y_ptr + pid_k * M * N
            tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)

    @triton.jit
    def _bitmap_kernel(
        x_ptr, v_ptr, b_ptr, o_ptr, y_ptr, M, N, K, stride_xm, stride_ym, segs_per_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEG: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        WORDS: tl.constexpr = SEG // 32
        words_per_row = K // 32
        segs = K // SEG
        shifts = tl.arange(0, 32)
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s_lo = pid_k * segs_per_split
        s_hi = tl.minimum(segs, s_lo + segs_per_split)
        for s in range(s_lo, s_hi):
            offs_w = s * WORDS + tl.arange(0, WORDS)
            words = tl.load(b_ptr + offs_n[:, None] * words_per_row + offs_w[None, :], mask=n_ok[:, None], other=0)
            bits = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_N, SEG))
            rank = tl.cumsum(bits, axis=1) - bits
            start = tl.load(o_ptr + offs_n * segs + s, mask=n_ok, other=0)
            w = tl.load(v_ptr + start[:, None] + rank, mask=(bits != 0) & n_ok[:, None], other=0.0)
            offs_k = s * SEG + tl.arange(0, SEG)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
            acc += tl.dot(x, tl.trans(w))
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            base = y_ptr + pid_k * M * N
            tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)

    @triton.jit
    def _sparse24_gemv_kernel(
        x_ptr, v_ptr, m_ptr, y_ptr, M, N, K, stride_xm, stride_ym, k_per_split,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        HALF: tl.constexpr = BLOCK_K // 2
        j = tl.arange(0, HALF)
        # Value j of a K block sits in group j // 2; its 2-bit position is at bit (j % 4) * 2 of byte j // 4.
        group_col = (j // 2) * 4
        shift = (j % 4) * 2
        half = K // 2
        eighth = K // 8
        acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_v = k0 // 2 + j
            ok = n_ok[:, None] & (offs_v[None, :] < k_hi // 2)
            vals = tl.load(v_ptr + offs_n[:, None] * half + offs_v[None, :], mask=ok, other=0.0)
            meta = tl.load(m_ptr + offs_n[:, None] * eighth + (offs_v // 4)[None, :], mask=ok, other=0).to(tl.int32)
            col = k0 + group_col[None, :] + ((meta >> shift[None, :]) & 3)
            xv = tl.load(x_ptr + row * stride_xm + col, mask=ok, other=0.0)
            acc += vals.to(tl.float32) * xv.to(tl.float32)
        out = tl.sum(acc, axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(y_ptr + pid_k * M * N + row * N + offs_n, out, mask=n_ok)

    @triton.jit
    def _bitmap_gemv_kernel(
        x_ptr, v_ptr, b_ptr, o_ptr, y_ptr, M, N, K, stride_xm, stride_ym, segs_per_split,
        BLOCK_N: tl.constexpr, SEG: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        WORDS: tl.constexpr = SEG // 32
        words_per_row = K // 32
        segs = K // SEG
        shifts = tl.arange(0, 32)
        acc = tl.zeros((BLOCK_N, SEG), dtype=tl.float32)
        s_lo = pid_k * segs_per_split
        s_hi = tl.minimum(segs, s_lo + segs_per_split)
        for s in range(s_lo, s_hi):
            offs_w = s * WORDS + tl.arange(0, WORDS)
            words = tl.load(b_ptr + offs_n[:, None] * words_per_row + offs_w[None, :], mask=n_ok[:, None], other=0)
            bits = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_N, SEG))
            rank = tl.cumsum(bits, axis=1) - bits
            start = tl.load(o_ptr + offs_n * segs + s, mask=n_ok, other=0)
            w = tl.load(v_ptr + start[:, None] + rank, mask=(bits != 0) & n_ok[:, None], other=0.0)
            xv = tl.load(x_ptr + row * stride_xm + s * SEG + tl.arange(0, SEG))
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        out = tl.sum(acc, axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(y_ptr + pid_k * M * N + row * N + offs_n, out, mask=n_ok)


def _output(x: torch.Tensor, n: int, split_k: int) -> torch.Tensor:
    m = x.shape[0]
    if split_k == 1:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    return torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)


def _finish(y: torch.Tensor, split_k: int, dtype: torch.dtype) -> torch.Tensor:
    return y if split_k == 1 else y.sum(dim=0).to(dtype)


def sparse24_matmul(x: torch.Tensor, fmt: Sparse24, config: Config) -> torch.Tensor:
    """``x @ W.T`` for a 2-D contiguous ``x`` and a :class:`Sparse24` weight of the same dtype."""
    n, k = fmt.shape
    m = x.shape[0]
    step = config.split_k * config.block_k
    k_per_split = triton.cdiv(k, step) * config.block_k
    y = _output(x, n, config.split_k)
    if config.gemv:
        _sparse24_gemv_kernel[(triton.cdiv(n, config.block_n), config.split_k, m)](
            x, fmt.values, fmt.meta, y, m, n, k, x.stride(0), y.stride(-2), k_per_split,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return _finish(y, config.split_k, x.dtype)
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
    _sparse24_kernel[grid](
        x, fmt.values, fmt.meta, y, m, n, k, x.stride(0), y.stride(-2), k_per_split,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return _finish(y, config.split_k, x.dtype)


def bitmap_matmul(x: torch.Tensor, fmt: Bitmap, config: Config) -> torch.Tensor:
    """``x @ W.T`` for a 2-D contiguous ``x`` and a :class:`Bitmap` weight (K step = the format's SEGMENT)."""
    n, k = fmt.shape
    m = x.shape[0]
    segs = k // SEGMENT
    segs_per_split = triton.cdiv(segs, config.split_k)
    y = _output(x, n, config.split_k)
    if config.gemv:
        _bitmap_gemv_kernel[(triton.cdiv(n, config.block_n), config.split_k, m)](
            x, fmt.values, fmt.bits, fmt.offsets, y, m, n, k, x.stride(0), y.stride(-2), segs_per_split,
            BLOCK_N=config.block_n, SEG=SEGMENT, SPLIT_K=config.split_k,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return _finish(y, config.split_k, x.dtype)
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
    _bitmap_kernel[grid](
        x, fmt.values, fmt.bits, fmt.offsets, y, m, n, k, x.stride(0), y.stride(-2), segs_per_split,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, SEG=SEGMENT, SPLIT_K=config.split_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return _finish(y, config.split_k, x.dtype)


def candidates(kind: str, m: int) -> list[Config]:
    """The launch configurations tried for ``m`` rows of activations; the tuner times each."""
    if m <= 16:
        ks = (256, 128) if kind == "2:4" else (SEGMENT,)
        tiles = [Config(16, bn, k, split, 4, 4) for k in ks for bn in (32, 64) for split in (1, 2, 4)]
        if m > 4:
            return tiles
        gemv_ks = (512, 256) if kind == "2:4" else (SEGMENT,)
        return [Config(1, bn, k, split, warps, 3, gemv=True) for k in gemv_ks for bn in (8, 16, 32)
                for split in (1, 2, 4) for warps in (4, 8) if bn * k <= 8192] + tiles
    if m <= 128:
        return [Config(bm, bn, 128 if kind == "2:4" else SEGMENT, split, 4, 3)
                for bm in (32, 64) for bn in (64, 128) for split in (1, 2)][: 6 if m > 32 else 4]
    return [Config(128, 128, 64 if kind == "2:4" else SEGMENT, 1, 8, 3),
            Config(128, 64, 128 if kind == "2:4" else SEGMENT, 1, 4, 3),
            Config(64, 128, 128 if kind == "2:4" else SEGMENT, 1, 4, 4)]


def default_config(kind: str, m: int) -> Config:
    """A reasonable untimed choice (used when timing is off or impossible, e.g. during graph capture)."""
    return candidates(kind, m)[0]


def run(x: torch.Tensor, fmt: Sparse24 | Bitmap, config: Config) -> torch.Tensor:
    if fmt.kind == "2:4":
        return sparse24_matmul(x, fmt, config)
    return bitmap_matmul(x, fmt, config)
