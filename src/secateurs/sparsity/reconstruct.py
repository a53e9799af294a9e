"""Block-wise reconstruction after the masks are fixed: train the kept weights of each pruned block
so that it reproduces the dense block's output, and keep the result only where it is better.

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

Two rules make the step safe on any model (issue 35: an absolute Adam learning rate tuned on one
model made every block of another model worse, and the last weights were kept regardless):

- **Never worse.** A share of the calibration batches (``holdout``) is held out from the optimiser.
  The relative block error on them is measured for the method's own result and every ``check``
  steps; the block keeps the best weights seen, and if no step beat the start it stays exactly as
  the method left it. The kept error is re-measured in the block's own dtype and checked to be no
  larger than the start's. With a single calibration batch nothing can be held out: the error on
  the optimiser's own batch chooses instead (said on stderr and in the record).
- **Scale-free steps.** Adam moves every weight by about its learning rate per step whatever the
  weight's size, so ``lr`` here is relative: each weight matrix gets ``lr × rms(W)`` (RMS over its
  kept weights), and ``lr = 0.01`` means "about 1% of the matrix's typical weight per step" on
  every model.

Defaults (``steps=32, lr=0.01, batch=1, holdout=0.25, check=8``), measured on SmolLM2-135M and
Gemma-3-270M at two calibration seeds each with SparseGPT 2:4, 50% and 70% (16 × 512 calibration
tokens; benchmarks/sections/one_shot.md, "Issue 35"): lr 0.01 lowered perplexity against plain
SparseGPT in 11 of 12 model × pattern × seed pairs and left the 12th unchanged; 0.03 and 0.1 were
worse on both models (at 0.1 nearly every block is left as it was, and the one block SmolLM2 kept
at 2:4 doubled its perplexity: a lower held-out block error does not guarantee a lower perplexity,
so the step stays small); 0.003 was better on SmolLM2 at 2:4 and 50% and is not measured on Gemma.
Qwen2.5-Coder-0.5B is not measured. Each step costs about three forward passes of the block over
one window; the held-out checks add ``steps / check + 1`` forward passes over the held-out batches.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..engine.sequential import BlockData
from ..errors import NumericalError, UsageError

STEP_RANGE = (1, 10_000)
LR_RANGE = (1e-6, 1.0)
HOLDOUT_RANGE = (0.0, 0.9)


@dataclass(frozen=True)
class ReconstructOptions:
    """``steps`` Adam steps per block, each over ``batch`` calibration batches (gradients summed),
    at a step of ``lr`` × each weight matrix's RMS; ``holdout``: share of the calibration batches
    kept from the optimiser to choose the weights kept, measured every ``check`` steps."""

    steps: int = 32
    lr: float = 0.01
    batch: int = 1
    holdout: float = 0.25
    check: int = 8

    def validate(self) -> ReconstructOptions:
        if not STEP_RANGE[0] <= self.steps <= STEP_RANGE[1]:
            raise UsageError(f"--reconstruct steps must be in [{STEP_RANGE[0]}, {STEP_RANGE[1]}], got {self.steps}")
        if not LR_RANGE[0] <= self.lr <= LR_RANGE[1]:
            raise UsageError(f"--reconstruct lr must be in [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}] "
                             f"(a step relative to each weight matrix's RMS), got {self.lr:g}")
        if self.batch < 1:
            raise UsageError(f"--reconstruct batch must be ≥ 1 calibration batch per step, got {self.batch}")
        if not HOLDOUT_RANGE[0] <= self.holdout <= HOLDOUT_RANGE[1]:
            raise UsageError(f"--reconstruct holdout must be in [{HOLDOUT_RANGE[0]:g}, {HOLDOUT_RANGE[1]:g}], got {self.holdout:g}")
        if self.check < 1:
            raise UsageError(f"--reconstruct check must be ≥ 1 step between held-out checks, got {self.check}")
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
            kind = int if name in ("steps", "batch", "check") else float
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                raise UsageError(f"--reconstruct {key}={raw!r}: expected {kind.__name__}") from None
            if kind is int and isinstance(raw, float) and raw != value:
                raise UsageError(f"--reconstruct {key}={raw!r}: expected an integer")
            kwargs[name] = value
        return cls(**kwargs).validate()


@dataclass
class BlockOutcome:
    """What reconstruction did to one block. Errors are relative, ‖y − y_dense‖² / ‖y_dense‖².

    ``start``: held-out error of the method's own result; ``kept``: held-out error of the weights
    kept (≤ ``start``); ``step``: the step they come from (0 = the method's result, unchanged);
    ``train_first`` / ``train_last``: the optimiser's batch error at its first and last step;
    ``held_out``: how many calibration batches chose the weights (0 = none could be held out, the
    optimiser's own batches chose); ``stopped``: why training ended early, if it did.
    """

    start: float
    kept: float
    step: int
    train_first: float
    train_last: float
    held_out: int
    stopped: str | None = None

    def to_record(self) -> dict:
        return {k: round(v, 8) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _split(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """(optimiser's batches, held-out batches) of ``n``; with fewer than 2 batches, or ``holdout`` 0,
    the same batches serve both. The held-out ones are the last: calibration windows are random draws."""
    held = min(max(1, round(n * holdout)), n - 1) if holdout > 0 and n >= 2 else 0
    train = list(range(n - held))
    return train, (list(range(n - held, n)) if held else train)


def _relative_error(block: nn.Module, data: BlockData, batches: list[int]) -> float:
    """Σ‖y − y_dense‖² / Σ‖y_dense‖² over ``batches``, in float32."""
    error, power = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            target = data.targets[b].to(data.device, torch.float32)
            error += float((data.output(block, b).float() - target).square().sum())
            power += float(target.square().sum())
    return error / max(power, 1e-30)


def _rms(weight: torch.Tensor, mask: torch.Tensor) -> float:
    """RMS of the kept weights (0-size or all-zero matrices get a tiny positive value)."""
    kept = weight.detach()[mask]
    return max(float(kept.float().square().mean().sqrt()) if kept.numel() else 0.0, 1e-12)


class BlockReconstruction:
    """The reconstruction step the engine runs on each block after its masks are fixed.

    ``outcomes`` records, per block, a :class:`BlockOutcome`; ``errors`` the (start, kept) held-out
    errors, the pair the run record's ``block_steps.reconstruct`` shows.
    """

    def __init__(self, options: ReconstructOptions) -> None:
        self.options = options.validate()
        self.outcomes: dict[int, BlockOutcome] = {}
        self._warned_no_holdout = False

    @property
    def errors(self) -> dict[int, tuple[float, float]]:
        return {i: (o.start, o.kept) for i, o in self.outcomes.items()}

    def __call__(self, index: int, block: nn.Module, linears: dict[str, nn.Module], data: BlockData) -> None:
        train, held = _split(len(data.inputs), self.options.holdout)
        if train is held:
            self._say_no_holdout(len(data.inputs))
        weights = [module.weight for module in linears.values()]
        original = [w.detach().clone() for w in weights]
        start = _relative_error(block, data, held)
        if not math.isfinite(start):
            raise NumericalError(f"block {index}: the pruned block's output is NaN or inf before reconstruction "
                                 "(the method's result or the block's inputs); nothing was saved")
        dtype = next(block.parameters()).dtype
        if dtype != torch.float32:  # Adam's small steps vanish in half precision
            block.float()
        try:
            outcome = self._train(index, block, weights, data, train, held, start if dtype == torch.float32 else None)
        finally:
            if dtype != torch.float32:
                block.to(dtype)
        outcome.start = start
        outcome.kept = _relative_error(block, data, held) if outcome.step else start
        if not outcome.kept <= start:  # e.g. half-precision rounding of the trained weights undid the gain
            with torch.no_grad():
                for weight, saved in zip(weights, original, strict=True):
                    weight.copy_(saved)
            outcome.step, outcome.kept = 0, start
        assert outcome.kept <= start, f"block {index}: reconstruction kept a worse held-out error"
        self.outcomes[index] = outcome

    def _train(self, index: int, block: nn.Module, weights: list[nn.Parameter], data: BlockData,
               train: list[int], held: list[int], start: float | None) -> BlockOutcome:
        """Adam on the kept weights; returns with the block holding the best weights seen on ``held``.
        ``start``: the held-out error of the weights as they are (None: measure it, in float32)."""
        opts = self.options
        masks = [w.detach().ne(0) for w in weights]
        best_weights = [w.detach().clone() for w in weights]
        best, best_step = start if start is not None else _relative_error(block, data, held), 0
        frozen = {p: p.requires_grad for p in block.parameters()}
        block.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        groups = [{"params": [w], "lr": opts.lr * _rms(w, m)} for w, m in zip(weights, masks, strict=True)]
        optimizer = torch.optim.Adam(groups)
        order = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(index)).tolist()]
        outcome = BlockOutcome(best, best, 0, math.nan, math.nan, len(held) if held is not train else 0)
        cursor = 0
        try:
            with torch.enable_grad():
                for step in range(1, opts.steps + 1):
                    optimizer.zero_grad(set_to_none=False)
                    error, power = 0.0, 0.0
                    for _ in range(opts.batch):
                        b = order[cursor % len(order)]
                        cursor += 1
                        target = data.targets[b].to(data.device, torch.float32)
                        diff = data.output(block, b).float() - target
                        (diff.square().mean() / opts.batch).backward()
                        error += float(diff.detach().square().sum())
                        power += float(target.square().sum())
                    relative = error / max(power, 1e-30)
                    if not math.isfinite(relative) or any(not torch.isfinite(w.grad).all() for w in weights):
                        outcome.stopped = f"loss or gradient NaN/inf at step {step}"
                        break
                    if step == 1:
                        outcome.train_first = relative
                    outcome.train_last = relative
                    for weight, mask in zip(weights, masks, strict=True):
                        weight.grad.mul_(mask)
                    optimizer.step()
                    with torch.no_grad():
                        for weight, mask in zip(weights, masks, strict=True):
                            weight.mul_(mask)
                    if step % opts.check == 0 or step == opts.steps:
                        error = _relative_error(block, data, held)
                        if error < best:
                            best, best_step = error, step
                            for saved, weight in zip(best_weights, weights, strict=True):
                                saved.copy_(weight.detach())
        finally:
            with torch.no_grad():
                for weight, saved in zip(weights, best_weights, strict=True):
                    weight.copy_(saved)
            for parameter, flag in frozen.items():
                parameter.requires_grad_(flag)
                parameter.grad = None
        outcome.step, outcome.kept = best_step, best
        return outcome

    def _say_no_holdout(self, n: int) -> None:
        if not self._warned_no_holdout:
            reason = "--reconstruct holdout=0" if self.options.holdout == 0 else f"{n} calibration batch"
            print(f"secateurs: {reason}: no batch is held out, so the optimiser's own batches choose the weights "
                  "each block keeps (they may overfit; use ≥ 2 calibration batches)", file=sys.stderr)
            self._warned_no_holdout = True

    def summary(self) -> str | None:
        """One line naming the blocks where no step beat the method's own result, or None."""
        skipped = sorted(i for i, o in self.outcomes.items() if o.step == 0)
        if not skipped:
            return None
        which = "every block" if len(skipped) == len(self.outcomes) else "blocks " + ", ".join(map(str, skipped))
        return (f"secateurs: reconstruction skipped for {which} ({len(skipped)} of {len(self.outcomes)}): no step "
                f"lowered the held-out block error, so they keep the method's weights (try a smaller --reconstruct lr, "
                f"now {self.options.lr:g})")
