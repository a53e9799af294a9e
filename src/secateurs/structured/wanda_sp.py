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
from ..model.linear import weight_matrix
from ..model.load import LoadedModel
from .base import WidthMethod
from .importance import consumer_columns, consumer_statistics
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
        blocks = loaded.spec.blocks_of(loaded.model)
        out = []
        for block, per, per_stats in zip(blocks, groups, stats):
            scores = {}
            for kind, group_set in per.items():
                weight = weight_matrix(block.get_submodule(group_set.consumer.path)).float()
                column = weight.abs().sum(dim=0) * per_stats[kind]["sq"].norm.to(weight.device)
                scores[kind] = consumer_columns(group_set, column)
            out.append(scores)
        return out
