"""The banded layout, for unstructured sparsity: a decode kernel per density band that spends few instructions per
stored weight (issue 29 item 1). Derived in memory from the same weight (or keep-mask) as the bitmap; on disk nothing
changes (compressed-tensors ``sparse-bitmask``, :mod:`secateurs.kernels.compressed`).

Each row's non-zeros are taken per 2048-input segment (:data:`SEG`) and cut into *pieces* of exactly ``P``
entries, ``P`` fixed by the weight's density band (:data:`BANDS`): 32 for 50-60% zeros, 16 for 60-75% and
75-90%. An entry is a value and a 4-bit delta: its column minus the previous entry's (the piece's first entry sits
at the piece's ``start``, delta 0). A gap of more than 15 inputs is bridged by a filler entry (value zero, delta
15, on a zero column); a segment's last piece is padded with value-zero entries of delta 0 (on its last real
column). So a GEMV lane takes one piece at a time, with a fixed trip count and no branch, and the work is
balanced by non-zero count, not by row.

Tensors (``kernels/cuda/banded.cu`` reads them as they are):

- ``values`` (pieces * P,) in the weight's dtype, pre-permuted for 16-byte loads: chunk c (entries 8c..8c+7) of
  piece p at element ``((p // 8) * (P // 8) + c) * 64 + (p % 8) * 8``, so the lanes reading chunk c of 8
  consecutive pieces touch one 128-byte line;
- ``deltas`` (pieces, P/2) uint8: byte j of 32-bit word g holds entry 8g+j's delta in its low nibble and entry
  8g+4+j's in its high nibble (one AND and one multiply by 0x04040404 turn four deltas into four running byte
  offsets);
- ``starts`` (pieces,) int16: each piece's first column, read as unsigned 16 bits (K < 65536);
- ``offsets`` (rows * segments + 1,) int32: where each (row, segment)'s pieces start.

The piece count is padded to a multiple of 8 (at least 8). Bytes per weight at density d (fp16, P = 32 / 16):
``d * (1 + f) * (2.5 + 2 / P)`` with f the padding and filler entries per non-zero; 50% zeros: about 1.30 (the
bitmap: 1.16; the 4-bit deltas cost 2 bits per weight where the bitmap spends 1); 70%: about 0.80 (bitmap 0.76);
80%: 0.56 (bitmap 0.56). A weight outside every band (fewer than 50% or more than 90% zeros) is not stored here:
the bitmap holds it.

The default store of an unstructured weight in a band (:func:`secateurs.kernels.registry.choose_format` tries
it before the bitmap), because on an H100 (``python benchmarks/banded.py``, seven Llama shapes) its GEMV beat cuBLAS
and the bitmap's GEMV on every shape and band at 1 token (70% zeros: 1.86-2.49x cuBLAS, the bitmap 1.22-1.85x; 50%:
1.32-1.53x, the bitmap 0.99-1.33x) and at 2 tokens ran 1.31-1.91x cuBLAS at 70% where the bitmap runs its expand
path at about 0.4x; at 8-32 tokens its tensor-core kernel runs at 0.77-1.02x the bitmap's (0.77-0.83x at 50%), at
64 tokens 0.94-1.29x of it. A Llama-2-7B-shaped model decoded at 1.81x the torch.compile'd dense model at batch 1
at 70% zeros (the bitmap: 1.35x) and 0.70x at batch 8 (the bitmap 0.48x), at 50% 1.26x and 0.53x (the bitmap
1.08x and 0.45x). The price is bytes at the low band (1.30 fp16 bytes per weight at 50% zeros against the
bitmap's 1.16), and at 50% zeros up to 23% per linear at 8-32 tokens: ``SECATEURS_UNSTRUCTURED_LAYOUT=bitmap``
(:data:`LAYOUT_ENV`) stores every unstructured weight as the bitmap instead, for whoever serves batches or counts
bytes first.

Kernels (every one matched float64 on an H100: ``python benchmarks/gpu_kernel_check.py --part cuda --formats banded``,
the tensor-core kernel's 936 checks with ``--only tcbanded``): a GEMV for 1, 2 and 4 tokens (m = 3 runs the 4 variant)
templated on the band's ``P`` and on the rows per warp group, about 6.6 / 7.6 / 9.6 SASS instructions per stored entry
at 1 / 2 / 4 tokens (nvcc 13 sm_90, ``python benchmarks/banded.py --sass``; the bitmap GEMV's loop: 13 / 16 per
non-zero at 1 / 2); and from 2 rows on an expand kernel into the scratch every format shares
(``cuda_ops.scratch_matmul``), then cuBLAS; at 5-64 rows after it a tensor-core kernel (``kernels/cuda/banded_tc.cu``,
a decode step over the engine of ``cuda/tc_tile.cuh`` that the bitmap's and the N:M formats' tensor-core kernels use),
as ``cuda_tcbanded_n<tokens>_s<split>``: per 64-input stage each row's four lanes scatter the entries of the stage's
window, eight at a time, into the engine's dense shared tile, which ``mma.sync.m16n8k16`` multiplies by 16-64 tokens.
It reads the stored tensors as they are, for the reason the bitmap's has one: the expand path moves about three times
the dense bytes (a 70%-unstructured Llama-2-7B decoded at 0.45-0.48x dense at batch 8 on the bitmap's expand path).
Its decode is not cheaper than the bitmap's by static count: a lane's round (one 8-entry grain loaded, decoded,
scattered, its quad's ballots) is 95 SASS instructions at sm_90 (about 12 an entry; the bitmap kernel's slot chain 7.3
a slot; ``python benchmarks/banded.py --sass``), and a grain that straddles two stages is read in both, so in the
test's CPU emulation (a 128 x 4096 magnitude-pruned random weight, 16 tokens, one slice) the lanes process 1.9-2.5
entries per stored non-zero at 50-80% zeros, where the bitmap kernel issues 1.5-2.1 value slots per non-zero (its
warp's largest chunk popcount, on the same masks); on the GPU it ran at about the bitmap kernel's speed. Prompts (more
than 64 rows) take the plain expand path: the layout has no pipelined expand (:func:`cuda_ops.pipelined_candidates`)
yet.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import os
from functools import cache

import torch

from ..errors import UsageError
from . import cuda_ops
from .formats import SparseFormat
from .nm import TC_ROWS, TC_TOKENS, TC_WARPS, tc_built, tc_splits

LAYOUT_ENV = "SECATEURS_UNSTRUCTURED_LAYOUT"
LAYOUTS = ("banded", "bitmap")
"""Where ``choose_format`` stores an unstructured weight of 50-90% zeros: ``banded`` (the default) or ``bitmap``."""
SEG = 2048  # inputs per segment: pieces never cross one (the kernels stage x by whole segments)
MAX_DELTA = 15
GROUP = 8  # pieces per 16-byte-chunk interleave group (8 x 16 bytes = one 128-byte line)
SOURCE = Path(__file__).with_name("cuda") / "banded.cu"
TC_SOURCE = SOURCE.with_name("banded_tc.cu")
TOKENS = (1, 2, 4)  # token counts the GEMV is instantiated for
PIECES = (16, 32)  # piece sizes the kernels are instantiated for
ROWS = (1, 2)  # rows per warp group instantiated


class Band(NamedTuple):
    name: str
    low: float  # fraction of zeros, inclusive
    high: float  # exclusive, except the last band's
    piece: int  # entries per piece: the inner loop's trip count
    rows: tuple[int, ...]  # rows per warp group offered, the default first


BANDS = (
    Band("50-60%", 0.50, 0.60, 32, (1, 2)),
    Band("60-75%", 0.60, 0.75, 16, (1, 2)),
    Band("75-90%", 0.75, 0.90, 16, (2, 1)),
)


def band_of(sparsity: float) -> Band | None:
    """The band a weight with this fraction of zeros falls in, or None outside every band; taken to a tenth of a
    percent, so a weight pruned to 60% whose count rounds to 59.99% is in the 60-75% band."""
    sparsity = round(sparsity, 3)
    for band in BANDS:
        if band.low <= sparsity < band.high or (band is BANDS[-1] and sparsity == band.high):
            return band
    return None


def _sparsity(weight: torch.Tensor) -> float:
    return 1.0 - float((weight != 0).sum()) / max(weight.numel(), 1)


@cache
def layout() -> str:
    """The unstructured layout asked for (:data:`LAYOUT_ENV`), read once: every weight of a model gets the same."""
    chosen = os.environ.get(LAYOUT_ENV, LAYOUTS[0])
    if chosen not in LAYOUTS:
        raise UsageError(f"{LAYOUT_ENV}={chosen!r} is not a layout: set it to {' or '.join(LAYOUTS)}")
    return chosen


@dataclass
class Banded(SparseFormat):
    """An unstructured weight as pieces of ``P`` (value, 4-bit delta) entries per row segment."""

    values: torch.Tensor
    deltas: torch.Tensor
    starts: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    kind = "banded"
    parts = ("values", "deltas", "starts", "offsets")

    @classmethod
    def unavailable(cls) -> str | None:
        """Not where the user asked for the bitmap (:data:`LAYOUT_ENV`): the choice is the user's, since the banded
        layout trades bytes at the low band and batch speed for the 1-token GEMV."""
        return f"{LAYOUT_ENV}=bitmap asks for the bitmap" if layout() == "bitmap" else None

    @staticmethod
    def fits(weight: torch.Tensor) -> str | None:
        """None when the layout can hold ``weight``, else why not (one line, naming what runs instead)."""
        cols = weight.shape[1]
        if cols % 8 or cols >= 2**16:
            return f"the banded layout needs an input dimension that is a multiple of 8 and below 65536 (got {cols})"
        sparsity = _sparsity(weight)
        if band_of(sparsity) is None:
            return (f"{sparsity:.0%} zeros is outside every band of the banded layout "
                    f"({BANDS[0].low:.0%}-{BANDS[-1].high:.0%}): the bitmap runs it")
        if int((weight != 0).sum()) * 2 >= 2**31:
            return "too many non-zeros in one weight for the banded layout's 32-bit offsets"
        return None

    @classmethod
    def compress(cls, weight: torch.Tensor) -> Banded:
        reason = cls.fits(weight)
        if reason:
            raise UsageError(f"cannot store this weight in the banded layout: {reason}")
        return cls._build(weight, band_of(_sparsity(weight)).piece)

    @classmethod
    def from_mask(cls, values: torch.Tensor, mask: torch.Tensor) -> Banded:
        """The layout from a keep-mask and its values in row-major order."""
        dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter_(mask, values)
        return cls.compress(dense)

    @classmethod
    def _build(cls, weight: torch.Tensor, piece: int) -> Banded:
        rows, cols = weight.shape
        device = weight.device
        nseg = -(-cols // SEG)
        row, col = (weight != 0).nonzero(as_tuple=True)  # row-major order
        value = weight[row, col]
        unit = row * nseg + col // SEG  # (row, segment), in storage order
        # Fillers: a gap of more than 15 inputs inside a unit gets (gap - 1) // 15 zero entries before the entry.
        first = torch.ones_like(unit, dtype=torch.bool)
        first[1:] = unit[1:] != unit[:-1]
        gap = torch.where(first, torch.zeros_like(col), col - torch.roll(col, 1))
        fill = torch.where(gap > 0, (gap - 1) // MAX_DELTA, torch.zeros_like(gap))
        count = fill + 1
        owner = torch.repeat_interleave(torch.arange(len(col), device=device), count)  # entry -> its non-zero
        ends = count.cumsum(0)
        rank = torch.arange(int(ends[-1]) if len(ends) else 0, device=device) - (ends - count)[owner]
        is_real = rank == fill[owner]
        # a filler k (0-based) of non-zero i sits 15 (k + 1) past the previous entry
        e_col = torch.where(is_real, col[owner], (col - gap)[owner] + MAX_DELTA * (rank + 1))
        e_val = torch.where(is_real, value[owner], torch.zeros((), dtype=weight.dtype, device=device))
        e_unit = unit[owner]
        # Pieces of P entries per unit.
        per_unit = torch.bincount(e_unit, minlength=rows * nseg)
        pieces_per_unit = (per_unit + piece - 1) // piece
        offsets = torch.zeros(rows * nseg + 1, dtype=torch.int64, device=device)
        offsets[1:] = pieces_per_unit.cumsum(0)
        pieces = int(offsets[-1])
        padded = max(GROUP, -(-pieces // GROUP) * GROUP)
        unit_entry_start = per_unit.cumsum(0) - per_unit
        index = torch.arange(len(e_unit), device=device) - unit_entry_start[e_unit]
        slot = offsets[e_unit] * piece + index  # flat (piece, entry) slot
        vals = torch.zeros(padded * piece, dtype=weight.dtype, device=device)
        vals[slot] = e_val
        cols_ = torch.full((padded * piece,), -1, dtype=torch.int64, device=device)
        cols_[slot] = e_col
        cols_ = cols_.reshape(padded, piece).cummax(dim=1).values  # padding sits on the piece's last real column
        cols_ = torch.where(cols_ < 0, torch.zeros_like(cols_), cols_)  # the pieces past the end
        start = cols_[:, 0]
        delta = torch.diff(cols_, dim=1, prepend=start[:, None])
        return cls(_interleave(vals.reshape(padded, piece)), _pack_deltas(delta), _u16(start),
                   offsets.to(torch.int32), (rows, cols))

    @property
    def piece(self) -> int:
        return self.deltas.shape[1] * 2

    def pieces(self) -> int:
        """Pieces that hold entries (the stored count is padded to a multiple of 8)."""
        return int(self.offsets[-1])

    def columns(self) -> torch.Tensor:
        """(pieces, P) int64: each entry's column (a running sum of the deltas from the piece's start)."""
        return (self.starts.to(torch.int64) & 0xFFFF)[:, None] + _unpack_deltas(self.deltas).cumsum(dim=1)

    def entry_values(self) -> torch.Tensor:
        """(pieces, P): each entry's value, the permutation undone."""
        return _deinterleave(self.values, self.piece)

    def piece_rows(self) -> torch.Tensor:
        """(pieces,) int64: the row of each piece that holds entries."""
        rows, cols = self.shape
        nseg = -(-cols // SEG)
        counts = (self.offsets[1:] - self.offsets[:-1]).to(torch.int64)
        units = torch.arange(rows * nseg, device=self.offsets.device)
        return torch.repeat_interleave(units // nseg, counts)

    def to_dense(self) -> torch.Tensor:
        used = self.pieces()
        row = self.piece_rows()[:, None].expand(used, self.piece)
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        # padding and fillers add zeros (x + 0 = x exactly), so an accumulating scatter is exact
        dense.index_put_((row.reshape(-1), self.columns()[:used].reshape(-1)),
                         self.entry_values()[:used].reshape(-1), accumulate=True)
        return dense

    def mask(self) -> torch.Tensor:
        return self.to_dense() != 0

    @classmethod
    def why(cls, sparsity: float) -> str:
        """The band and why banded, not the bitmap, holds it: the measured GEMV (the decode path of batch 1)."""
        band = band_of(sparsity)
        return (f"unstructured {sparsity:.2f}, band {band.name if band else '?'}: banded, not the bitmap, since its "
                "1-token GEMV beat the bitmap's on every H100 shape and band measured")

    def entries(self) -> int:
        """Stored entries, padding and fillers included (pieces x P)."""
        return self.pieces() * self.piece

    def overhead(self) -> dict[str, int]:
        """Stored entries by kind: non-zeros, fillers (value zero bridging a gap of more than 15 inputs: a piece's
        first entry or one of delta 15) and padding (value zero, delta 0, after a segment's last entry)."""
        used = self.pieces()
        zero = self.entry_values()[:used] == 0
        delta = _unpack_deltas(self.deltas[:used])
        padding = zero & (delta == 0)
        padding[:, 0] = False
        return {"entries": used * self.piece, "nonzeros": int((~zero).sum()), "fillers": int((zero & ~padding).sum()),
                "padding": int(padding.sum())}

    def _band(self) -> Band:
        """The band from the stored piece count's shape (at most 7 padded pieces more than hold entries): the
        dispatcher asks for candidates on every call, inside CUDA-graph capture too, so no device read here."""
        n, k = self.shape
        return band_of(1.0 - self.starts.shape[0] * self.piece / max(n * k, 1)) or BANDS[0]

    def plan_variant(self) -> Hashable:
        """The piece and band: they name the GEMV variants offered, so a 50% and a 70% weight of one shape (two
        models in one process, or OWL's per-layer budgets) must not share a tuned plan."""
        return (self.piece, self._band().name)

    def cuda_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """For 1-4 rows the banded GEMV (the band's rows per warp group, the default first, at the split-K choices of
        :func:`cuda_ops.splits`), from 2 rows the expand path (the weight expanded into the scratch every layer
        shares, then cuBLAS), and at 5-64 rows after it the tensor-core kernel (:meth:`_tc_candidates`); all matched
        float64 on an H100, so offered without any opt-in."""
        n, k = self.shape
        nseg = -(-k // SEG)
        padded = self.starts.shape[0]
        if m < 1 or k % 8 or k >= 2**16 or self.piece not in PIECES or self.offsets.dtype != torch.int32 \
                or self.starts.dtype != torch.int16 or self.deltas.dtype != torch.uint8 \
                or not cuda_ops.ready(self.values.view(padded, self.piece), 16, padded, self.piece) \
                or not cuda_ops.ready(self.deltas, self.piece // 2, padded, self.piece // 2) \
                or not cuda_ops.ready(self.starts.view(padded, 1), 2, padded, 1) \
                or not cuda_ops.ready(self.offsets.view(-1, 1), 4, n * nseg + 1, 1):
            return {}
        cuda_ops._module(self.values.device.index, SOURCE)  # compiled once; raises where it cannot be
        found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if m <= TOKENS[-1]:
            band = self._band()
            rows = band.rows if self.piece == band.piece else ROWS
            splits = cuda_ops.splits(n, max(1, k // 1024))
            found.update({f"cuda_gemvbd_p{self.piece}_r{r}_s{s}": (
                lambda x, r=r, s=s: banded_gemv(x, self.values, self.deltas, self.starts, self.offsets, r, s))
                for s in splits for r in rows})
        if m >= 2:
            found["expand_cublas"] = lambda x: cuda_ops.scratch_matmul(
                x, self.shape, lambda out: banded_expand(self.values, self.deltas, self.starts, self.offsets, out, n, k))
        if TOKENS[-1] < m <= TC_TOKENS[-1]:
            found.update(self._tc_candidates(m))
        return found

    def _tc_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The tensor-core kernel at ``m`` rows (5-64): the smallest token tile that holds them, each split-K choice of
        :func:`~secateurs.kernels.nm.tc_splits`; nothing where K is not a multiple of 16 (the engine's stages are
        whole 16-input chunks) or the module does not build (said once: the layer keeps its expand path)."""
        if self.shape[1] % 16 or not tc_built(self.values.device, TC_SOURCE, "banded"):
            return {}
        tokens = next(t for t in TC_TOKENS if t >= m)
        return {f"cuda_tcbanded_n{tokens}_s{split}": (
                    lambda x, s=split: banded_tc(x, self.values, self.deltas, self.starts, self.offsets, tokens, s))
                for split in tc_splits(*self.shape)}


@torch.library.custom_op("secateurs::banded_gemv", mutates_args=())
def banded_gemv(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor,
                offsets: torch.Tensor, rows: int, split: int) -> torch.Tensor:
    """``x @ W.T`` for a banded weight and 1-4 rows of x: ``split`` warps share each group of ``rows`` output rows,
    taking their pieces one per lane. The output width is read from ``offsets`` (rows * segments + 1)."""
    x = cuda_ops._aligned(x)
    m, k = x.shape
    nseg = -(-k // SEG)
    n = (offsets.shape[0] - 1) // nseg
    piece = deltas.shape[1] * 2
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tokens = next(t for t in TOKENS if t >= m)
    name = f"gemvbd_{cuda_ops._SUFFIX[x.dtype]}_t{tokens}_p{piece}_r{rows}"
    cuda_ops._launch(name, cuda_ops._grid(n, rows, split), (x, values, deltas, starts, offsets, y),
                     (m, n, k, split, nseg), source=SOURCE)
    return y


@banded_gemv.register_fake
def _(x, values, deltas, starts, offsets, rows, split):
    nseg = -(-x.shape[1] // SEG)
    return x.new_empty(x.shape[0], (offsets.shape[0] - 1) // nseg)


@torch.library.custom_op("secateurs::banded_expand", mutates_args=("out",))
def banded_expand(values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor, offsets: torch.Tensor,
                  out: torch.Tensor, n: int, k: int) -> None:
    """Write the dense banded weight (n, k) into the first n*k elements of ``out`` (a scratch buffer): a warp per
    (row, segment) unit."""
    nseg = -(-k // SEG)
    units = n * nseg
    blocks = min((units + cuda_ops.WARPS - 1) // cuda_ops.WARPS, 65535 * 8)
    cuda_ops._launch(f"expandbd_p{deltas.shape[1] * 2}", blocks, (values, deltas, starts, offsets, out),
                     (n, k, nseg), source=SOURCE)


@banded_expand.register_fake
def _(values, deltas, starts, offsets, out, n, k):
    return None


@torch.library.custom_op("secateurs::banded_tc", mutates_args=())
def banded_tc(x: torch.Tensor, values: torch.Tensor, deltas: torch.Tensor, starts: torch.Tensor,
              offsets: torch.Tensor, tokens: int, split: int) -> torch.Tensor:
    """``x @ W.T`` for a banded weight on tensor cores (``banded_tc.cu``) and any number of rows of x: blocks of 64
    output features x ``tokens`` rows (16, 32 or 64), ``split`` blocks sharing each feature tile's K (fp32 partial
    sums in a (split, M, N) workspace, added in split order by ``tcsum_<dtype>``: deterministic, no atomics). The
    output width is read from ``offsets`` (rows * segments + 1), the piece size from ``deltas`` (P/2 bytes a piece)."""
    x = cuda_ops._aligned(x)
    m, k = x.shape
    nseg = -(-k // SEG)
    n = (offsets.shape[0] - 1) // nseg
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    work = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    suffix = cuda_ops._SUFFIX[x.dtype]
    blocks = -(-n // TC_ROWS) * split * -(-m // tokens)
    cuda_ops._launch(f"tcbd_{suffix}_p{deltas.shape[1] * 2}_n{tokens}", blocks,
                     (x, values, deltas, starts, offsets, y, work), (m, n, k, split, nseg), TC_WARPS, source=TC_SOURCE)
    if split > 1:
        threads = cuda_ops.WARPS * 32
        cuda_ops._launch(f"tcsum_{suffix}", -(-m * n // threads), (work, y), (m * n, split), source=TC_SOURCE)
    return y


@banded_tc.register_fake
def _(x, values, deltas, starts, offsets, tokens, split):
    nseg = -(-x.shape[1] // SEG)
    return x.new_empty(x.shape[0], (offsets.shape[0] - 1) // nseg)


def _interleave(vals: torch.Tensor) -> torch.Tensor:
    """(pieces, P) -> the flat chunk-interleaved order (pieces a multiple of 8)."""
    pieces, piece = vals.shape
    return vals.reshape(pieces // GROUP, GROUP, piece // 8, 8).permute(0, 2, 1, 3).contiguous().reshape(-1)


def _deinterleave(flat: torch.Tensor, piece: int) -> torch.Tensor:
    pieces = flat.numel() // piece
    return flat.reshape(pieces // GROUP, piece // 8, GROUP, 8).permute(0, 2, 1, 3).reshape(pieces, piece)


def _pack_deltas(delta: torch.Tensor) -> torch.Tensor:
    """(pieces, P) deltas 0..15 -> (pieces, P/2) uint8: word g byte j = entry 8g+j | entry 8g+4+j << 4."""
    pieces, piece = delta.shape
    d = delta.reshape(pieces, piece // 8, 8)
    return (d[..., :4] | (d[..., 4:] << 4)).to(torch.uint8).reshape(pieces, piece // 2).contiguous()


def _unpack_deltas(packed: torch.Tensor) -> torch.Tensor:
    pieces, half = packed.shape
    b = packed.to(torch.int64).reshape(pieces, half // 4, 4)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(pieces, half * 2)


def _u16(columns: torch.Tensor) -> torch.Tensor:
    """Columns 0..65535 as int16 holding their unsigned 16 bits."""
    return torch.where(columns >= 2**15, columns - 2**16, columns).to(torch.int16).contiguous()
