"""OWL: outlier-weighted layerwise sparsity — blocks with more outlier weights are pruned less.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to
High Sparsity" (2024). A dense pass over the blocks measures each block's outlier ratio D: the share
of its Wanda scores |W_ij|·‖X_j‖₂ above M times the block's mean score. Ratios are rescaled to
[0, 2λ], and block i gets sparsity S − (D'_i − mean D'), so the mean sparsity equals the target S
and every block stays within S ± λ. Paper defaults: M = 5, λ = 0.08. The schedule then drives any
unstructured method (magnitude, Wanda, SparseGPT) through the same per-block target.

On a mixture-of-experts block each routed expert's matrices are units of the ratio like the block's
other linears, but an expert sees only its routed tokens, so its ‖X_j‖₂ is a sum over fewer tokens:
every linear's norms are put on the scale of the block's most-fed linear (× √(n_max / n), exactly 1
on a dense block, whose linears all see every token). Experts that saw too few tokens follow the
prune's fallback rule (:mod:`secateurs.sparsity.experts`): pooled statistics, or, for magnitude,
they are left out of the ratio (a |W| score is not on the Wanda scale).
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.sequential import BlockMethod, EngineHooks, EngineOptions, Stats, run_blocks
from ..engine.stats import InputSqNorm
from ..errors import UsageError
from ..model.arch import ArchSpec
from ..model.linear import weight_matrix
from .base import SparsityTarget
from .config import MoeOptions, OwlOptions
from .experts import ExpertFallback
from .wanda import wanda_scores


class OutlierRatios(BlockMethod):
    """Observe-only pass: each block's share of Wanda scores above ``m`` × the block's mean score."""

    needs_calibration = True
    modifies_weights = False
    statistics = {"norm": InputSqNorm}

    def __init__(self, m: float, fallback: ExpertFallback | None = None) -> None:
        self.m = m
        self.fallback = fallback
        self.ratios: list[float] = []

    def process_block(self, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats) -> None:
        if self.fallback is not None:
            starved = self.fallback(index, linears, stats)
            if self.fallback.rule == "magnitude":
                linears = {n: m for n, m in linears.items() if n not in starved}
        most = max(stats[name]["norm"].n_tokens for name in linears)

        def scores(name: str, module: nn.Module) -> torch.Tensor:
            n = stats[name]["norm"].n_tokens
            found = wanda_scores(weight_matrix(module), stats[name]["norm"])
            return found if n == most else found * (most / n) ** 0.5

        # Two sweeps (mean, then count) so the block's scores never sit in memory all at once.
        total, count = 0.0, 0
        for name, module in linears.items():
            found = scores(name, module)
            total += float(found.sum(dtype=torch.float64))
            count += found.numel()
        threshold = self.m * total / count
        above = sum(int((scores(name, module) > threshold).sum()) for name, module in linears.items())
        self.ratios.append(above / count)


def owl_schedule(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities with mean ``sparsity``, lower where the outlier ratio is higher."""
    low, high = min(ratios), max(ratios)
    if high == low:
        return [sparsity] * len(ratios)
    scaled = [(r - low) / (high - low) * 2 * lam for r in ratios]
    mean = sum(scaled) / len(scaled)
    schedule = [sparsity - (s - mean) for s in scaled]
    for i, value in enumerate(schedule):
        if not 0.0 <= value < 1.0:
            raise UsageError(
                f"OWL with lambda {lam:g} gives block {i} sparsity {value:.3f}, outside [0, 1); "
                "lower --owl-lambda or the sparsity"
            )
    return schedule


def owl_target(
    model: nn.Module,
    spec: ArchSpec,
    target: SparsityTarget,
    calib_ids: torch.Tensor,
    engine: EngineOptions,
    options: OwlOptions,
    hooks: EngineHooks | None = None,
    moe: MoeOptions | None = None,
) -> SparsityTarget:
    """Replace a uniform unstructured target by OWL's per-block schedule (one dense pass, through
    ``hooks`` when streamed or split over processes); ``moe``: an MoE prune's options (the fallback
    rule for starved experts)."""
    if target.pattern.is_nm:
        raise UsageError(f"--allocation owl sets unstructured per-block sparsity; {target.pattern} fixes it, use --pattern unstructured")
    if len(set(target.per_block)) != 1:
        raise UsageError("--allocation owl spreads one --sparsity value over the blocks; pass a single value")
    if options.m <= 0 or options.lam < 0:
        raise UsageError(f"OWL needs --owl-m > 0 and --owl-lambda ≥ 0, got {options.m:g} and {options.lam:g}")
    observer = OutlierRatios(options.m, ExpertFallback(moe) if moe is not None and spec.moe is not None else None)
    run_blocks(model, spec, observer, calib_ids, engine, "OWL outlier ratios", hooks)
    return SparsityTarget(tuple(owl_schedule(observer.ratios, target.per_block[0], options.lam)), target.pattern)
