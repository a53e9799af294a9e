"""FLAP (An, Zhao, Yu, Tang, Wang, AAAI 2024): fluctuation-based pruning with bias compensation.

Importance of a group (the paper's WIFV metric): Σ over the output-projection columns j it owns of
Var(X_j) · ‖W_:,j‖², the calibration-sample variance of input feature j times the squared norm of
the weights that read it: a feature that barely fluctuates can be replaced by its mean. Removing
the group then adds W_:,J · mean(X_J) to the projection's bias (bias compensation), so the
output keeps its expected value. FLAP's paper default is a global structure across layers and
kinds (``--mode global``; scores are standardised per kind there) and 1024 samples of 128 tokens.

The compensation adds a bias to o_proj / down_proj that Llama-family configs cannot express on its
own, so a compensated folder reloads through the per-layer model class (secateurs' own; plain
transformers users opt in with ``trust_remote_code``);
``bias_compensation=False`` gives a stock-loadable result.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.stats import Accumulator, InputMean, InputSqNorm
from ..model.groups import GroupSet
from ..model.linear import weight_matrix
from ..model.load import LoadedModel
from .importance import ConsumerScored


class FLAP(ConsumerScored):
    name = "flap"
    default_samples = 1024
    default_seq_len = 128
    statistics = {"sq": InputSqNorm, "mean": InputMean}

    def observed(self, stats: list[dict[str, dict[str, Accumulator]]]) -> None:
        self.means = [{kind: acc["mean"].mean.cpu() for kind, acc in per.items()} for per in stats]

    def column_score(self, weight: torch.Tensor, acc: dict[str, Accumulator]) -> torch.Tensor:
        """Var(X_j) · ‖W_:,j‖²."""
        sq, mean = acc["sq"], acc["mean"]
        variance = (sq.sum_sq / max(sq.n_tokens, 1) - mean.mean.square()).clamp_min(0)
        return variance.to(weight.device) * weight.square().sum(dim=0)

    def before_slice(
        self, loaded: LoadedModel, groups: list[dict[str, GroupSet]], keep: list[dict[str, torch.Tensor]]
    ) -> None:
        if not self.config.bias_compensation:
            return
        for block, per, kept, means in zip(loaded.spec.blocks_of(loaded.model), groups, keep, self.means):
            for kind, group_set in per.items():
                if kind not in kept:
                    continue
                removed = torch.ones(group_set.count, dtype=torch.bool)
                removed[kept[kind]] = False
                columns = group_set.consumer.index[removed].reshape(-1)
                if columns.numel():
                    compensate(block.get_submodule(group_set.consumer.path), columns, means[kind])


def compensate(module: nn.Module, columns: torch.Tensor, mean: torch.Tensor) -> None:
    """Add W[:, columns] · mean[columns] to the linear's bias (creating a zero bias if it has none)."""
    weight = weight_matrix(module)
    shift = weight[:, columns].float() @ mean[columns].to(weight.device)
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device), requires_grad=False)
    module.bias.data.add_(shift.to(module.bias.dtype))
