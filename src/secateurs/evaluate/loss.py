"""The language-modelling loss on calibration or held-out windows: one batch, the mean over windows,
and its gradients. Every criterion that scores by loss (layer perplexity, ATP's spread search,
dynamic batch loading's held-out losses) and every criterion that scores by gradient (LLM-Pruner,
layer Taylor / GradMAP) goes through these, so they all measure the same quantity the same way.

This is ``model(labels=...).loss`` (transformers' mean next-token cross-entropy of a batch).
:func:`secateurs.evaluate.perplexity.perplexity` keeps its own per-token reduction: it reports
every window's loss, and a different summation order would move published perplexities in the
last digits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

from ..errors import NumericalError
from ..progress import track


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one (batch, seq_len) batch of ids (the quantity perplexity exponentiates)."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    autocast: ContextManager | None = None,
) -> float:
    """Mean loss per window over ``batches`` (each (rows, seq_len), moved to ``device``; the model
    must already be there). Each batch's loss weighs by its rows; no windows gives 0.0."""
    total, rows = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast or nullcontext():
            total += lm_loss(model, batch).item() * batch.shape[0]
        rows += batch.shape[0]
    return total / max(rows, 1)


def gradient_pass(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    params: Sequence[torch.Tensor],
    on_grad: Callable[[int, torch.Tensor], None],
    device: torch.device,
    description: str = "gradients",
) -> None:
    """One backward of the loss of each batch; ``on_grad(i, grad)`` receives ``params[i]``'s gradient
    of that batch as soon as autograd has accumulated it, which is then freed.

    Reducing each gradient the moment it exists means memory never holds a gradient of the whole
    model unless ``on_grad`` keeps one. ``params`` (leaf tensors: weights, or a gate the caller put
    into the forward) are made trainable for the pass and restored afterwards; nothing else gets a
    gradient. A non-finite loss is an error: its gradients would rank by noise.
    """
    was_trainable = [p.requires_grad for p in params]
    handles = []

    def hand_over(i: int, param: torch.Tensor) -> None:
        on_grad(i, param.grad)
        param.grad = None

    for i, param in enumerate(params):
        param.requires_grad_(True)
        handles.append(param.register_post_accumulate_grad_hook(lambda p, i=i: hand_over(i, p)))
    try:
        for batch in track(batches, description):
            batch = batch.to(device)
            loss = lm_loss(model, batch)
            if not torch.isfinite(loss):
                raise NumericalError("the calibration loss is NaN or inf; check the model and data")
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for param, trainable in zip(params, was_trainable):
            param.grad = None
            param.requires_grad_(trainable)
