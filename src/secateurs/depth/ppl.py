"""Perplexity criterion: drop a layer, measure calibration perplexity, keep the drop that hurts least.

Iterative by default, as SLEB (Song et al., 2024, arXiv 2402.09025): at every step each remaining
layer is tried out and the one whose removal gives the lowest calibration loss goes, so removing n
of L layers costs about n·L forward passes over the calibration set — the slow, strong baseline.
``one_shot=True`` is Shortened LLaMA's PPL criterion (Kim et al., 2024): every layer is removed
alone once and the n least harmful go together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.drop_layers import layers_removed
from .base import LayerScorer, ScoringContext, calibration_loss


@dataclass
class PplOptions:
    one_shot: bool = False


class Perplexity(LayerScorer):
    name = "ppl"
    Options = PplOptions

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        losses = []
        for index in range(len(ctx.spec.blocks_of(ctx.model))):
            with layers_removed(ctx.model, ctx.spec, [index]):
                losses.append(calibration_loss(ctx, self))
        return torch.tensor(losses, dtype=torch.float64)
