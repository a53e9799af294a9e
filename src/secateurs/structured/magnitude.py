"""Magnitude width pruning: a group's importance is the l1 or l2 norm of all its weights.

The data-free baseline of LLM-Pruner's Table 1 ("L2" / "Random" rows); no calibration needed.
l2 ranks by the squared norm, which orders groups exactly as the norm does.
"""

from __future__ import annotations

import torch

from ..model.groups import GroupSet
from ..model.load import LoadedModel
from .base import WidthMethod
from .importance import group_scores, magnitude_element
from .select import Scores


class MagnitudeWidth(WidthMethod):
    name = "magnitude"
    importances = ("l1", "l2")
    default_importance = "l2"

    def scores(
        self, loaded: LoadedModel, groups: list[dict[str, GroupSet]], calib_ids: torch.Tensor | None, device: torch.device
    ) -> Scores:
        element = magnitude_element(1 if self.importance == "l1" else 2)
        blocks = loaded.spec.blocks_of(loaded.model)
        return [
            {kind: group_scores(block, gs, element, self.config.aggregate) for kind, gs in per.items()}
            for block, per in zip(blocks, groups)
        ]
