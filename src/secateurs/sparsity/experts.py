"""Routed experts with too few calibration tokens: the stated rule that prunes them instead.

An expert's statistics come only from the tokens its router sent it (:mod:`secateurs.model.experts`),
so a rarely picked expert may see a handful of tokens or none: Wanda's norms are then zero (every
score ties) and SparseGPT's Hessian has no curvature. Before a block's masks are chosen,
:class:`ExpertFallback` replaces the statistics of every expert matrix that saw fewer than
``min_tokens`` tokens by the rule's (:class:`~secateurs.sparsity.config.MoeOptions`): ``magnitude``
(white inputs: Wanda and SparseGPT score by |W|, SparseGPT makes no update; RIA keeps its
relative importance) or ``pooled`` (the sums of all the
layer's experts for that matrix, the layer's pooled statistics), and lists it, so the record and the
report say which experts were pruned blind. The expert is pruned to the block's sparsity either way.
"""

from __future__ import annotations

import re

from torch import nn

from ..engine.sequential import Stats
from ..engine.stats import Accumulator
from ..model.experts import ExpertLinear, check_routed_coverage
from .config import MoeOptions


def check_calibration_covers_experts(n_tokens: int, n_experts: int, top_k: int, options: MoeOptions) -> None:
    """One line when calibration cannot give every routed expert ``min_tokens`` tokens even if the
    router spread them evenly: every run would then prune some experts by the fallback rule."""
    check_routed_coverage(
        n_tokens, n_experts, top_k, options.min_tokens,
        f"some experts would be pruned by the {options.fallback} fallback rule instead of their own statistics",
        "more --n-samples / --seq-len or a lower --moe min_tokens",
    )


class ExpertFallback:
    """Per block, the routed-expert matrices whose statistics the rule replaced (``fallen``)."""

    def __init__(self, options: MoeOptions) -> None:
        self.rule, self.min_tokens = options.fallback, options.min_tokens
        self.fallen: dict[int, list[str]] = {}

    def starved(self, linears: dict[str, nn.Module], stats: Stats) -> list[str]:
        """The expert matrices of this block that saw fewer than ``min_tokens`` calibration tokens."""
        return [name for name, module in linears.items()
                if isinstance(module, ExpertLinear) and stats.get(name)
                and min(acc.n_tokens for acc in stats[name].values()) < self.min_tokens]

    def __call__(self, index: int, linears: dict[str, nn.Module], stats: Stats) -> list[str]:
        """Replace the statistics of this block's starved expert matrices in place; returns their names."""
        starved = self.starved(linears, stats)
        if not starved:
            return []
        if self.rule == "pooled":
            for matrix, names in _by_matrix(starved).items():
                peers = [n for n, m in linears.items() if isinstance(m, ExpertLinear) and _matrix(n) == matrix]
                pooled = {kind: _pooled([stats[n][kind] for n in peers if n in stats]) for kind in stats[names[0]]}
                for name in names:
                    stats[name] = dict(pooled)
        else:
            for name in starved:
                for acc in stats[name].values():
                    acc.white()
        self.fallen.setdefault(index, []).extend(starved)
        return starved

    def note(self) -> str | None:
        """What the caller tells the user, naming the rule; None when every expert had enough tokens."""
        count = sum(len(v) for v in self.fallen.values())
        if not count:
            return None
        how = "by weight magnitude" if self.rule == "magnitude" else "with the layer's pooled expert statistics"
        return (f"{count} routed-expert matrices in {len(self.fallen)} blocks saw fewer than {self.min_tokens} "
                f"calibration tokens and were pruned {how} (listed under expert_fallback in secateurs.json)")


def _matrix(name: str) -> str:
    """An expert matrix's path without its expert index (``mlp.experts.down_proj``)."""
    return re.sub(r"\.\d+$", "", name)


def _by_matrix(names: list[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(_matrix(name), []).append(name)
    return grouped


def _pooled(accumulators: list[Accumulator]) -> Accumulator:
    """The sum of the layer's experts' accumulators of one kind, in a fresh accumulator."""
    first = accumulators[0]
    pooled = type(first)(first.in_features, first.device)
    for acc in accumulators:
        pooled.merge(acc)
    if pooled.n_tokens == 0:  # not one token reached any expert of the layer: nothing to pool
        pooled.white()
    return pooled
