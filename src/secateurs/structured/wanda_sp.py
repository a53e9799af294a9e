"""Wanda-SP: the structured form of Wanda (Sun et al., 2023) that FLAP (An et al., AAAI 2024) compares with.

A group's importance is Σ |W_ij| · ‖X_j‖ over the output-projection columns j it owns (o_proj for a
head group, down_proj for an MLP channel), ‖X_j‖ being the l2 norm of that input feature over the
calibration tokens. Calibration default: 128 samples (Wanda's), here of 128 tokens as in FLAP's
structured experiments.
"""

from __future__ import annotations

import torch

from ..engine.stats import Accumulator, InputSqNorm
from .importance import ConsumerScored


class WandaSP(ConsumerScored):
    name = "wanda-sp"
    default_samples = 128
    default_seq_len = 128
    statistics = {"sq": InputSqNorm}

    def column_score(self, weight: torch.Tensor, acc: dict[str, Accumulator]) -> torch.Tensor:
        """Σ_i |W_ij| · ‖X_j‖."""
        return weight.abs().sum(dim=0) * acc["sq"].norm.to(weight.device)
