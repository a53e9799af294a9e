"""A uniform (out_features, in_features) view of the weight of a Linear or a GPT-2 Conv1D.

GPT-2 stores its projections as ``Conv1D`` with the weight transposed (in, out). Every method and
mask works on the (out, in) view returned here; it shares storage with the module, so in-place
edits (``mul_``, ``copy_``) change the model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), sharing storage with the module."""
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    if isinstance(module, nn.Linear):
        return module.weight.data
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]
