"""The kernel formats, by ``kind``, resolved lazily so each format stays its own file, and the choice
among them.

The order is the order of preference: :func:`choose_format` stores a pruned weight in the first format
that holds it. Everything else (``SparseLinear``, the sparse export, both reloads, the Triton and CUDA
dispatch) reads a format's knowledge from its class, so adding a format is its file plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import torch

from ..errors import UsageError

if TYPE_CHECKING:
    from .formats import SparseFormat

FORMATS: dict[str, str] = {
    "2:4": "secateurs.kernels.sparse24:Sparse24",
    "4:8": "secateurs.kernels.nm48:Nm48",
    "8:16": "secateurs.kernels.nm816:Nm816",
    # unstructured 50-90% zeros: its 1-token GEMV beat the bitmap's on every H100 shape and band measured
    "banded": "secateurs.kernels.banded:Banded",
    # unstructured weights the banded layout refuses: outside its bands, or one its fits() refuses
    "bitmap": "secateurs.kernels.bitmap:Bitmap",
}


def format_class(kind: str) -> type[SparseFormat]:
    """The class of a format kind, as recorded in a stage record or held by a ``SparseLinear``."""
    if kind not in FORMATS:
        raise UsageError(f"unknown sparse format {kind!r}; known: {', '.join(FORMATS)}")
    module, attr = FORMATS[kind].split(":")
    return getattr(importlib.import_module(module), attr)


def format_classes() -> list[type[SparseFormat]]:
    """Every registered format, in the order of preference."""
    return [format_class(kind) for kind in FORMATS]


def choose_format(weight: torch.Tensor, min_sparsity: float) -> tuple[type[SparseFormat] | None, str]:
    """The first registered format that holds a pruned weight (a format that needs sparsity only at
    ``min_sparsity`` zeros or more), or None and why the last one refused, so it stays dense."""
    sparsity = float((weight == 0).sum()) / weight.numel()
    reason = "no sparse format is registered"
    for cls in format_classes():
        if not cls.any_sparsity and sparsity < min_sparsity:
            reason = f"sparsity {sparsity:.2f} < {min_sparsity:.2f}"
            continue
        reason = cls.supports(weight)
        if reason is None:
            return cls, cls.why(sparsity)
    return None, reason


def refusal(fmt: type[SparseFormat], weight: torch.Tensor, reason: str) -> UsageError:
    """What a format's ``compress`` raises for a weight that does not fit it (``reason``): one line naming the
    pattern the weight does have, where another any-sparsity (N:M) format holds it, and the pruning that fits."""
    held = next((other.kind for other in format_classes()
                 if other is not fmt and other.any_sparsity and other.fits(weight) is None), None)
    runs = f"; it is {held}" if held else ""
    return UsageError(f"weight is not {fmt.kind} sparse ({reason}){runs}; prune with --pattern {fmt.kind} first")
