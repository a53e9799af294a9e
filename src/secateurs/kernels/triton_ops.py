"""Triton for the compressed formats ("load as sparse, compute as dense"): the launch configurations the
dispatcher tries (from a format's K blocks) and the helpers every format's kernels share. The kernels
themselves live in their format's file (``kernels/sparse24.py``, ``kernels/bitmap.py``), called as
``fmt.triton_matmul(x, config)``.

Each kernel computes ``y = x @ W.T`` for ``x`` (M, K) and a compressed (N, K) weight. Each program
owns a BLOCK_M x BLOCK_N tile of ``y``; per K step it loads the compressed tile (the only bytes that
come from memory), expands it to a dense BLOCK_N x BLOCK_K tile in registers and feeds ``tl.dot``.
Skinny (decode) shapes are weight-bound and leave most SMs idle with one program per N tile, so
``SPLIT_K`` > 1 splits K across programs that write fp32 partial sums, added afterwards in a fixed
order (deterministic, unlike atomics).

For one to a few activation rows (batch-1 decode) a tensor-core tile is mostly padding and the
expansion's register shuffles cost more than the bytes saved, so ``gemv`` configurations use a
second kernel per format: each program streams its rows of compressed values with wide loads, looks
up the activation each kept value multiplies (a gather from a vector that sits in L1), and
accumulates in fp32 on the CUDA cores, one activation row per program.

With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how CI checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class KBlocks:
    """The K-block sizes the Triton candidates try, per row regime; a format's layout decides which fit
    (2:4 needs multiples of 8, a bitmap steps one offset segment at a time)."""

    tiles: tuple[int, ...]  # 1-16 rows, tensor-core tiles
    gemv: tuple[int, ...]  # 1-4 rows, the GEMV kernels
    medium: int  # 17-128 rows
    large: tuple[int, int, int]  # more rows: one per configuration tried


def output_buffer(x: torch.Tensor, n: int, split_k: int) -> torch.Tensor:
    """Where a kernel writes: ``y`` itself, or fp32 partial sums per K split (added by :func:`reduce_splits`)."""
    m = x.shape[0]
    if split_k == 1:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    return torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)


if HAVE_TRITON:

    @triton.jit
    def store_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, pid_k, SPLIT_K: tl.constexpr):
        """A tile kernel's (BLOCK_M, BLOCK_N) fp32 result: into ``y`` itself, or its K split's partial sums."""
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT_K == 1:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            base = y_ptr + pid_k * M * N
            tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)

    @triton.jit
    def store_row(y_ptr, out, row, offs_n, n_ok, M, N, stride_ym, pid_k, SPLIT_K: tl.constexpr):
        """A GEMV kernel's fp32 outputs ``offs_n`` of one row: into ``y`` itself, or its K split's partial sums."""
        if SPLIT_K == 1:
            tl.store(y_ptr + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(y_ptr + pid_k * M * N + row * N + offs_n, out, mask=n_ok)


def launch(tile_kernel, gemv_kernel, x: torch.Tensor, parts: tuple[torch.Tensor, ...], shape: tuple[int, int],
           per_split: int, config: Config, **meta: int) -> torch.Tensor:
    """``x @ W.T`` through a format's Triton kernels, called as ``kernel(x, *parts, y, M, N, K, stride_xm,
    stride_ym, per_split, BLOCK_M?, BLOCK_N, **meta, SPLIT_K)``: the GEMV kernel (one program per row) for a
    ``gemv`` configuration, else the tile kernel; ``per_split``: the K each split covers, in the kernel's units."""
    n, k = shape
    m = x.shape[0]
    y = output_buffer(x, n, config.split_k)
    args = (x, *parts, y, m, n, k, x.stride(0), y.stride(-2), per_split)
    tuning = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.gemv:
        gemv_kernel[(triton.cdiv(n, config.block_n), config.split_k, m)](
            *args, BLOCK_N=config.block_n, **meta, SPLIT_K=config.split_k, **tuning)
    else:
        grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(m, config.block_m))
        tile_kernel[grid](*args, BLOCK_M=config.block_m, BLOCK_N=config.block_n, **meta, SPLIT_K=config.split_k, **tuning)
    return reduce_splits(y, config.split_k, x.dtype)


def reduce_splits(y: torch.Tensor, split_k: int, dtype: torch.dtype) -> torch.Tensor:
    """The K splits' partial sums added in a fixed order (deterministic, unlike atomics)."""
    return y if split_k == 1 else y.sum(dim=0).to(dtype)


def candidates(blocks: KBlocks, m: int) -> list[Config]:
    """The launch configurations tried for ``m`` rows of activations; the tuner times each. The tiles
    are shared, the K blocks are the format's (its ``k_blocks``)."""
    if m <= 16:
        tiles = [Config(16, bn, k, split, 4, 4) for k in blocks.tiles for bn in (32, 64) for split in (1, 2, 4)]
        if m > 4:
            return tiles
        return [Config(1, bn, k, split, warps, 3, gemv=True) for k in blocks.gemv for bn in (8, 16, 32)
                for split in (1, 2, 4) for warps in (4, 8) if bn * k <= 8192] + tiles
    if m <= 128:
        return [Config(bm, bn, blocks.medium, split, 4, 3)
                for bm in (32, 64) for bn in (64, 128) for split in (1, 2)][: 6 if m > 32 else 4]
    large = blocks.large
    return [Config(128, 128, large[0], 1, 8, 3), Config(128, 64, large[1], 1, 4, 3), Config(64, 128, large[2], 1, 4, 4)]


def default_config(blocks: KBlocks, m: int) -> Config:
    """A reasonable untimed choice (used when timing is off or impossible, e.g. during graph capture)."""
    return candidates(blocks, m)[0]
