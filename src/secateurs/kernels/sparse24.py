"""The 2:4 format (the tensor-core pattern): every run of 4 inputs keeps at most 2 weights.

``values`` (out, in/2) holds the two kept weights of each group, ``meta`` (out, in/8) uint8 holds their
positions, 2 bits each, two groups per byte (low nibble = even group). fp16 bytes moved: values 0.5 +
metadata 0.0625 = 0.5625 of dense, the figure the cuSPARSELt layout also reaches. Expanding gives the
weight back bit for bit. A 2:4 bitmask checkpoint (compressed-tensors ``sparse-24-bitmask``) stores the
same values in the same order, so it loads with no value moved.

Kernels: a Triton tile kernel (each K step loads the compressed tile, expands it in registers and feeds
``tl.dot``) and a Triton GEMV for 1-4 rows (value ``j`` of a K block multiplies the activation its 2-bit
position names, gathered from a vector in L1); the CUDA C++ GEMV, ``mma.sp`` decode kernel, tiled ``mma.sp``
prompt GEMM (and on Hopper the ``wgmma.sp`` one of :mod:`secateurs.kernels.wgmma`) and expand-into-scratch path of
:mod:`secateurs.kernels.cuda_ops`, all reading ``values`` and ``meta`` as stored (one position table in memory);
and cuSPARSELt through torch's semi-structured layout
(only as an explicit copy, ``SECATEURS_SPARSE_COPIES=sparse``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import cuda_ops, registry, wgmma
from .formats import SparseFormat
from .triton_ops import HAVE_TRITON, Config, KBlocks, launch, store_row, store_tile, tl, triton

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
        store_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, pid_k, SPLIT_K)

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
        store_row(y_ptr, out, row, offs_n, n_ok, M, N, stride_ym, pid_k, SPLIT_K)


@dataclass
class Sparse24(SparseFormat):
    """A 2:4 weight: two kept values per group of four inputs and their 2-bit positions."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    kind = "2:4"
    parts = ("values", "meta")
    any_sparsity = True
    checkpoint_storage = "sparse-24-bitmask"
    cusparselt = True
    k_blocks = KBlocks(tiles=(256, 128), gemv=(512, 256), medium=128, large=(64, 128, 128))

    @staticmethod
    def fits(weight: torch.Tensor) -> str | None:
        """None when ``weight`` fits the format, else the reason it does not."""
        rows, cols = weight.shape
        if cols % 8:
            return f"2:4 storage needs the input dimension to be a multiple of 8 (got {cols})"
        if bool(((weight != 0).reshape(rows, cols // 4, 4).sum(dim=2) > 2).any()):
            return "some group of 4 inputs has more than 2 non-zeros"
        return None

    @classmethod
    def compress(cls, weight: torch.Tensor) -> Sparse24:
        reason = cls.fits(weight)
        if reason:
            raise registry.refusal(cls, weight, reason)
        rows, cols = weight.shape
        groups = weight.reshape(rows, cols // 4, 4)
        positions = _first_two(groups != 0)
        values = groups.gather(2, positions).reshape(rows, cols // 2).contiguous()
        return cls(values, _meta(positions), (rows, cols))

    @classmethod
    def from_mask(cls, values: torch.Tensor, mask: torch.Tensor) -> Sparse24:
        """The format from exactly two kept positions per group of 4 (``mask``) and their values in
        row-major order, (out, in/2): how a 2:4 bitmask checkpoint stores them, so no value moves."""
        rows, cols = mask.shape
        groups = mask.reshape(rows, cols // 4, 4)
        if not bool((groups.sum(dim=2) == 2).all()):
            raise ValueError("some group of 4 inputs does not keep exactly 2 positions")
        return cls(values.reshape(rows, cols // 2).contiguous(), _meta(_first_two(groups)), (rows, cols))

    def mask(self) -> torch.Tensor:
        """(out, in) bool: the two stored positions of every group (a stored value may be zero)."""
        rows, cols = self.shape
        kept = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device=self.meta.device)
        return kept.scatter_(2, self.positions(), True).reshape(rows, cols)

    def positions(self) -> torch.Tensor:
        """(out, in/4, 2) int64 positions of the two kept values inside each group."""
        rows, cols = self.shape
        meta = self.meta.to(torch.int64)
        nibbles = torch.stack([meta & 15, meta >> 4], dim=2).reshape(rows, cols // 4)
        return torch.stack([nibbles & 3, (nibbles >> 2) & 3], dim=2)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        dense = torch.zeros(rows, cols // 4, 4, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(2, self.positions(), self.values.reshape(rows, cols // 4, 2))
        return dense.reshape(rows, cols)

    def triton_matmul(self, x: torch.Tensor, config: Config) -> torch.Tensor:
        """``x @ W.T`` for a 2-D contiguous ``x`` of the weight's dtype."""
        k_per_split = triton.cdiv(self.shape[1], config.split_k * config.block_k) * config.block_k
        return launch(_sparse24_kernel, _sparse24_gemv_kernel, x, (self.values, self.meta), self.shape,
                      k_per_split, config, BLOCK_K=config.block_k)

    def cuda_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The CUDA kernels for ``m`` rows, each reading the stored values and positions (no copy, no derived
        table): the 2:4 GEMV (1-4 rows) and tensor-core kernel (1-32 rows), in the order measured on an H200
        (benchmarks/sparse_kernels.py --part kernels: the tensor-core kernel first, except on narrow weights,
        N <= 2048, at 1-2 tokens, where the GEMV's split-K keeps more loads in flight); from 32 rows on the
        tiled ``mma.sp`` GEMM (a few tile shapes), on an H100/H200 the ``wgmma.mma_async.sp`` GEMM
        (:mod:`secateurs.kernels.wgmma`, its configurations cleared on an H100: :data:`wgmma.CLEARED`) and the expand
        path (the weight expanded into one scratch buffer shared by all layers, then cuBLAS), also in its pipelined
        form (:func:`cuda_ops.pipelined_candidates`); at row buckets 32 and 64 also, last, the wide decode kernel
        (:meth:`_wide_candidates`; the fastest there on six of seven Llama shapes at 32 rows on an H100)."""
        n, k = self.shape
        if k % 16 or not cuda_ops.ready(self.values, 16, n, k // 2) or not cuda_ops.ready(self.meta, 8, n, k // 8):
            return {}
        gemv: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if m <= cuda_ops.TOKENS_24[-1]:
            for split in cuda_ops.splits(n, k // 16 // 32):
                for rows in ((1, 2, 4) if m == 1 else (2, 4, 1)):
                    gemv[f"cuda_gemv24_r{rows}_s{split}"] = (
                        lambda x, r=rows, s=split: cuda_ops.sparse24_gemv(x, self.values, self.meta, r, s))
        mma: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if cuda_ops.MMA_TOKENS[0] <= m <= cuda_ops.MMA_TOKENS[1] and k % 64 == 0:
            for rows, warps in _mma_shapes(n, (m + 7) // 8):
                mma[f"cuda_mma24_r{rows}_w{warps}"] = (
                    lambda x, r=rows, w=warps: cuda_ops.sparse24_mma(x, self.values, self.meta, r, w))
        prompt: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if m >= cuda_ops.GEMM_TOKENS:
            if k % 64 == 0:
                for config in gemm_configs(n, m):
                    prompt[f"cuda_gemm24_{config}"] = (
                        lambda x, c=config: cuda_ops.sparse24_gemm(x, self.values, self.meta, c))
            prompt.update(wgmma.candidates(self.values, self.meta, self.shape, m))  # Hopper only
            prompt["expand_cublas"] = lambda x: cuda_ops.expand_matmul(x, self.values, self.meta, self.shape)
            prompt.update(cuda_ops.pipelined_candidates(self, m))
            return {**prompt, **mma, **self._wide_candidates(m)}
        return {**gemv, **mma} if n <= 2048 and m <= 2 else {**mma, **gemv}

    def _wide_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The wide decode kernel (``cuda_wide24_<config>_s<splits>``, :func:`cuda_ops.sparse24_wide`) at row buckets
        32 and 64: each offered configuration (:func:`cuda_ops.wide_configs`) whose token tile is the bucket, at its
        split-K choices (:func:`cuda_ops.wide_splits`). Checked on an H100 (``benchmarks/gpu_kernel_check.py --part cuda
        --formats 2:4 --only wide24``: 636 checks, fp16/bf16, 10 shapes, m = 1..8192, 0 failures, worst relative error
        1.7e-3) and timed there (``sparse_kernels.py --part kernels``): the fastest stored-format path at 32 rows on six
        of seven Llama shapes (28672 x 8192 1.55x cuBLAS, 8192 x 28672 1.44x, 4096 x 4096 kept cuda_mma24_r2_w8) and at
        64 rows on four (28672 x 8192 1.14x, 8192 x 28672 1.04x), so offered by default, the configuration never
        within 3% of the fastest (:data:`cuda_ops.WIDE_DOMINATED`) only under ``SECATEURS_UNVERIFIED_KERNELS=1``.

        Offered after every other candidate, as when it was opt-in: the dispatcher keeps the earlier of two equal
        timings, and the untimed choices (tuning off, a bucket first met inside CUDA-graph capture, a layer not
        offered its shape's plan) run the first candidate, so being last changes only the timed choices it wins."""
        n, k = self.shape
        low, high = cuda_ops.WIDE_TOKENS
        device = self.values.device
        if not low < m <= high or k % cuda_ops.WIDE_STEP \
                or wgmma.capability(device) < cuda_ops.MIN_CAPABILITY:  # mma.sp: sm_80 on; a CPU weight: none
            return {}
        tile = min(t for t in map(cuda_ops.wide_tokens, cuda_ops.WIDE_CONFIGS) if t >= m)
        sms = wgmma.sm_count(device)
        return {f"cuda_wide24_{config}_s{split}": (
                    lambda x, c=config, s=split: cuda_ops.sparse24_wide(x, self.values, self.meta, c, s))
                for config in cuda_ops.wide_configs() if cuda_ops.wide_tokens(config) == tile
                for split in cuda_ops.wide_splits(config, n, k, sms)}

    def expand_rows(self, start: int, stop: int, out: torch.Tensor, variant: int) -> None:
        """Rows ``[start, stop)`` of the dense weight into the first ``(stop - start) * K`` elements of ``out`` (the
        pipelined expand path's chunk): values and positions are per-row tables, so the expand kernel runs on their
        row slices as on a whole weight. ``variant``: 2:4 has one expand kernel."""
        cuda_ops.sparse24_expand(self.values[start:stop], self.meta[start:stop], out)


def gemm_configs(n: int, m: int) -> list[str]:
    """The prompt GEMM's tile shapes for ``m`` tokens, the measured best first (H100, benchmarks/sparse_kernels.py
    --part gemm): small token tiles (and more blocks) for short prompts, 128 x 128 up to 1024 tokens, 128
    features x 256 tokens from 2048."""
    if m <= 64:
        return ["m64_n32_s4", "m64_n64_s4", "m128_n64_s4"]
    if m <= 256:
        return ["m128_n64_s4", "m64_n64_s4", "m128_n128_s4"]
    if m <= 1024:
        return ["m128_n128_s4", "m128_n64_s4", "m256_n128_s3"]
    return ["m128_n256_s3", "m128_n128_s4", "m256_n128_s3"]


def _mma_shapes(n: int, token_tiles: int) -> list[tuple[int, int]]:
    """(row tiles per block, warps) for the tensor-core kernel, the measured best first: 16 or 32 warps a
    tile where tiles are few; at 9-16 tokens several row tiles share each x fragment on wide weights;
    17-32 tokens run four 8-token tiles."""
    if token_tiles > 2:
        return list(cuda_ops.MMA_SHAPES[4])
    shapes = list(cuda_ops.MMA_SHAPES[token_tiles])
    if n <= 2048:
        first = (1, 32)
    elif token_tiles == 1:
        first = (1, 16) if n <= 4096 else (1, 8)
    else:
        first = (4, 8) if n >= 11008 else (2, 8) if n >= 8192 else (1, 16)
    return [first] + [shape for shape in shapes if shape != first]


def _first_two(groups: torch.Tensor) -> torch.Tensor:
    """(out, in/4, 2) ascending positions of the first two kept entries of each group of a bool
    (out, in/4, 4) tensor, padded with unkept ones; a stable sort keeps the choice deterministic."""
    return (~groups).to(torch.int8).argsort(dim=2, stable=True)[:, :, :2].sort(dim=2).values


def _meta(positions: torch.Tensor) -> torch.Tensor:
    """Two 2-bit positions per group into a nibble, two groups per byte (low nibble = even group)."""
    rows, groups, _ = positions.shape
    nibble = (positions[:, :, 0] | (positions[:, :, 1] << 2)).to(torch.uint8)
    pairs = nibble.reshape(rows, groups // 2, 2)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).contiguous()
