"""LLM-Pruner (Ma, Fang, Wang, NeurIPS 2023): gradient-based importance of dependency groups.

The loss change from removing weights W is estimated by a Taylor expansion with gradients of the
language-modelling loss on a few calibration samples (the paper's default: 10 samples of 128
tokens):

* ``taylor`` (element-wise, first order, the README's ``--taylor param_first``): |w · g| per
  weight, summed over the group's weights in each linear, aggregated across the group;
* ``vector`` (vector-wise): |Σ w · g| over each linear's share of the group, then aggregated;
* ``hessian`` (element-wise, first + second order, ``param_mix``): |w · g − ½ w² · F| with the
  Hessian's diagonal approximated by the Fisher information F = mean over samples of g².

g is the gradient of the mean loss over the samples. Only the block linears get gradients (the
embeddings, norms and LM head stay frozen), and samples run one at a time, so memory is the
model, one set of gradients of the block linears and, for ``hessian``, one Fisher buffer: a 7B
model in bf16 needs about 14 + 13 (+ 26 for the float32 Fisher) GB, within one 80 GB GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from ..evaluate.loss import gradient_pass
from ..model.groups import GroupSet
from ..model.linear import oriented
from ..model.load import LoadedModel
from .base import WidthMethod
from .importance import aggregate, group_scores, slot_sums
from .select import Scores


def calibration_gradients(
    loaded: LoadedModel, calib_ids: torch.Tensor, device: torch.device, fisher: bool
) -> dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per block-linear parameter: the mean gradient over samples and, if asked, the mean squared one."""
    model = loaded.model
    params = [
        p
        for module in loaded.spec.named_linears(model).values()
        for p in (module.weight, getattr(module, "bias", None))
        if p is not None
    ]
    sums: dict[int, torch.Tensor] = {}
    squares: dict[int, torch.Tensor] = {}

    def add(i: int, grad: torch.Tensor) -> None:
        grad = grad.float()
        sums[i] = sums[i].add_(grad) if i in sums else grad.clone()
        if fisher:
            squares[i] = squares[i].add_(grad.square()) if i in squares else grad.square()

    home = next(model.parameters()).device
    model.to(device)
    try:
        gradient_pass(model, calib_ids.split(1), params, add, device)
    finally:
        model.to(home)
    n = len(calib_ids)
    return {p: (sums[i].div_(n), squares[i].div_(n) if fisher else None) for i, p in enumerate(params)}


class LLMPruner(WidthMethod):
    name = "llm-pruner"
    needs_calibration = True
    importances = ("taylor", "vector", "hessian")
    default_importance = "taylor"
    default_samples = 10
    default_seq_len = 128

    def scores(
        self, loaded: LoadedModel, groups: list[dict[str, GroupSet]], calib_ids: torch.Tensor | None, device: torch.device
    ) -> Scores:
        grads = calibration_gradients(loaded, calib_ids, device, fisher=self.importance == "hessian")
        blocks = loaded.spec.blocks_of(loaded.model)
        out = []
        for block, per in zip(blocks, groups):
            out.append({kind: self._group(block, gs, grads) for kind, gs in per.items()})
        return out

    def _terms(self, module: nn.Module, param: nn.Parameter, grads) -> torch.Tensor:
        """w·g (``taylor``, ``vector``) or w·g − ½w²F (``hessian``), on the CPU, weight-shaped."""
        grad, fisher = grads[param]
        value = param.detach().float().to(grad.device)
        term = value * grad
        if fisher is not None:
            term = term - 0.5 * value.square() * fisher
        return term.cpu()

    def _group(self, block: nn.Module, group_set: GroupSet, grads) -> torch.Tensor:
        if self.importance != "vector":
            def element(module: nn.Module):
                weight = self._terms(module, module.weight, grads).abs()
                bias = getattr(module, "bias", None)
                return oriented(module, weight), None if bias is None else self._terms(module, bias, grads).abs()

            return group_scores(block, group_set, element, self.config.aggregate)
        per_slot = []
        for slot in group_set.slots:
            module = block.get_submodule(slot.path)
            bias = getattr(module, "bias", None)
            bias_terms = None if bias is None or slot.axis == "in" else self._terms(module, bias, grads)
            signed = slot_sums(oriented(module, self._terms(module, module.weight, grads)), bias_terms, slot)
            per_slot.append(signed.abs())
        return aggregate(per_slot, self.config.aggregate)
