"""ShortGPT block influence (Men et al., 2024, arXiv 2403.03853).

BI of a layer = mean over calibration tokens of 1 − cos(input, output) of its hidden states: a
layer that barely rotates the residual stream changes little and goes first. One forward pass,
one-shot ranking, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LayerScorer, ScoringContext, observe_blocks


@dataclass
class BlockInfluenceOptions:
    """ShortGPT ranks once (``one_shot=True``); ``one_shot=False`` rescores after each removal."""

    one_shot: bool = True


class BlockInfluence(LayerScorer):
    name = "block-influence"
    Options = BlockInfluenceOptions

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        n = len(ctx.spec.blocks_of(ctx.model))
        total = torch.zeros(n, dtype=torch.float64)
        count = torch.zeros(n, dtype=torch.float64)

        def add(index: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
            cos = F.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
            total[index] += float((1 - cos).sum())
            count[index] += cos.numel()

        observe_blocks(ctx, self, add)
        return total / count
