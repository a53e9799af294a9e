"""Magnitude pruning: drop the smallest |W|. Needs no calibration data.

Default comparison group is the whole layer, as in the Wanda paper's magnitude baseline
(Sun et al. 2023, Table 1); ``per=row`` compares within each output row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.stats import Accumulator
from .base import SparsityMethod
from .masks import select


@dataclass(frozen=True)
class MagnitudeOptions:
    per: str = "layer"


class Magnitude(SparsityMethod):
    name = "magnitude"
    Options = MagnitudeOptions
    needs_calibration = False

    def prune_matrix(
        self, weight: torch.Tensor, stats: dict[str, Accumulator], sparsity: float
    ) -> torch.Tensor:
        return select(weight.abs(), sparsity, self.target.pattern, self.options.per)
