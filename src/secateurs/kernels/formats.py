"""Compressed weight formats for pruned linears, with pure-PyTorch compress / expand references.

Two formats, both for an (out, in) weight ``W`` and both exact (expanding gives ``W`` back bit for bit):

``Sparse24`` (2:4, the tensor-core pattern): every run of 4 inputs keeps at most 2 weights.
  ``values`` (out, in/2) holds the two kept weights of each group, ``meta`` (out, in/8) uint8 holds
  their positions, 2 bits each, two groups per byte (low nibble = even group). fp16 bytes moved:
  values 0.5 + metadata 0.0625 = 0.5625 of dense, the figure the cuSPARSELt layout also reaches.

``Bitmap`` (unstructured, in the spirit of Flash-LLM's "load as sparse, compute as dense"
  (Xia et al., VLDB 2024) with a bitmap instead of its Tiled-CSL index): ``bits`` (out, in/32)
  int32 has one bit per weight (1 = stored), ``values`` holds the non-zeros in row-major order, and
  ``offsets`` (out, in/SEGMENT) int32 is the index in ``values`` where each row segment starts, so a
  kernel can expand any segment alone with a prefix count of its bits. At 70% sparsity fp16 moves
  0.30 + 0.0625 + 0.016 ≈ 0.38 of dense.

The expand functions here are the references every kernel is tested against. ``pack_bits`` /
``unpack_bits`` and the ``from_mask`` constructors convert to and from a dense keep-mask packed 8 columns
to a byte (bit j of byte k = column 8k + j), the bitmask of the ``compressed-tensors`` checkpoint layout
(:mod:`secateurs.kernels.compressed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError

SEGMENT = 128


@dataclass
class Sparse24:
    """A 2:4 weight: two kept values per group of four inputs and their 2-bit positions."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    kind = "2:4"

    @staticmethod
    def supports(weight: torch.Tensor) -> str | None:
        """None when ``weight`` fits the format, else the reason it does not."""
        rows, cols = weight.shape
        if cols % 8:
            return f"2:4 storage needs the input dimension to be a multiple of 8 (got {cols})"
        if bool(((weight != 0).reshape(rows, cols // 4, 4).sum(dim=2) > 2).any()):
            return "some group of 4 inputs has more than 2 non-zeros"
        return None

    @classmethod
    def compress(cls, weight: torch.Tensor) -> Sparse24:
        reason = cls.supports(weight)
        if reason:
            raise UsageError(f"weight is not 2:4 sparse ({reason}); prune with --pattern 2:4 first")
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

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "meta": self.meta}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class Bitmap:
    """An unstructured sparse weight: a bitmap, the non-zeros in row-major order, segment offsets."""

    values: torch.Tensor
    bits: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    kind = "bitmap"

    @staticmethod
    def supports(weight: torch.Tensor) -> str | None:
        rows, cols = weight.shape
        if cols % SEGMENT:
            return f"bitmap storage needs the input dimension to be a multiple of {SEGMENT} (got {cols})"
        if int((weight != 0).sum()) >= 2**31:
            return "more than 2^31 non-zeros in one weight"
        return None

    @classmethod
    def compress(cls, weight: torch.Tensor) -> Bitmap:
        reason = cls.supports(weight)
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

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "bits": self.bits, "offsets": self.offsets}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


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


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool -> (out, ceil(in/8)) uint8, bit j of byte k = column 8k + j (zero-padded)."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -cols % 8)).reshape(rows, -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded << shifts).sum(dim=2, dtype=torch.uint8).contiguous()


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: (out, ceil(in/8)) uint8 -> (out, in) bool."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(2) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


FORMATS = {Sparse24.kind: Sparse24, Bitmap.kind: Bitmap}
SparseFormat = Sparse24 | Bitmap


def from_tensors(kind: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> SparseFormat:
    """Rebuild a format from the tensors it saved (the reload half of the round trip)."""
    if kind not in FORMATS:
        raise UsageError(f"unknown sparse format {kind!r}; known: {', '.join(FORMATS)}")
    return FORMATS[kind](**tensors, shape=tuple(shape))


def choose_format(weight: torch.Tensor, min_sparsity: float) -> tuple[type[Sparse24] | type[Bitmap] | None, str]:
    """The format a pruned weight is stored in (2:4 first, then bitmap), or None and why it stays dense."""
    if Sparse24.supports(weight) is None:
        return Sparse24, "2:4"
    sparsity = float((weight == 0).sum()) / weight.numel()
    if sparsity < min_sparsity:
        return None, f"sparsity {sparsity:.2f} < {min_sparsity:.2f}"
    reason = Bitmap.supports(weight)
    if reason:
        return None, reason
    return Bitmap, f"unstructured {sparsity:.2f}"


def reference_matmul(x: torch.Tensor, fmt: SparseFormat, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` by expanding the weight: the correct answer every kernel must match."""
    return torch.nn.functional.linear(x, fmt.to_dense().to(x.dtype), bias)
