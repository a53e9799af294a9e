"""The base every unstructured / N:M method derives from: per-block target, mask, apply.

A method subclass only says how it scores (and, for SparseGPT, how it updates) one weight matrix;
iteration over blocks and linears, per-block sparsity, N:M validation and applying the mask live here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine.sequential import BlockData, BlockMethod, Stats
from ..engine.stats import Accumulator
from ..errors import UsageError
from ..model.linear import weight_matrix
from .masks import Pattern


@dataclass(frozen=True)
class SparsityTarget:
    """Sparsity per block and the pattern; N:M fixes the sparsity at 1 − N/M.

    Under N:M a per-block schedule may also hold 0 for a block left dense, so that 2:4 can cover only
    some blocks (the only way to reach a parameter budget between 50% and 100% with a pattern that
    sparse kernels accelerate).
    """

    per_block: tuple[float, ...]
    pattern: Pattern

    @classmethod
    def build(cls, sparsity: float | list[float] | None, pattern: str, n_blocks: int) -> SparsityTarget:
        parsed = Pattern.parse(pattern)
        implied = parsed.implied_sparsity
        if sparsity is None:
            sparsity = 0.5 if implied is None else implied
        values = [float(v) for v in sparsity] if isinstance(sparsity, (list, tuple)) else [float(sparsity)]
        for value in values:
            if not 0.0 <= value < 1.0:
                raise UsageError(f"--sparsity must be in [0, 1), got {value:g}")
        if implied is not None and any(abs(v - implied) > 1e-9 and v != 0.0 for v in values):
            raise UsageError(
                f"pattern {parsed} fixes the sparsity at {implied:g} (or 0 per block, to leave a block dense); "
                "drop --sparsity or use unstructured"
            )
        if len(values) == 1:
            values = values * n_blocks
        if len(values) != n_blocks:
            raise UsageError(
                f"a per-block --sparsity schedule needs one value per block: the model has {n_blocks} "
                f"blocks, got {len(values)} values"
            )
        return cls(tuple(values), parsed)

    @property
    def mean(self) -> float:
        return sum(self.per_block) / len(self.per_block)


class SparsityMethod(BlockMethod):
    """Prune every linear of every block to the target; subclasses implement :meth:`prune_matrix`."""

    name: ClassVar[str]
    Options: ClassVar[type]
    statistics: ClassVar[dict[str, type[Accumulator]]] = {}
    splits_by_linear: ClassVar[bool] = True  # each linear is pruned from its own weight and statistics

    def __init__(self, target: SparsityTarget, options: Any = None) -> None:
        self.target = target
        self.options = options if options is not None else self.Options()
        # Optional block-level steps around the method's own decision, set by ``api.prune``: a
        # permutation of the MLP's hidden channels before N:M masks are chosen (sparsity/permute.py)
        # and a reconstruction of the pruned block after them (sparsity/reconstruct.py).
        self.permutation: Callable[[int, nn.Module, dict[str, nn.Module], Stats, Callable], None] | None = None
        self.reconstruction: Callable[[int, nn.Module, dict[str, nn.Module], BlockData], None] | None = None
        # On an MoE model, the rule for routed experts that saw too few calibration tokens
        # (sparsity/experts.py): it replaces their statistics before any mask is chosen.
        self.expert_fallback: Callable[[int, dict[str, nn.Module], Stats], list[str]] | None = None

    @property
    def keeps_dense_outputs(self) -> bool:  # type: ignore[override]
        return self.reconstruction is not None

    def refine(self, index: int, block: nn.Module, linears: dict[str, nn.Module], data: BlockData) -> None:
        if self.reconstruction is not None and self.target.per_block[index] != 0.0:
            self.reconstruction(index, block, linears, data)

    def process_block(
        self, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats
    ) -> None:
        sparsity = self.target.per_block[index]
        if sparsity == 0.0:  # a block left dense (an N:M mask would otherwise prune it to N/M)
            return
        self.prepare_statistics(index, linears, stats)
        if self.permutation is not None:
            self.permutation(index, block, linears, stats, self.score_matrix)
        for name, module in linears.items():
            weight = weight_matrix(module)
            keep = self.prune_matrix(weight, stats.get(name, {}), sparsity)
            weight.mul_(keep.to(weight.dtype))

    def prepare_statistics(self, index: int, linears: dict[str, nn.Module], stats: Stats) -> None:
        """Before any mask of the block: the expert fallback's statistics for starved experts."""
        if self.expert_fallback is not None and self.statistics:
            self.expert_fallback(index, linears, stats)

    def prune_matrix(
        self, weight: torch.Tensor, stats: dict[str, Accumulator], sparsity: float
    ) -> torch.Tensor:
        """Return the keep-mask of one (out, in) weight; may also update ``weight`` in place."""
        raise NotImplementedError

    def score_matrix(self, weight: torch.Tensor, stats: dict[str, Accumulator]) -> torch.Tensor:
        """Importance of each weight (higher = keep), used to choose a channel permutation before
        N:M masks. Methods with a fixed score return it; the default is Wanda's |W|·‖X_j‖₂, with
        ‖X_j‖₂² read from the input norms or the Hessian's diagonal, else |W|."""
        magnitude = weight.abs().to(torch.float32)
        if "norm" in stats:
            return magnitude * stats["norm"].norm.to(weight.device).unsqueeze(0)
        if "hessian" in stats:
            return magnitude * stats["hessian"].xtx.diagonal().sqrt().to(weight.device).unsqueeze(0)
        return magnitude

