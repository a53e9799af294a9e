"""The 4:8 format: every run of 8 inputs keeps at most 4 weights, each named by a 3-bit position.

4:8 loses far less quality than 2:4 at the same density (Llama-2-7B WikiText-2, Wanda: 50% 6.42, 4:8
7.97, 2:4 11.02) and at decode sizes any N:M is bound by the bytes read, not by the tensor cores, so a
GEMV of its own keeps most of 2:4's speed-up. fp16 bytes per weight: values 1.0 + positions 0.1875 =
1.1875 (the limit over dense is 2 / 1.1875 ≈ 1.68x; 2:4's is 1.78x).

Tensors, laid out for the decode kernel (``kernels/cuda/sparse48.cu``), which reads 16 inputs (two groups,
eight stored values, four value pairs) per 16-byte load of values:

- ``values`` (out, in/2): the four kept weights of each group of 8 in column order (a kept value may be
  zero, as where a group holds fewer than four non-zeros);
- ``meta`` (out, in/8) uint8, read as one little-endian 16-bit word per 16 inputs: the low two bits of
  the positions, value 2i's at bits 2i..2i+1 and value 2i+1's at bits 8+2i..9+2i for pair i = 0..3, so
  ``(word >> 2i) & 0x0303`` times 0x22 plus 0x1010 is the byte-permute selector that picks the pair's two
  activations out of the four registers of its group's low or high half;
- ``high`` (out, in/16) uint8, one byte per 16 inputs: the positions' third bits, value 2i's at bit i and
  value 2i+1's at bit 4 + i, which choose between the two halves with a second byte-permute.

Expanding gives the weight back bit for bit. Prompts (8 rows and more) expand the stored tensors into the scratch
buffer every format shares (``cuda_ops.scratch``), then run cuBLAS: no dense copy is kept per layer. Checkpoints keep it in compressed-tensors ``sparse-bitmask``
(:mod:`secateurs.kernels.compressed`), which holds any pattern; a bitmask whose weight fits 4:8 loads as
4:8 again (:func:`secateurs.kernels.registry.choose_format`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from . import cuda_ops
from .formats import SparseFormat

GROUP = 8
KEPT = 4
CHUNK = 16  # inputs per 16-byte load of values: the kernel's step and the width the format requires
MAX_SPARSITY = 0.625
"""Past 3:8's fraction of zeros the bitmap holds a weight in far fewer bytes (0.9 of 4:8's at 62.5%), so a
very sparse weight that happens to fit 4:8 goes there instead."""
SOURCE = Path(__file__).with_name("cuda") / "sparse48.cu"
TOKENS = (1, 2, 4)  # token counts the kernel is instantiated for (m = 3 runs the 4 variant)
# Rows per warp group instantiated for each token count, the measured best first (H100, benchmarks/sparse48.py:
# 2 rows won 14 of the 21 shape x token cells, 4 rows 4 and 1 row 3, where 2 rows came within 6%).
ROWS = {1: (2, 1, 4), 2: (2, 4, 1), 4: (2, 1)}
EXPAND_CHUNKS = (1, 4)  # 16-input chunks per thread of the expand kernel (expand48_c<C>), in the order offered


@dataclass
class Nm48(SparseFormat):
    """A 4:8 weight: four kept values per group of eight inputs and their 3-bit positions."""

    values: torch.Tensor
    meta: torch.Tensor
    high: torch.Tensor
    shape: tuple[int, int]

    kind = "4:8"
    parts = ("values", "meta", "high")
    any_sparsity = True

    @staticmethod
    def supports(weight: torch.Tensor) -> str | None:
        """None when ``weight`` fits the format, else the reason it does not."""
        rows, cols = weight.shape
        if cols % CHUNK:
            return f"4:8 storage needs the input dimension to be a multiple of {CHUNK} (got {cols})"
        nonzero = (weight != 0).reshape(rows, cols // GROUP, GROUP).sum(dim=2)
        if bool((nonzero > KEPT).any()):
            return "some group of 8 inputs has more than 4 non-zeros"
        if 1.0 - float(nonzero.sum()) / weight.numel() > MAX_SPARSITY:
            return f"more than {MAX_SPARSITY:.1%} zeros: the bitmap stores it in fewer bytes"
        return None

    @classmethod
    def compress(cls, weight: torch.Tensor) -> Nm48:
        reason = cls.supports(weight)
        if reason:
            raise UsageError(f"weight is not stored as 4:8 ({reason}); prune with --pattern 4:8 first")
        rows, cols = weight.shape
        groups = weight.reshape(rows, cols // GROUP, GROUP)
        positions = _first_four(groups != 0)
        values = groups.gather(2, positions).reshape(rows, cols // 2).contiguous()
        return cls(values, *_pack(positions))

    @classmethod
    def from_mask(cls, values: torch.Tensor, mask: torch.Tensor) -> Nm48:
        """The format from exactly four kept positions per group of 8 (``mask``) and their values in
        row-major order, (out, in/2)."""
        rows, cols = mask.shape
        groups = mask.reshape(rows, cols // GROUP, GROUP)
        if not bool((groups.sum(dim=2) == KEPT).all()):
            raise ValueError("some group of 8 inputs does not keep exactly 4 positions")
        return cls(values.reshape(rows, cols // 2).contiguous(), *_pack(_first_four(groups)))

    def mask(self) -> torch.Tensor:
        """(out, in) bool: the four stored positions of every group (a stored value may be zero)."""
        rows, cols = self.shape
        kept = torch.zeros(rows, cols // GROUP, GROUP, dtype=torch.bool, device=self.meta.device)
        return kept.scatter_(2, self.positions(), True).reshape(rows, cols)

    def positions(self) -> torch.Tensor:
        """(out, in/8, 4) int64 positions of the four kept values inside each group."""
        rows, cols = self.shape
        chunks = cols // CHUNK
        words = self.meta.reshape(rows, chunks, 2).to(torch.int64)
        word = words[:, :, 0] | (words[:, :, 1] << 8)
        high = self.high.to(torch.int64)
        pair = torch.arange(4, device=self.meta.device)
        low = torch.stack([(word.unsqueeze(2) >> (2 * pair)) & 3, (word.unsqueeze(2) >> (8 + 2 * pair)) & 3], dim=3)
        top = torch.stack([(high.unsqueeze(2) >> pair) & 1, (high.unsqueeze(2) >> (4 + pair)) & 1], dim=3)
        return (low | (top << 2)).reshape(rows, cols // GROUP, KEPT)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        dense = torch.zeros(rows, cols // GROUP, GROUP, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(2, self.positions(), self.values.reshape(rows, cols // GROUP, KEPT))
        return dense.reshape(rows, cols)

    def cuda_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The 4:8 GEMV for 1-4 rows: each row count's instantiated rows per warp group (default first), at the
        split-K choices of :func:`cuda_ops.splits`; above 4 rows (row bucket 8 on) the expand path (the weight expanded into the
        scratch every layer shares, then cuBLAS), at one or four chunks per thread (the first the layout of the
        measured 2:4 expand; neither yet run on a GPU, so offered only under ``SECATEURS_UNVERIFIED_KERNELS=1``). Compiled on first offer (an error there offers nothing)."""
        n, k = self.shape
        if m < 1 or k % CHUNK or not cuda_ops.ready(self.values, 16, n, k // 2) \
                or not cuda_ops.ready(self.meta, 2, n, k // 8) or not cuda_ops.ready(self.high, 1, n, k // 16):
            return {}
        cuda_ops._module(self.values.device.index, SOURCE)  # compiled once; raises where it cannot be
        if m > TOKENS[-1]:  # row bucket 8 on: the expand path, never yet run on a GPU
            if not cuda_ops.unverified_offered():
                return {}
            return {f"expand_cublas_c{c}": (lambda x, c=c: cuda_ops.scratch_matmul(
                        x, self.shape, lambda out: nm48_expand(self.values, self.meta, self.high, out, c)))
                    for c in EXPAND_CHUNKS if c == 1 or self._wide_positions()}
        tokens = next(t for t in TOKENS if t >= m)
        return {f"cuda_gemv48_r{rows}_s{split}": (
                    lambda x, r=rows, s=split: nm48_gemv(x, self.values, self.meta, self.high, r, s))
                for split in cuda_ops.splits(n, k // CHUNK // 32) for rows in ROWS[tokens]}

    def _wide_positions(self) -> bool:
        """Whether the four-chunk expand can load the positions of four chunks at once: whole units of 64
        inputs, the position words 8-byte and the third-bit bytes 4-byte aligned."""
        n, k = self.shape
        return (n * k) % (4 * CHUNK) == 0 and self.meta.data_ptr() % 8 == 0 and self.high.data_ptr() % 4 == 0


@torch.library.custom_op("secateurs::nm48_gemv", mutates_args=())
def nm48_gemv(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, high: torch.Tensor, rows: int,
              split: int) -> torch.Tensor:
    """``x @ W.T`` for a 4:8 weight (values (N, K/2), meta (N, K/8), high (N, K/16) uint8) and 1-4 rows of x:
    ``split`` warps share each group of ``rows`` output rows, splitting K between them."""
    x = cuda_ops._aligned(x)
    m, k = x.shape
    n = values.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tokens = next(t for t in TOKENS if t >= m)
    name = f"gemv48_{cuda_ops._SUFFIX[x.dtype]}_t{tokens}_r{rows}"
    cuda_ops._launch(name, cuda_ops._grid(n, rows, split), (x, values, meta, high, y), (m, n, k, split),
                     source=SOURCE)
    return y


@nm48_gemv.register_fake
def _(x, values, meta, high, rows, split):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("secateurs::nm48_expand", mutates_args=("out",))
def nm48_expand(values: torch.Tensor, meta: torch.Tensor, high: torch.Tensor, out: torch.Tensor, chunks: int) -> None:
    """Write the dense 4:8 weight (N, K) into the first N*K elements of ``out`` (a scratch buffer), ``chunks``
    16-input chunks per thread (one of :data:`EXPAND_CHUNKS`)."""
    units = values.numel() // (CHUNK // 2) // chunks
    blocks = min((units + 255) // 256, 65535 * 8)
    cuda_ops._launch(f"expand48_c{chunks}", blocks, (values, meta, high, out), (units,), 8, source=SOURCE,
                     int_type=ctypes.c_longlong)


@nm48_expand.register_fake
def _(values, meta, high, out, chunks):
    return None


def _first_four(groups: torch.Tensor) -> torch.Tensor:
    """(out, in/8, 4) ascending positions of the first four kept entries of each group of a bool
    (out, in/8, 8) tensor, padded with unkept ones; a stable sort keeps the choice deterministic."""
    return (~groups).to(torch.int8).argsort(dim=2, stable=True)[:, :, :KEPT].sort(dim=2).values


def _pack(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``meta`` and ``high`` (module docstring) of (out, in/8, 4) positions, and the weight's shape."""
    rows, groups, _ = positions.shape
    pairs = positions.reshape(rows, groups // 2, 4, 2)  # chunk, pair i, first / second value
    shift = 2 * torch.arange(4, device=positions.device)
    word = (((pairs[..., 0] & 3) << shift) | ((pairs[..., 1] & 3) << (8 + shift))).sum(dim=2)
    bit = torch.arange(4, device=positions.device)
    high = (((pairs[..., 0] >> 2) << bit) | ((pairs[..., 1] >> 2) << (4 + bit))).sum(dim=2)
    meta = torch.stack([word & 0xFF, word >> 8], dim=2).reshape(rows, groups).to(torch.uint8).contiguous()
    return meta, high.to(torch.uint8).contiguous(), (rows, groups * GROUP)
