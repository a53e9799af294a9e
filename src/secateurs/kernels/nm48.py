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

Everything but this layout (which weights fit, building and expanding, the CUDA candidates) is the N:M
engine's (:mod:`secateurs.kernels.nm`), shared with 8:16. Expanding gives the weight back bit for bit. Prompts (8 rows and more) expand the stored tensors into the scratch
buffer every format shares (``cuda_ops.scratch``), then run cuBLAS: no dense copy is kept per layer. Checkpoints keep it in compressed-tensors ``sparse-bitmask``
(:mod:`secateurs.kernels.compressed`), which holds any pattern; a bitmask whose weight fits 4:8 loads as
4:8 again (:func:`secateurs.kernels.registry.choose_format`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import cuda_ops
from .nm import CHUNK, NmFormat, expand_launch, gemv_launch, tc_launch

GROUP = 8
KEPT = 4
SOURCE = Path(__file__).with_name("cuda") / "sparse48.cu"
TOKENS = (1, 2, 4)  # token counts the kernel is instantiated for (m = 3 runs the 4 variant)
# Rows per warp group instantiated for each token count, the measured best first (H100, benchmarks/sparse48.py:
# 2 rows won 14 of the 21 shape x token cells, 4 rows 4 and 1 row 3, where 2 rows came within 6%).
ROWS = {1: (2, 1, 4), 2: (2, 4, 1), 4: (2, 1)}
EXPAND_CHUNKS = (1, 4)  # 16-input chunks per thread of the expand kernel (expand48_c<C>), in the order offered


@dataclass
class Nm48(NmFormat):
    """A 4:8 weight: four kept values per group of eight inputs and their 3-bit positions."""

    values: torch.Tensor
    meta: torch.Tensor
    high: torch.Tensor
    shape: tuple[int, int]

    kind = "4:8"
    parts = ("values", "meta", "high")
    group, kept, source, tokens, rows, expand_chunks = GROUP, KEPT, SOURCE, TOKENS, ROWS, EXPAND_CHUNKS
    gemv_name = "gemv48"
    tc_name = "tc48"
    tc_ring_name = "tcr48"
    gemv_verified = True  # H100, benchmarks/sparse48.py: 1.60-1.86x cuBLAS at 1 token

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

    @classmethod
    def _pack(cls, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``meta`` and ``high`` (module docstring) of (out, in/8, 4) positions."""
        rows, groups, _ = positions.shape
        pairs = positions.reshape(rows, groups // 2, 4, 2)  # chunk, pair i, first / second value
        shift = 2 * torch.arange(4, device=positions.device)
        word = (((pairs[..., 0] & 3) << shift) | ((pairs[..., 1] & 3) << (8 + shift))).sum(dim=2)
        bit = torch.arange(4, device=positions.device)
        high = (((pairs[..., 0] >> 2) << bit) | ((pairs[..., 1] >> 2) << (4 + bit))).sum(dim=2)
        meta = torch.stack([word & 0xFF, word >> 8], dim=2).reshape(rows, groups).to(torch.uint8).contiguous()
        return meta, high.to(torch.uint8).contiguous()

    def _tables_ready(self) -> bool:
        n, k = self.shape
        return cuda_ops.ready(self.meta, 2, n, k // 8) and cuda_ops.ready(self.high, 1, n, k // 16)

    def _wide_positions(self) -> bool:
        """Whether the four-chunk expand can load the positions of four chunks at once: whole units of 64
        inputs, the position words 8-byte and the third-bit bytes 4-byte aligned."""
        n, k = self.shape
        return (n * k) % (4 * CHUNK) == 0 and self.meta.data_ptr() % 8 == 0 and self.high.data_ptr() % 4 == 0

    def _gemv(self, x: torch.Tensor, rows: int, split: int) -> torch.Tensor:
        return nm48_gemv(x, self.values, self.meta, self.high, rows, split)

    def _expand(self, out: torch.Tensor, chunks: int) -> None:
        nm48_expand(self.values, self.meta, self.high, out, chunks)

    def _tc(self, x: torch.Tensor, tokens: int, split: int) -> torch.Tensor:
        return nm48_tc(x, self.values, self.meta, self.high, tokens, split)

    def _tc_ring(self, x: torch.Tensor, tokens: int, depth: int, split: int) -> torch.Tensor:
        return nm48_tc_ring(x, self.values, self.meta, self.high, tokens, depth, split)


@torch.library.custom_op("secateurs::nm48_gemv", mutates_args=())
def nm48_gemv(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, high: torch.Tensor, rows: int,
              split: int) -> torch.Tensor:
    """``x @ W.T`` for a 4:8 weight (values (N, K/2), meta (N, K/8), high (N, K/16) uint8) and 1-4 rows of x:
    ``split`` warps share each group of ``rows`` output rows, splitting K between them."""
    return gemv_launch("gemv48", SOURCE, TOKENS, x, (values, meta, high), rows, split)


@nm48_gemv.register_fake
def _(x, values, meta, high, rows, split):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("secateurs::nm48_expand", mutates_args=("out",))
def nm48_expand(values: torch.Tensor, meta: torch.Tensor, high: torch.Tensor, out: torch.Tensor, chunks: int) -> None:
    """Write the dense 4:8 weight (N, K) into the first N*K elements of ``out`` (a scratch buffer), ``chunks``
    16-input chunks per thread (one of :data:`EXPAND_CHUNKS`)."""
    expand_launch("expand48", SOURCE, (values, meta, high), out, chunks)


@nm48_expand.register_fake
def _(values, meta, high, out, chunks):
    return None


@torch.library.custom_op("secateurs::nm48_tc", mutates_args=())
def nm48_tc(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, high: torch.Tensor, tokens: int,
            split: int) -> torch.Tensor:
    """``x @ W.T`` for a 4:8 weight on tensor cores (``nm_tc.cu``): blocks of 64 output features x
    ``tokens`` rows of x (16, 32 or 64), ``split`` blocks sharing each feature tile's K."""
    return tc_launch("tc48", x, (values, meta, high), tokens, split)


@nm48_tc.register_fake
def _(x, values, meta, high, tokens, split):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("secateurs::nm48_tc_ring", mutates_args=())
def nm48_tc_ring(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, high: torch.Tensor, tokens: int,
                 depth: int, split: int) -> torch.Tensor:
    """:func:`nm48_tc` with ``depth`` stages of stored values and positions in registers (``tc_gemm_ring``: loads
    issued ``depth - 1`` stages ahead); matched float64 on an H100, offered at the depths of
    :data:`~secateurs.kernels.nm.TC_RING_CLEARED` (every depth under the opt-in)."""
    return tc_launch("tcr48", x, (values, meta, high), tokens, split, depth)


@nm48_tc_ring.register_fake
def _(x, values, meta, high, tokens, depth, split):
    return x.new_empty(x.shape[0], values.shape[0])
