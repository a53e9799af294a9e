"""Wanda-SP: the structured form of Wanda (Sun et al., 2023) that FLAP (An et al., AAAI 2024) compares with.

A group's importance is Σ |W_ij| · ‖X_j‖ over the output-projection columns j it owns (o_proj for a
head group, down_proj for an MLP channel), ‖X_j‖ being the l2 norm of that input feature over the
calibration tokens. Calibration default: 128 samples (Wanda's), here of 128 tokens as in FLAP's
structured experiments.
"""

from __future__ import annotations

import torch

from ..engine.stats import InputSqNorm
from ..model.groups import GroupSet
from ..model.load import LoadedModel
from .base import WidthMethod
from .importance import consumer_scores, consumer_statistics
from .select import Scores


class WandaSP(WidthMethod):
    name = "wanda-sp"
    needs_calibration = True
    default_samples = 128
    default_seq_len = 128

    def scores(
        self, loaded: LoadedModel, groups: list[dict[str, GroupSet]], calib_ids: torch.Tensor | None, device: torch.device
    ) -> Scores:
        stats = consumer_statistics(loaded, groups, calib_ids, {"sq": InputSqNorm}, device)
        return consumer_scores(
            loaded, groups, stats, lambda weight, acc: weight.abs().sum(dim=0) * acc["sq"].norm.to(weight.device))
