"""RIA: relative importance × activations, a mask criterion that keeps each row and each input alive.

Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models"
(ICLR 2024). A weight's relative importance is its magnitude relative to the other weights of its
input channel plus relative to the other weights of its output row,
RI_ij = |W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|, so that no channel is pruned away wholesale; the
score multiplies it by the input's activation norm to the power ``a``: RI_ij · ‖X_j‖₂^a. Paper
default a = 0.5. No weight is updated. The comparison group is each output row (``per=row``, as
Wanda; ``per=layer`` ranks the whole matrix); N:M keeps the N best scores of each group of M inputs.
For 2:4 the paper pairs it with a permutation of input channels (``--permute``, sparsity/permute.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.stats import Accumulator, InputSqNorm
from ..errors import UsageError
from .base import SparsityMethod, SparsityTarget
from .masks import select


@dataclass(frozen=True)
class RIAOptions:
    a: float = 0.5
    per: str = "row"


def ria_scores(weight: torch.Tensor, norm: InputSqNorm, a: float) -> torch.Tensor:
    """RI_ij · ‖X_j‖₂^a in float32; a zero row or column sum contributes nothing (all its weights are 0)."""
    magnitude = weight.abs().to(torch.float32)
    column = magnitude.sum(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    row = magnitude.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    relative = magnitude / column + magnitude / row
    return relative * norm.norm.to(weight.device).pow(a).unsqueeze(0)


class RIA(SparsityMethod):
    name = "ria"
    Options = RIAOptions
    needs_calibration = True
    statistics = {"norm": InputSqNorm}

    def __init__(self, target: SparsityTarget, options: RIAOptions | None = None) -> None:
        super().__init__(target, options)
        if not 0.0 <= self.options.a <= 2.0:
            raise UsageError(f"option a (the activation exponent) must be in [0, 2] (the paper uses 0.5), got {self.options.a:g}")

    def score_matrix(self, weight: torch.Tensor, stats: dict[str, Accumulator]) -> torch.Tensor:
        return ria_scores(weight, stats["norm"], self.options.a)

    def prune_matrix(
        self, weight: torch.Tensor, stats: dict[str, Accumulator], sparsity: float
    ) -> torch.Tensor:
        return select(self.score_matrix(weight, stats), sparsity, self.target.pattern, self.options.per)
