"""GradMAP stage 1 (Liu, Li, Zhang, Tang, arXiv 2602.14649): layer importance from gradient magnitudes.

GradMAP as described in the abstract: a global layer-importance metric built from gradient
magnitudes, one backward pass per pruning decision, layers removed one by one with the metric
refreshed on the smaller model. The paper body (equations, hyper-parameters) was not available, so
the unknown details are options. Their defaults are our readings of the abstract, not yet confirmed
by measurement: benchmarks/layer_pruning.py compares them on SmolLM2-135M (see
benchmarks/sections/layer_pruning.md for what has been measured):

- ``target="weights"``: the magnitude of ∂L/∂W over every linear weight of the layer, for the
  causal-LM loss on the calibration windows; ``reduce`` is ``mean_abs`` (mean |g|, which normalises
  by parameter count) or ``l2`` (‖g‖₂). ``target="gate"``: |∂L/∂α| for a scalar α = 1 scaling the
  layer's residual update (x + α·(f(x) − x)), the gradient that says how the loss moves as the layer
  is faded out; a layer that is an exact identity scores 0 (default: under ``weights`` a zeroed
  output projection still has a non-zero gradient, so an identity layer is not ranked last).
- ``per_batch``: each batch's gradient is reduced as soon as it exists and freed (default), so a
  7B model's gradient is never held whole.
- Lower score = removed first; ``one_shot=True`` ranks once instead of refreshing after each removal.

Stage 2 (projection compensation) is :mod:`secateurs.depth.compensation`, usable with any criterion.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import UsageError
from .base import LayerScorer, ScoringContext, causal_lm_loss, gradient_scores

_REDUCE = {"mean_abs": lambda grad, weight: grad.abs().sum(), "l2": lambda grad, weight: grad.pow(2).sum()}


@dataclass
class GradMAPOptions:
    target: str = "gate"
    reduce: str = "mean_abs"
    per_batch: bool = True
    one_shot: bool = False


def _gate_hook(gates: torch.Tensor, index: int, module: nn.Module, args: tuple, kwargs: dict, output):
    """Replace a block's output y by x + α·(y − x) so that ∂L/∂α exists (α = 1: same values)."""
    x = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, tuple) else output
    mixed = x + gates[index].to(y.dtype) * (y - x)
    return (mixed, *output[1:]) if isinstance(output, tuple) else mixed


class GradMAP(LayerScorer):
    name = "gradmap"
    Options = GradMAPOptions
    needs_gradients = True

    def check(self, ctx: ScoringContext) -> None:
        if self.options.target not in ("weights", "gate"):
            raise UsageError(f"gradmap option target={self.options.target!r}: use weights or gate")
        if self.options.reduce not in _REDUCE:
            raise UsageError(f"gradmap option reduce={self.options.reduce!r}: use {' or '.join(_REDUCE)}")
        super().check(ctx)

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        if self.options.target == "gate":
            return self._gate_scores(ctx)
        raw = gradient_scores(ctx, self, _REDUCE[self.options.reduce], self.options.per_batch)
        if self.options.reduce == "l2":
            return raw.sqrt()
        sizes = [
            sum(lin.weight.numel() for lin in ctx.spec.linears(block).values())
            for block in ctx.spec.blocks_of(ctx.model)
        ]
        return raw / torch.tensor(sizes, dtype=torch.float64)

    def _gate_scores(self, ctx: ScoringContext) -> torch.Tensor:
        blocks = ctx.spec.blocks_of(ctx.model)
        gates = torch.ones(len(blocks), device=ctx.device, requires_grad=True)
        per_batch: list[torch.Tensor] = []
        handles = [b.register_forward_hook(partial(_gate_hook, gates, i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            for batch in ctx.batches:
                causal_lm_loss(ctx.model, batch).backward()
                self.passes["forward"] += 1
                self.passes["backward"] += 1
                per_batch.append(gates.grad.detach().double().cpu())
                gates.grad = None
        finally:
            for handle in handles:
                handle.remove()
        grads = torch.stack(per_batch)
        return grads.abs().sum(0) if self.options.per_batch else grads.sum(0).abs()
