"""Taylor criterion of Shortened LLaMA (Kim et al., 2024, arXiv 2402.02834).

Importance of a block = Σ over its linear weights of |∂L/∂W ⊙ W|, the first-order estimate of the
loss change if those weights were zeroed, with the gradient of the whole calibration loss (the
paper's choice, ``per_batch=False``). One backward pass over the calibration set, one-shot ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerScorer, ScoringContext, gradient_scores


@dataclass
class TaylorOptions:
    """``per_batch=True`` sums per-batch |g ⊙ W| instead, never holding a whole-model gradient."""

    one_shot: bool = True
    per_batch: bool = False


class Taylor(LayerScorer):
    name = "taylor"
    Options = TaylorOptions
    needs_gradients = True

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        return gradient_scores(ctx, self, lambda grad, weight: (grad * weight).abs().sum(), self.options.per_batch)
