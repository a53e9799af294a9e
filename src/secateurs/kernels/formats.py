"""What every compressed weight format of a pruned linear is.

A format is one class (``kernels/sparse24.py``, ``kernels/bitmap.py``) named in
:data:`secateurs.kernels.registry.FORMATS`; :class:`SparseFormat` lists what it owns: its ``kind`` (the
name in stage records), the names of its tensors (``parts``: buffers of a ``SparseLinear``, keys of
the saved state), its construction from a weight (``compress``) and from a keep-mask and values
(``from_mask``), its exact expansion (``to_dense``, the reference every kernel is tested against),
its Triton K-block sizes and kernel, and the CUDA kernels it offers. Code outside the format file
asks the class and never tests a kind; :func:`secateurs.kernels.registry.choose_format` picks one.

``pack_bits`` / ``unpack_bits`` convert to and from a dense keep-mask packed 8 columns to a byte (bit
j of byte k = column 8k + j), the bitmask of the ``compressed-tensors`` checkpoint layout
(:mod:`secateurs.kernels.compressed`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from typing import Self

    from .triton_ops import Config, KBlocks


class SparseFormat(ABC):
    """A weight ``W`` (out, in) held compressed. Subclasses are dataclasses whose fields are their
    ``parts`` (in that order) and ``shape``; the first part holds the weight's values (its dtype is
    the weight's)."""

    kind: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]
    any_sparsity: ClassVar[bool] = False
    """True for a structured pattern (2:4), stored whatever its fraction of zeros, since the pattern
    alone makes it smaller; else ``choose_format`` requires the minimum sparsity first."""
    checkpoint_storage: ClassVar[str | None] = None
    """The compressed-tensors storage format whose values this format keeps exactly as stored (then
    ``from_mask`` and ``mask`` read and write it, and a model of only this format saves in it)."""
    cusparselt: ClassVar[bool] = False
    """Whether torch's semi-structured (cuSPARSELt) layout can hold the weight, a dispatcher candidate."""
    k_blocks: ClassVar[KBlocks | None] = None
    """Triton K-block sizes, None where the format has no Triton kernel."""
    shape: tuple[int, int]

    @staticmethod
    @abstractmethod
    def fits(weight: torch.Tensor) -> str | None:
        """None when the layout can hold ``weight``, else why not (one line): what ``compress`` checks."""

    @classmethod
    @abstractmethod
    def compress(cls, weight: torch.Tensor) -> Self:
        """The format of a weight it supports (UsageError, saying why, for one it does not)."""

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The weight, exactly: the reference every kernel must match."""

    @classmethod
    def from_mask(cls, values: torch.Tensor, mask: torch.Tensor) -> Self:
        """The format from a keep-mask and its values in row-major order, as a bitmask checkpoint stores
        them; required where ``checkpoint_storage`` is set."""
        raise NotImplementedError(f"{cls.kind} is not built from a keep-mask")

    def mask(self) -> torch.Tensor:
        """(out, in) bool: the stored positions; required where ``checkpoint_storage`` is set."""
        raise NotImplementedError(f"{self.kind} has no keep-mask of its own")

    @classmethod
    def supports(cls, weight: torch.Tensor) -> str | None:
        """None where :func:`choose_format` may store ``weight`` here: the format is not :meth:`unavailable` and
        the weight :meth:`fits`; else why not (one line)."""
        return cls.unavailable() or cls.fits(weight)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why :func:`choose_format` does not store weights in this format here and now (one line), or None."""
        return None

    def plan_variant(self) -> Hashable:
        """What besides kind, shape, token bucket and dtype decides which kernels this weight is offered: part of the
        dispatcher's plan key, so that a plan tuned on one weight is never replayed on another whose candidates differ
        (a kernel name not offered there would fall back to the slow reference). Nothing, for most formats."""
        return ()

    @classmethod
    def why(cls, sparsity: float) -> str:
        """Why a weight was stored in this format, for the export record."""
        return cls.kind

    @classmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], shape: Sequence[int]) -> Self:
        """Rebuild from the tensors it saved, by name or in ``parts`` order (the reload half of the round trip)."""
        named = parts if isinstance(parts, Mapping) else dict(zip(cls.parts, parts))
        return cls(**{name: named[name] for name in cls.parts}, shape=tuple(shape))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.parts}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def clone(self) -> Self:
        return self.from_parts({name: t.clone() for name, t in self.tensors().items()}, self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self.parts[0]).dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, self.parts[0]).device

    def triton_matmul(self, x: torch.Tensor, config: Config) -> torch.Tensor:
        """``x @ W.T`` by the format's Triton kernel; called only where ``k_blocks`` is set."""
        raise NotImplementedError(f"{self.kind} has no Triton kernel")

    def cuda_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The CUDA kernels for ``m`` activation rows of this weight on a GPU where they run (name -> ``x -> y``,
        the first the untimed default); none by default."""
        return {}

    def cuda_extra_bytes(self) -> int:
        """Bytes of tables the CUDA kernels derived from this weight and keep beside it."""
        return 0


def reference_matmul(x: torch.Tensor, fmt: SparseFormat, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` by expanding the weight: the correct answer every kernel must match."""
    return torch.nn.functional.linear(x, fmt.to_dense().to(x.dtype), bias)


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
