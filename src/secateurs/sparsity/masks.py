"""Masks shared by every sparsity method: unstructured (per row or per layer) and N:M.

A mask is a bool tensor shaped like the (out, in) weight, True where the weight is kept. Scores are
"higher = more important"; ties break by position (stable sort), so the same scores always give
the same mask. N:M keeps the N highest-scoring weights in each run of M consecutive inputs
(``2:4`` = 2 kept of every 4, the tensor-core layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError

COMPARISON_GROUPS = ("row", "layer")
KERNEL_PATTERNS = ("2:4", "4:8", "8:16")
"""The N:M patterns with a stored format and decode kernel of their own (the N:M kinds of
``kernels/registry.py``, written out so that parsing a pattern does not import the kernels; a test keeps the
two equal); any other N:M still prunes, and an export stores it in the format that holds it
(``stages/prune.py`` says which)."""


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` or N:M (``n`` kept out of every ``m`` along the input dimension)."""

    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str) -> Pattern:
        if text == "unstructured":
            return cls()
        parts = text.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            n, m = int(parts[0]), int(parts[1])
            if 0 < n < m:
                return cls(n, m)
        raise UsageError(f"unknown pattern {text!r}; use unstructured or N:M with 0 < N < M "
                         f"(the sparse kernels run {', '.join(KERNEL_PATTERNS)}), e.g. 4:8")

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def implied_sparsity(self) -> float | None:
        return None if self.m is None else 1.0 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.m is None else f"{self.n}:{self.m}"

    def check_fits(self, in_features: int, where: str) -> None:
        if self.m is not None and in_features % self.m:
            raise UsageError(
                f"pattern {self} needs the input dimension to be a multiple of {self.m}, but "
                f"{where} has {in_features} inputs; choose an M that divides it or use unstructured"
            )


def unstructured_mask(scores: torch.Tensor, sparsity: float, per: str = "row") -> torch.Tensor:
    """Drop the ``sparsity`` fraction of lowest scores in each output row, or in the whole layer."""
    if per not in COMPARISON_GROUPS:
        raise UsageError(f"unknown comparison group {per!r}; use row or layer")
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if per == "row":
        k = int(scores.shape[1] * sparsity)
        if k:
            drop = scores.argsort(dim=1, stable=True)[:, :k]
            keep.scatter_(1, drop, False)
        return keep
    k = int(scores.numel() * sparsity)
    if k:
        drop = scores.flatten().argsort(stable=True)[:k]
        keep.view(-1)[drop] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    drop = groups.argsort(dim=2, stable=True)[:, :, : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, drop, False)
    return keep.reshape(rows, cols)


def select(scores: torch.Tensor, sparsity: float, pattern: Pattern, per: str = "row") -> torch.Tensor:
    """The keep-mask for ``scores`` under ``pattern`` (N:M ignores ``sparsity`` and ``per``)."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, sparsity, per)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // m, m).sum(dim=2)
    return bool((nonzero <= n).all())
