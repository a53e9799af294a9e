"""The bitmap format, for unstructured sparsity, in the spirit of Flash-LLM's "load as sparse, compute as
dense" (Xia et al., VLDB 2024) with a bitmap instead of its Tiled-CSL index.

It holds the unstructured weights the banded layout (:mod:`secateurs.kernels.banded`, tried first by
:func:`~secateurs.kernels.registry.choose_format`) does not: fewer than 50% or more than 90% zeros, or a weight its
``fits`` refuses. In the bands the banded GEMV was measured faster on an H100 (at 1 token on every shape and band),
although the bitmap is smaller at 50% zeros (1.16 fp16 bytes per weight against 1.30); no option picks the bitmap
there today.

``bits`` (out, in/32) int32 has one bit per weight (1 = stored), ``values`` holds the non-zeros in
row-major order, and ``offsets`` (out, in/SEGMENT) int32 is the index in ``values`` where each row segment
starts, so a kernel can expand any segment alone with a prefix count of its bits. At 70% sparsity fp16
moves 0.30 + 0.0625 + 0.016 ≈ 0.38 of dense. Expanding gives the weight back bit for bit.

Kernels: a Triton tile kernel (per segment: the bits' prefix count gives each kept weight's index in
``values``, the tile is expanded in registers and fed to ``tl.dot``), a Triton GEMV for 1-4 rows, and the
CUDA C++ bitmap GEMV of :mod:`secateurs.kernels.cuda_ops` for one row; from 2 rows on its expand kernel writes the
dense weight into the scratch buffer every format shares (``cuda_ops.scratch``), then cuBLAS runs: prompts keep
no dense copy per layer.

At 5-64 rows also a tensor-core kernel (``cuda/bitmap_tc.cu`` on the engine of ``cuda/tc_tile.cuh`` that the 4:8 and
8:16 kernel uses): a block of 64 output features reads each (row, 16-input chunk)'s bits, segment offset and values
once per token tile, scatters the values into a swizzled dense shared tile and multiplies it by 16-64 tokens with
``mma.sync.m16n8k16``, split-K over blocks with a fixed-order fp32 sum. The expand path it would replace moves about
three times the dense bytes (a 70%-unstructured Llama-2-7B decoded at 0.49x dense at batch 8 on an H100). On an
H100 it matched float64 at every bucket and ran at 0.35-0.77x cuBLAS at 8-64 tokens (50% and 70%, seven Llama
shapes), against 0.36-0.67x for the expand path, so its candidates (``cuda_tcbitmap_n<tokens>_s<split>``) are offered
by default, after the expand path: still slower than dense, bound by the scatter's instructions (about 7 a stored
value), not by bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UsageError
from . import cuda_ops
from .banded import BANDS, LAYOUT_ENV, band_of, layout
from .formats import SparseFormat
from .nm import TC_ROWS, TC_TOKENS, TC_WARPS, tc_built, tc_splits
from .triton_ops import HAVE_TRITON, Config, KBlocks, launch, store_row, store_tile, tl, triton

SEGMENT = 128
TC_SOURCE = cuda_ops.SOURCE.with_name("bitmap_tc.cu")

if HAVE_TRITON:

    @triton.jit
    def _expand_segment(v_ptr, b_ptr, o_ptr, offs_n, n_ok, s, K, BLOCK_N: tl.constexpr, SEG: tl.constexpr):
        """Segment ``s`` of rows ``offs_n``, expanded to a dense (BLOCK_N, SEG) tile: each kept weight's index
        in ``values`` is the segment's offset plus the prefix count of its bits."""
        WORDS: tl.constexpr = SEG // 32
        offs_w = s * WORDS + tl.arange(0, WORDS)
        words = tl.load(b_ptr + offs_n[:, None] * (K // 32) + offs_w[None, :], mask=n_ok[:, None], other=0)
        bits = tl.reshape((words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1, (BLOCK_N, SEG))
        rank = tl.cumsum(bits, axis=1) - bits
        start = tl.load(o_ptr + offs_n * (K // SEG) + s, mask=n_ok, other=0)
        return tl.load(v_ptr + start[:, None] + rank, mask=(bits != 0) & n_ok[:, None], other=0.0)

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
        segs = K // SEG
        n_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s_lo = pid_k * segs_per_split
        s_hi = tl.minimum(segs, s_lo + segs_per_split)
        for s in range(s_lo, s_hi):
            w = _expand_segment(v_ptr, b_ptr, o_ptr, offs_n, n_ok, s, K, BLOCK_N, SEG)
            offs_k = s * SEG + tl.arange(0, SEG)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
            acc += tl.dot(x, tl.trans(w))
        store_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, pid_k, SPLIT_K)

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
        segs = K // SEG
        acc = tl.zeros((BLOCK_N, SEG), dtype=tl.float32)
        s_lo = pid_k * segs_per_split
        s_hi = tl.minimum(segs, s_lo + segs_per_split)
        for s in range(s_lo, s_hi):
            w = _expand_segment(v_ptr, b_ptr, o_ptr, offs_n, n_ok, s, K, BLOCK_N, SEG)
            xv = tl.load(x_ptr + row * stride_xm + s * SEG + tl.arange(0, SEG))
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        out = tl.sum(acc, axis=1)
        store_row(y_ptr, out, row, offs_n, n_ok, M, N, stride_ym, pid_k, SPLIT_K)


@dataclass
class Bitmap(SparseFormat):
    """An unstructured sparse weight: a bitmap, the non-zeros in row-major order, segment offsets."""

    values: torch.Tensor
    bits: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    kind = "bitmap"
    parts = ("values", "bits", "offsets")
    k_blocks = KBlocks(tiles=(SEGMENT,), gemv=(SEGMENT,), medium=SEGMENT, large=(SEGMENT, SEGMENT, SEGMENT))

    @staticmethod
    def fits(weight: torch.Tensor) -> str | None:
        cols = weight.shape[1]
        if cols % SEGMENT:
            return f"bitmap storage needs the input dimension to be a multiple of {SEGMENT} (got {cols})"
        if int((weight != 0).sum()) >= 2**31:
            return "more than 2^31 non-zeros in one weight"
        return None

    @classmethod
    def compress(cls, weight: torch.Tensor) -> Bitmap:
        reason = cls.fits(weight)
        if reason:
            raise UsageError(f"cannot store this weight as a bitmap: {reason}; keep it dense")
        keep = weight != 0
        return cls.from_mask(weight[keep], keep)

    @classmethod
    def from_mask(cls, values: torch.Tensor, mask: torch.Tensor) -> Bitmap:
        """The format from a keep-mask and its values in row-major order (a bitmask checkpoint's)."""
        rows, cols = mask.shape
        device = mask.device
        weights_of_bits = torch.ones(32, dtype=torch.int64, device=device) << torch.arange(32, device=device)
        words = (mask.reshape(rows, cols // 32, 32).to(torch.int64) * weights_of_bits).sum(dim=2)
        bits = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
        counts = mask.reshape(rows, cols // SEGMENT, SEGMENT).sum(dim=2).flatten()
        offsets = (counts.cumsum(0) - counts).to(torch.int32).reshape(rows, cols // SEGMENT).contiguous()
        return cls(values.contiguous(), bits, offsets, (rows, cols))

    def mask(self) -> torch.Tensor:
        rows, cols = self.shape
        shifts = torch.arange(32, device=self.bits.device)
        bits = (self.bits.to(torch.int64).unsqueeze(2) >> shifts) & 1
        return bits.reshape(rows, cols).bool()

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return dense.masked_scatter_(self.mask(), self.values)

    @classmethod
    def why(cls, sparsity: float) -> str:
        """Why the bitmap and not the banded layout, which ``choose_format`` tries first: outside its bands, or a weight
        its ``fits`` refuses (an input width of 65536 or more, or too many non-zeros for its 32-bit offsets), or the
        user's choice (``SECATEURS_UNSTRUCTURED_LAYOUT=bitmap``)."""
        if layout() == "bitmap":
            return f"unstructured {sparsity:.2f}, the bitmap asked for by {LAYOUT_ENV}=bitmap"
        if band_of(sparsity) is None:
            bands = f"{BANDS[0].low * 100:.0f}-{BANDS[-1].high:.0%}"
            return f"unstructured {sparsity:.2f}, outside the banded layout's {bands} zeros"
        return f"unstructured {sparsity:.2f}, a width or non-zero count the banded layout does not hold"

    def triton_matmul(self, x: torch.Tensor, config: Config) -> torch.Tensor:
        """``x @ W.T`` for a 2-D contiguous ``x`` of the weight's dtype (K step = SEGMENT)."""
        segs_per_split = triton.cdiv(self.shape[1] // SEGMENT, config.split_k)
        return launch(_bitmap_kernel, _bitmap_gemv_kernel, x, (self.values, self.bits, self.offsets), self.shape,
                      segs_per_split, config, SEG=SEGMENT)

    def cuda_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The CUDA bitmap GEMV for one row (the two-row one measured slower than cuBLAS); from 2 rows the expand
        path (the weight expanded into the shared scratch, then cuBLAS; it matched float64 on an H100 at every
        bucket), which stages the values with 16-byte loads and so needs them 16-byte aligned; at 5-64 rows the
        tensor-core kernel after it (:meth:`_tc_candidates`); at prompt sizes the pipelined expand path
        (:func:`cuda_ops.pipelined_candidates`)."""
        n, k = self.shape
        if m < 1 or k % SEGMENT or self.bits.dtype != torch.int32 \
                or self.offsets.dtype != torch.int32 or not cuda_ops.ready(self.bits, 4, n, k // 32) \
                or not cuda_ops.ready(self.offsets, 4, n, k // SEGMENT) or not self.values.is_contiguous():
            return {}
        if m > cuda_ops.BITMAP_OFFERED:
            if self.values.dim() != 1 or self.values.data_ptr() % 16:
                return {}
            paths = {"expand_cublas": lambda x: cuda_ops.scratch_matmul(
                         x, self.shape, lambda out: cuda_ops.bitmap_expand(self.values, self.bits, self.offsets, out))}
            if 4 < m <= TC_TOKENS[-1]:
                paths.update(self._tc_candidates(m))
            paths.update(cuda_ops.pipelined_candidates(self, m))
            return paths
        return {f"cuda_gemv_bitmap_r{rows}_s{split}": (
                    lambda x, r=rows, s=split: cuda_ops.bitmap_gemv(x, self.values, self.bits, self.offsets, r, s))
                for split in cuda_ops.splits(n, k // 32 // 32) for rows in (1, 2)}

    def expand_rows(self, start: int, stop: int, out: torch.Tensor, variant: int) -> None:
        """Rows ``[start, stop)`` of the dense weight into the first ``(stop - start) * K`` elements of ``out`` (the
        pipelined expand path's chunk): the expand kernel on the row slices of ``bits`` and ``offsets`` and the whole
        ``values``, since each offset is an absolute index into ``values`` (``expandbm`` adds it to the popcounts
        before a word and bounds its reads by the length of ``values``, never by a row's). ``variant``: the bitmap has
        one expand kernel."""
        cuda_ops.bitmap_expand(self.values, self.bits[start:stop], self.offsets[start:stop], out)

    def _tc_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The tensor-core kernel at ``m`` rows (5-64): the smallest token tile that holds them, each split-K choice of
        :func:`~secateurs.kernels.nm.tc_splits`; nothing where the bits are not 16-byte aligned (a segment's four words
        are one load) or the module does not build (said once: the layer keeps its expand path)."""
        if self.bits.data_ptr() % 16 or not tc_built(self.values.device, TC_SOURCE, "bitmap"):
            return {}
        tokens = next(t for t in TC_TOKENS if t >= m)
        return {f"cuda_tcbitmap_n{tokens}_s{split}": (
                    lambda x, s=split: bitmap_tc(x, self.values, self.bits, self.offsets, tokens, s))
                for split in tc_splits(*self.shape)}


@torch.library.custom_op("secateurs::bitmap_tc", mutates_args=())
def bitmap_tc(x: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor, tokens: int,
              split: int) -> torch.Tensor:
    """``x @ W.T`` for a bitmap weight on tensor cores (``bitmap_tc.cu``) and any number of rows of
    x: blocks of 64 output features x ``tokens`` rows (16, 32 or 64), ``split`` blocks sharing each feature tile's K.
    With ``split`` > 1 each block writes fp32 partial sums to its slice of a (split, M, N) workspace and
    ``tcsum_<dtype>`` adds them in split order (deterministic, no atomics). ``values`` is passed with its length: the
    kernel reads it in 16-byte vectors and never past its end."""
    x = cuda_ops._aligned(x)
    m, k = x.shape
    n = bits.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    work = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    suffix = cuda_ops._SUFFIX[x.dtype]
    blocks = -(-n // TC_ROWS) * split * -(-m // tokens)
    cuda_ops._launch(f"tcbm_{suffix}_n{tokens}", blocks, (x, values, bits, offsets, y, work),
                     (m, n, k, split, values.numel()), TC_WARPS, source=TC_SOURCE)
    if split > 1:
        threads = cuda_ops.WARPS * 32
        cuda_ops._launch(f"tcsum_{suffix}", -(-m * n // threads), (work, y), (m * n, split), source=TC_SOURCE)
    return y


@bitmap_tc.register_fake
def _(x, values, bits, offsets, tokens, split):
    return x.new_empty(x.shape[0], bits.shape[0])
