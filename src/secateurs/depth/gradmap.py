"""GradMAP stage 1 (Liu, Li, Zhang, Tang, arXiv 2602.14649): layer importance from gradient magnitudes.

GradMAP as described in the abstract: a global layer-importance metric built from gradient
magnitudes, one backward pass per pruning decision, layers removed one by one with the metric
refreshed on the smaller model. The paper body (equations, hyper-parameters) was not available, so
the unknown details are options, with defaults chosen by measurement on SmolLM2-135M
(benchmarks/layer_pruning.py; the numbers are in benchmarks/sections/layer_pruning.md):

- ``target="gate"`` (default): the gradient of the causal-LM loss on the calibration windows with
  respect to a gate α = 1 scaling the layer's residual update (x + α·(f(x) − x)): how the loss moves
  as the layer is faded out. A layer that is an exact identity scores 0. ``grain`` sets how many
  gates: ``token`` (default, one per position, score Σ_t |∂L/∂α_t|), ``sequence`` or ``batch`` (one
  scalar per batch, |∂L/∂α| summed over batches). Summed over many tokens the signed gradient is a
  first-order estimate whose positive and negative parts cancel; per-token magnitudes do not cancel
  and ranked SmolLM2's layers far closer to their leave-one-out loss (0.92 vs 0.50 Spearman), from
  the same single backward pass. ``reduce`` is ``mean_abs`` (Σ|g|) or ``l2`` (Σg²).
- ``target="weights"``: the magnitude of ∂L/∂W over every linear weight of the layer; ``reduce``
  ``mean_abs`` (mean |g|, normalised by parameter count) or ``l2`` (‖g‖₂). Worse on SmolLM2, and a
  zeroed output projection still has a non-zero gradient, so an identity layer is not ranked last.
- ``per_batch`` (weights): each batch's gradient is reduced as soon as it exists and freed (default), so a
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
from ..evaluate.loss import gradient_pass
from .base import LayerScorer, ScoringContext, gradient_scores

_REDUCE = {"mean_abs": lambda grad, weight: grad.abs().sum(), "l2": lambda grad, weight: grad.pow(2).sum()}
_GRAINS = ("batch", "sequence", "token")


@dataclass
class GradMAPOptions:
    target: str = "gate"
    reduce: str = "mean_abs"
    per_batch: bool = True
    one_shot: bool = False
    grain: str = "token"


def _gate_hook(gates: torch.Tensor, index: int, module: nn.Module, args: tuple, kwargs: dict, output):
    """Replace a block's output y by x + α·(y − x) so that ∂L/∂α exists (α = 1: same values).

    ``gates[index]`` is a scalar (grain batch), one α per sequence, or one per token: the finer
    grains give per-sequence / per-position gradients from the same single backward pass.
    """
    x = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, tuple) else output
    gate = gates[index]
    if gate.dim() == 1:
        gate = gate[: y.shape[0]].view(-1, 1, 1)
    elif gate.dim() == 2:
        gate = gate[: y.shape[0], : y.shape[1]].unsqueeze(-1)
    mixed = x + gate.to(y.dtype) * (y - x)
    return (mixed, *output[1:]) if isinstance(output, tuple) else mixed


class GradMAP(LayerScorer):
    name = "gradmap"
    Options = GradMAPOptions
    needs_gradients = True

    def check(self, ctx: ScoringContext) -> None:
        if self.options.target not in ("weights", "gate"):
            raise UsageError(f"gradmap option target={self.options.target!r}: use weights or gate")
        if self.options.grain not in _GRAINS:
            raise UsageError(f"gradmap option grain={self.options.grain!r}: use {', '.join(_GRAINS)}")
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
        shape = {"batch": (), "sequence": (max(len(b) for b in ctx.batches),),
                 "token": tuple(max(b.shape[i] for b in ctx.batches) for i in (0, 1))}[self.options.grain]
        gates = torch.ones(len(blocks), *shape, device=ctx.device, requires_grad=True)
        reduce = _REDUCE[self.options.reduce]
        per_batch: list[torch.Tensor] = []
        handles = [b.register_forward_hook(partial(_gate_hook, gates, i), with_kwargs=True) for i, b in enumerate(blocks)]

        def keep(_: int, grad: torch.Tensor) -> None:
            grad = grad.detach().double().cpu()
            per_batch.append(grad if self.options.grain == "batch" else torch.stack([reduce(g, None) for g in grad]))

        try:
            gradient_pass(ctx.model, ctx.batches, [gates], keep, ctx.device, f"{self.name}: layer scores (gate gradients)")
            self.passes["forward"] += len(ctx.batches)
            self.passes["backward"] += len(ctx.batches)
        finally:
            for handle in handles:
                handle.remove()
        grads = torch.stack(per_batch)
        if self.options.grain != "batch":
            return grads.sum(0)
        return grads.abs().sum(0) if self.options.per_batch else grads.sum(0).abs()
