"""Group importance: turn per-element (or per-column) scores into one score per dependency group.

Every method here produces, for each block and each group kind, a float32 vector with one score per
group (higher = more important). The shared step is :func:`group_scores`: sum a score matrix over
the rows / columns each group owns in every linear it couples, then aggregate those per-linear sums
across the group as LLM-Pruner does (Ma et al., 2023, §3.2: summation, product or max over the
group's members; summation is the paper's default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..engine.sequential import BlockMethod, EngineOptions, Stats, run_blocks
from ..engine.stats import Accumulator
from ..errors import UsageError
from ..model.groups import GroupSet, Slot
from ..model.linear import weight_matrix
from ..model.load import LoadedModel
from .base import WidthMethod
from .registry import AGGREGATES


# A score for each element of a linear's (out, in) weight and of its bias (None where it has none).
ElementScore = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]


def slot_sums(scores: torch.Tensor, bias_scores: torch.Tensor | None, slot: Slot) -> torch.Tensor:
    """Per group: the sum of ``scores`` over the rows (with their bias) or columns the group owns."""
    count, width = slot.index.shape
    flat = slot.index.reshape(-1).to(scores.device)
    if slot.axis == "out":
        per_row = scores.index_select(0, flat).sum(dim=1)
        if bias_scores is not None:
            per_row = per_row + bias_scores.index_select(0, flat)
        return per_row.reshape(count, width).sum(dim=1)
    return scores.index_select(1, flat).sum(dim=0).reshape(count, width).sum(dim=1)


def aggregate(per_slot: list[torch.Tensor], how: str) -> torch.Tensor:
    """Combine per-linear group sums: ``sum``, ``prod`` (as a sum of logs: same order, no overflow), ``max``."""
    stacked = torch.stack(per_slot).float()
    if how == "sum":
        return stacked.sum(dim=0)
    if how == "prod":
        return stacked.clamp_min(torch.finfo(torch.float32).tiny).log().sum(dim=0)
    if how == "max":
        return stacked.max(dim=0).values
    raise UsageError(f"unknown --aggregate {how!r}; use one of {', '.join(AGGREGATES)}")


def group_scores(block: nn.Module, group_set: GroupSet, element: ElementScore, how: str = "sum") -> torch.Tensor:
    """One score per group from an element-wise score over every linear the group couples."""
    per_slot = []
    for slot in group_set.slots:
        scores, bias_scores = element(block.get_submodule(slot.path))
        per_slot.append(slot_sums(scores.float(), None if slot.axis == "in" else bias_scores, slot))
    return aggregate(per_slot, how).cpu()


def magnitude_element(p: int) -> ElementScore:
    """|w|^p per element (l1: p=1, l2: p=2, the squared norm, which ranks as the norm does)."""

    def score(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = getattr(module, "bias", None)
        return (
            weight_matrix(module).float().abs().pow(p),
            None if bias is None else bias.detach().float().abs().pow(p),
        )

    return score


def consumer_columns(group_set: GroupSet, column_score: torch.Tensor) -> torch.Tensor:
    """Per group: the sum of a per-input-column score of the output projection over the group's columns.

    Wanda-SP and FLAP score a group by what it feeds into o_proj / down_proj; ``column_score`` has
    one value per input column of that linear.
    """
    slot = group_set.consumer
    count, width = slot.index.shape
    return column_score.float().cpu()[slot.index.reshape(-1)].reshape(count, width).sum(dim=1)


class _ConsumerInputs(BlockMethod):
    """Observe-only engine pass that keeps the input statistics of each group's output projection."""

    needs_calibration = True
    modifies_weights = False

    def __init__(self, groups: list[dict[str, GroupSet]], statistics: dict[str, type[Accumulator]]) -> None:
        self.groups = groups
        self.statistics = statistics
        self.kept: list[dict[str, dict[str, Accumulator]]] = [{} for _ in groups]

    def process_block(self, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats) -> None:
        for kind, group_set in self.groups[index].items():
            self.kept[index][kind] = stats[group_set.consumer.path]


def consumer_statistics(
    loaded: LoadedModel,
    groups: list[dict[str, GroupSet]],
    calib_ids: torch.Tensor,
    statistics: dict[str, type[Accumulator]],
    device: torch.device,
) -> list[dict[str, dict[str, Accumulator]]]:
    """Per block and kind: accumulators over the calibration inputs of the group's output projection.

    Runs the shared block-by-block engine on the dense model (scores are taken before any cut, as
    FLAP does), so only one block is on the accelerator at a time.
    """
    method = _ConsumerInputs(groups, statistics)
    run_blocks(loaded.model, loaded.spec, method, calib_ids, EngineOptions(device=str(device)), "statistics")
    return method.kept


def consumer_scores(
    loaded: LoadedModel,
    groups: list[dict[str, GroupSet]],
    stats: list[dict[str, dict[str, Accumulator]]],
    column_score: Callable[[torch.Tensor, dict[str, Accumulator]], torch.Tensor],
) -> list[dict[str, torch.Tensor]]:
    """Per block and kind: the groups' scores from a per-input-column score of their output projection,
    ``column_score(weight, accumulators)`` of its float weight and its :func:`consumer_statistics`."""
    out = []
    for block, per, per_stats in zip(loaded.spec.blocks_of(loaded.model), groups, stats):
        scores = {}
        for kind, group_set in per.items():
            weight = weight_matrix(block.get_submodule(group_set.consumer.path)).float()
            scores[kind] = consumer_columns(group_set, column_score(weight, per_stats[kind]))
        out.append(scores)
    return out


class ConsumerScored(WidthMethod):
    """A calibrated method that scores a group by what it feeds into its output projection (Wanda-SP,
    FLAP): the calibration statistics it names, then its :meth:`column_score` summed over each group's columns."""

    needs_calibration = True
    statistics: ClassVar[dict[str, type[Accumulator]]]

    def scores(
        self, loaded: LoadedModel, groups: list[dict[str, GroupSet]], calib_ids: torch.Tensor | None, device: torch.device
    ) -> list[dict[str, torch.Tensor]]:
        stats = consumer_statistics(loaded, groups, calib_ids, self.statistics, device)
        self.observed(stats)
        return consumer_scores(loaded, groups, stats, self.column_score)

    def observed(self, stats: list[dict[str, dict[str, Accumulator]]]) -> None:
        """The statistics, for a method that keeps some (FLAP's means, for its bias compensation)."""

    def column_score(self, weight: torch.Tensor, acc: dict[str, Accumulator]) -> torch.Tensor:
        """One score per input column of the output projection (float ``weight``) from its statistics."""
        raise NotImplementedError
