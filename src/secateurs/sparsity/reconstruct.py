"""Block-wise reconstruction after the masks are fixed: train the kept weights of each pruned block
so that it reproduces the dense block's output.

Wanda++'s regional optimisation (Yang et al., 2025) and "A Free Lunch in LLM Compression" (Wagner,
Roux, Zimmer, Pokutta, arXiv 2510.14444) show that a few optimiser steps per block on the
calibration activations recover much of what one-shot pruning loses, whatever chose the mask; the
latter finds the result insensitive to the window size as long as it holds a non-linearity, so the
window here is the whole decoder block (the unit the shared engine already holds).

For block *i* the inputs are the pruned model's own propagated activations (what blocks 0..i−1,
pruned and reconstructed, produce) and the target is the dense block *i* applied to those same
inputs: the output the engine's statistics pass computes before the method edits the block. Adam
minimises the mean squared error over the calibration batches; every gradient is multiplied by the
mask and the weights by the mask after every step, so pruned weights stay exactly zero and no mask
ever changes. Only the prunable linears' weights are trained (biases and norms stay as they are).

Defaults (``steps``, ``lr``, ``batch``) were chosen by measurement on SmolLM2-135M
(benchmarks/sections/one_shot.md): with Wanda 2:4 and 8 × 512 calibration tokens, 16 steps of one
window took WikiText-2 perplexity from 186.8 to 145.5 at lr 1e-4, 115.0 at 3e-4 and 96.0 at 1e-3.
32 steps of one window is one pass over the issue's 32 × 512 calibration set: each step costs about
three forward passes of the block over one window, so the step adds about 1.5× the two engine passes
(statistics, propagation) every method already pays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..engine.sequential import BlockData
from ..errors import NumericalError, UsageError

STEP_RANGE = (1, 10_000)
LR_RANGE = (1e-7, 1e-1)


@dataclass(frozen=True)
class ReconstructOptions:
    """``steps`` Adam steps per block, each over ``batch`` calibration batches (gradients summed)."""

    steps: int = 32
    lr: float = 1e-3
    batch: int = 1

    def validate(self) -> ReconstructOptions:
        if not STEP_RANGE[0] <= self.steps <= STEP_RANGE[1]:
            raise UsageError(f"--reconstruct steps must be in [{STEP_RANGE[0]}, {STEP_RANGE[1]}], got {self.steps}")
        if not LR_RANGE[0] <= self.lr <= LR_RANGE[1]:
            raise UsageError(f"--reconstruct lr must be in [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}], got {self.lr:g}")
        if self.batch < 1:
            raise UsageError(f"--reconstruct batch must be ≥ 1 calibration batch per step, got {self.batch}")
        return self

    @classmethod
    def build(cls, values: dict) -> ReconstructOptions:
        """From a ``{key: value}`` mapping (strings from the CLI, numbers from Python), validated."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise UsageError(f"unknown --reconstruct option {key!r}; known: {', '.join(known)}")
            kind = int if name in ("steps", "batch") else float
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                raise UsageError(f"--reconstruct {key}={raw!r}: expected {kind.__name__}") from None
            if kind is int and isinstance(raw, float) and raw != value:
                raise UsageError(f"--reconstruct {key}={raw!r}: expected an integer")
            kwargs[name] = value
        return cls(**kwargs).validate()


def parse_reconstruct(text: str | None) -> dict[str, str] | None:
    """``--reconstruct``: ``off`` (or absent), ``on`` (the defaults), or ``steps=N,lr=X,batch=B``."""
    if text is None or text.strip().lower() in ("", "off", "false", "no"):
        return None
    if text.strip().lower() in ("on", "true", "yes", "default"):
        return {}
    values = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--reconstruct {text!r}: use on, off, or key=value pairs like steps=32,lr=1e-4")
        values[key.strip()] = value.strip()
    return values


class BlockReconstruction:
    """The reconstruction step the engine runs on each block after its masks are fixed.

    ``errors`` records, per block, the relative squared error ‖y − y_dense‖² / ‖y_dense‖² of the
    first step (the pruned block as the method left it) and of the last step.
    """

    def __init__(self, options: ReconstructOptions) -> None:
        self.options = options.validate()
        self.errors: dict[int, tuple[float, float]] = {}

    def __call__(self, index: int, block: nn.Module, linears: dict[str, nn.Module], data: BlockData) -> None:
        opts = self.options
        dtype = next(block.parameters()).dtype
        if dtype != torch.float32:  # Adam's small steps vanish in half precision
            block.float()
        weights = [module.weight for module in linears.values()]
        masks = [w.detach().ne(0) for w in weights]
        frozen = {p: p.requires_grad for p in block.parameters()}
        block.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        optimizer = torch.optim.Adam(weights, lr=opts.lr)
        order = torch.randperm(len(data.inputs), generator=torch.Generator().manual_seed(index)).tolist()
        cursor, first, last = 0, 0.0, 0.0
        try:
            with torch.enable_grad():
                for step in range(opts.steps):
                    optimizer.zero_grad(set_to_none=False)
                    error, power = 0.0, 0.0
                    for _ in range(opts.batch):
                        b = order[cursor % len(order)]
                        cursor += 1
                        target = data.targets[b].to(data.device, torch.float32)
                        diff = data.output(block, b).float() - target
                        loss = diff.square().mean() / opts.batch
                        loss.backward()
                        error += float(diff.detach().square().sum())
                        power += float(target.square().sum())
                    relative = error / max(power, 1e-30)
                    if not math.isfinite(relative) or any(not torch.isfinite(w.grad).all() for w in weights):
                        raise NumericalError(
                            f"block {index}: the reconstruction loss became NaN or inf at step {step + 1}; "
                            f"lower --reconstruct lr (now {opts.lr:g})"
                        )
                    if step == 0:
                        first = relative
                    last = relative
                    for weight, mask in zip(weights, masks, strict=True):
                        weight.grad.mul_(mask)
                    optimizer.step()
                    with torch.no_grad():
                        for weight, mask in zip(weights, masks, strict=True):
                            weight.mul_(mask)
        finally:
            for parameter, flag in frozen.items():
                parameter.requires_grad_(flag)
                parameter.grad = None
            if dtype != torch.float32:
                block.to(dtype)
        self.errors[index] = (first, last)
