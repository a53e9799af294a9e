"""Wanda: prune by |W_ij| · ‖X_j‖₂, the weight times the norm of its input over calibration tokens.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models" (2023).
The score is the magnitude of the weight's contribution to the output on the calibration data; no
weight is updated. Default comparison group is each output row (``per=row``), the paper's choice
(its Table 6 shows per-output comparison beats per-layer for LLMs); ``per=layer`` ranks the whole
matrix. N:M keeps the N best scores of each group of M inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.stats import Accumulator, InputSqNorm
from .base import SparsityMethod
from .masks import select


@dataclass(frozen=True)
class WandaOptions:
    per: str = "row"


def wanda_scores(weight: torch.Tensor, norm: InputSqNorm) -> torch.Tensor:
    """|W| · ‖X_j‖₂ in float32 (OWL reuses it to find outlier weights)."""
    return weight.abs().to(torch.float32) * norm.norm.to(weight.device).unsqueeze(0)


class Wanda(SparsityMethod):
    name = "wanda"
    Options = WandaOptions
    needs_calibration = True
    statistics = {"norm": InputSqNorm}

    def prune_matrix(
        self, weight: torch.Tensor, stats: dict[str, Accumulator], sparsity: float
    ) -> torch.Tensor:
        return select(wanda_scores(weight, stats["norm"]), sparsity, self.target.pattern, self.options.per)
