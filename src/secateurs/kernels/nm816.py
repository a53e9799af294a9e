"""The 8:16 format: every run of 16 inputs keeps at most 8 weights, each named by a 4-bit position.

8:16 loses much less quality than 4:8 at the same density (SmolLM2-135M, Wanda, WikiText-2: 50% 66.19,
8:16 87.14, 4:8 105.69, 2:4 187.02) and has the cleanest N:M layout for a decode GEMV: per 16 inputs, eight
fp16 values are one 16-byte load and their eight positions one 32-bit word. fp16 bytes per weight: values
1.0 + positions 0.25 = 1.25 (the limit over dense is 2 / 1.25 = 1.6x; 4:8's is 1.68x).

Tensors, laid out for the decode kernel (``kernels/cuda/sparse816.cu``):

- ``values`` (out, in/2): the eight kept weights of each group of 16 in column order (a kept value may be
  zero, as where a group holds fewer than eight non-zeros);
- ``meta`` (out, in/16) int32, one little-endian word per group: value e's position (0..15) at bits
  4e..4e+3, ascending (e <= position <= e + 8, which the kernel's decode relies on).

Everything but this layout (which weights fit, building and expanding, the CUDA candidates) is the N:M
engine's (:mod:`secateurs.kernels.nm`), shared with 4:8; a weight that fits 4:8 (or 2:4) is stored as that
(:func:`secateurs.kernels.registry.choose_format` tries them first). Expanding gives the weight back bit for
bit. The GEMV (1-4 rows) and the expand kernel of the prompt path (8 rows and more, into the scratch buffer
every format shares, then cuBLAS) matched float64 on an H100 at every shape and row bucket from 1 to 8192
(``benchmarks/gpu_kernel_check.py``), and the GEMV ran 1.56-1.89x cuBLAS at 1 token there
(``benchmarks/sparse48.py``). Checkpoints keep it in compressed-tensors ``sparse-bitmask``
(:mod:`secateurs.kernels.compressed`); a bitmask whose weight fits 8:16 (and not 4:8) loads as 8:16 again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import cuda_ops
from .nm import CHUNK, NmFormat, expand_launch, gemv_launch, tc_launch

GROUP = 16
KEPT = 8
SOURCE = Path(__file__).with_name("cuda") / "sparse816.cu"
TOKENS = (1, 2, 4)  # token counts the kernel is instantiated for (m = 3 runs the 4 variant)
ROWS = {1: (2, 1, 4), 2: (2, 4, 1), 4: (2, 1)}  # 4:8's measured order; not yet measured for 8:16
EXPAND_CHUNKS = (1, 4)  # 16-input chunks per thread of the expand kernel (expand816_c<C>), in the order offered
_SHIFTS = 4 * torch.arange(KEPT)


@dataclass
class Nm816(NmFormat):
    """An 8:16 weight: eight kept values per group of sixteen inputs and their 4-bit positions."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    kind = "8:16"
    parts = ("values", "meta")
    group, kept, source, tokens, rows, expand_chunks = GROUP, KEPT, SOURCE, TOKENS, ROWS, EXPAND_CHUNKS
    gemv_name = "gemv816"
    tc_name = "tc816"
    tc_ring_name = "tcr816"
    gemv_verified = True  # H100, benchmarks/sparse48.py: 1.56-1.89x cuBLAS at 1 token

    def positions(self) -> torch.Tensor:
        """(out, in/16, 8) int64 positions of the eight kept values inside each group."""
        words = self.meta.to(torch.int64) & 0xFFFFFFFF
        return (words.unsqueeze(2) >> _SHIFTS.to(words.device)) & 15

    @classmethod
    def _pack(cls, positions: torch.Tensor) -> tuple[torch.Tensor]:
        """The position words of (out, in/16, 8) ascending positions, as int32 (the top nibble may set the sign)."""
        words = (positions.to(torch.int64) << _SHIFTS.to(positions.device)).sum(dim=2)
        return (torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous(),)

    def _tables_ready(self) -> bool:
        n, k = self.shape
        return cuda_ops.ready(self.meta, 4, n, k // GROUP)

    def _wide_positions(self) -> bool:
        """Whether the four-chunk expand can load four position words at once: whole units of 64 inputs, the
        words 16-byte aligned."""
        n, k = self.shape
        return (n * k) % (4 * CHUNK) == 0 and self.meta.data_ptr() % 16 == 0

    def _gemv(self, x: torch.Tensor, rows: int, split: int) -> torch.Tensor:
        return nm816_gemv(x, self.values, self.meta, rows, split)

    def _expand(self, out: torch.Tensor, chunks: int) -> None:
        nm816_expand(self.values, self.meta, out, chunks)

    def _tc(self, x: torch.Tensor, tokens: int, split: int) -> torch.Tensor:
        return nm816_tc(x, self.values, self.meta, tokens, split)

    def _tc_ring(self, x: torch.Tensor, tokens: int, depth: int, split: int) -> torch.Tensor:
        return nm816_tc_ring(x, self.values, self.meta, tokens, depth, split)


@torch.library.custom_op("secateurs::nm816_gemv", mutates_args=())
def nm816_gemv(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, rows: int, split: int) -> torch.Tensor:
    """``x @ W.T`` for an 8:16 weight (values (N, K/2), positions (N, K/16) int32) and 1-4 rows of x: ``split``
    warps share each group of ``rows`` output rows, splitting K between them."""
    return gemv_launch("gemv816", SOURCE, TOKENS, x, (values, positions), rows, split)


@nm816_gemv.register_fake
def _(x, values, positions, rows, split):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("secateurs::nm816_expand", mutates_args=("out",))
def nm816_expand(values: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, chunks: int) -> None:
    """Write the dense 8:16 weight (N, K) into the first N*K elements of ``out`` (a scratch buffer), ``chunks``
    16-input chunks per thread (one of :data:`EXPAND_CHUNKS`)."""
    expand_launch("expand816", SOURCE, (values, positions), out, chunks)


@nm816_expand.register_fake
def _(values, positions, out, chunks):
    return None


@torch.library.custom_op("secateurs::nm816_tc", mutates_args=())
def nm816_tc(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, tokens: int, split: int) -> torch.Tensor:
    """``x @ W.T`` for an 8:16 weight on tensor cores (``nm_tc.cu``): blocks of 64 output features
    x ``tokens`` rows of x (16, 32 or 64), ``split`` blocks sharing each feature tile's K."""
    return tc_launch("tc816", x, (values, positions), tokens, split)


@nm816_tc.register_fake
def _(x, values, positions, tokens, split):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("secateurs::nm816_tc_ring", mutates_args=())
def nm816_tc_ring(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, tokens: int, depth: int,
                  split: int) -> torch.Tensor:
    """:func:`nm816_tc` with ``depth`` stages of stored values and positions in registers (``tc_gemm_ring``: loads
    issued ``depth - 1`` stages ahead); matched float64 on an H100, offered at the depths of
    :data:`~secateurs.kernels.nm.TC_RING_CLEARED` (every depth under the opt-in)."""
    return tc_launch("tcr816", x, (values, positions), tokens, split, depth)


@nm816_tc_ring.register_fake
def _(x, values, positions, tokens, depth, split):
    return x.new_empty(x.shape[0], values.shape[0])
