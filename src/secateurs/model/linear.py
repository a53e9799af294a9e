"""A uniform (out_features, in_features) view of a Linear, a GPT-2 Conv1D or one expert of a fused
MoE parameter (:class:`~secateurs.model.experts.ExpertLinear`): the one place that knows orientation.

GPT-2 stores its projections as ``Conv1D`` with the weight transposed (in, out). Every method and
mask works on the (out, in) view returned by :func:`weight_matrix` (or :func:`oriented` for a tensor
shaped like the weight, such as its gradient); surgery that cuts rows or columns asks
:func:`weight_dim` which stored dimension to cut and :func:`sync_features` to refresh the module's
own size attributes. The views share storage with the module, so in-place edits (``mul_``,
``copy_``) change the model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .experts import ExpertLinear, RouterLinear


def is_transposed(module: nn.Module) -> bool:
    """The module stores its weight as (in, out) (GPT-2's Conv1D, gpt-oss's experts)."""
    return isinstance(module, Conv1D) or (isinstance(module, ExpertLinear) and module.transposed)


def oriented(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, shaped like ``module.weight``, seen as (out, in) (a view, sharing storage)."""
    if is_transposed(module):
        return tensor.t()
    if isinstance(module, (nn.Linear, ExpertLinear, RouterLinear)):
        return tensor
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), sharing storage with the module."""
    return oriented(module, module.weight.data)


def weight_dim(module: nn.Module, axis: str) -> int:
    """The dimension of the stored ``module.weight`` that holds its outputs (``axis='out'``) or inputs."""
    out_dim = 1 if is_transposed(module) else 0
    return out_dim if axis == "out" else 1 - out_dim


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def out_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[0]


def sync_features(module: nn.Module) -> None:
    """Make the module's own size attributes (``nf``, or ``out_features``/``in_features``) match a
    weight that surgery replaced, so ``repr`` and code that reads them see the new shape."""
    if isinstance(module, (ExpertLinear, RouterLinear)):
        raise TypeError(f"{module!r} is a view of an MoE parameter; surgery cannot resize it")
    if is_transposed(module):
        module.nf = module.weight.shape[1]
    else:
        module.out_features, module.in_features = module.weight.shape


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum().item()) / weight.numel()
