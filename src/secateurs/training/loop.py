"""The one training loop: LoRA recovery, LoRAPrune, iterative pruning's recoveries and both phases of
LLM-Shearing (mask learning, continued pretraining) all run :func:`train`.

What differs between them is passed in, never copied:

* the trained parameters, by name (LoRA adapters, or every weight of a sheared model);
* a :class:`Batches` source: seeded random windows of one text (:class:`SeededWindows`), or
  domains drawn by weights that move during training (:mod:`secateurs.structured.shearing.dynamic_batch`);
* a :class:`TrainPlan`: steps, learning rate and its schedule, gradient accumulation, clipping,
  precision, activation checkpointing, and where and how often to checkpoint;
* a :class:`TrainHook`: what a method adds to each step (LoRAPrune's importance and pruning after
  backward; shearing's mask sampling, Lagrangian loss, mask optimiser and size on the progress bar).

One optimizer step is: the hook's ``begin_step``; ``grad_accum`` micro-batches of LM loss (plus the
hook's ``loss``) and backward; unscale (fp16), clip, the hook's ``after_backward``; AdamW and the
hook's optimizers step; the schedule steps. With an :class:`Objective` (distillation: :mod:`.distill`)
the micro-batch's objective is its loss (KD from the teacher, optionally mixed with the LM loss)
instead of the LM loss; without one the step is exactly what it was before distillation existed.
A :class:`HeldOut` set gives a held-out loss curve (loss against tokens seen). Checkpoints
(``checkpoint.py``: safetensors + JSON, never pickle, written atomically) hold the trained
parameters, optimizer, schedule, grad scaler, hook and batch-source state, the step and the losses
(and the curves), under a digest of everything that changes the result;
a run resumed from one ends where the uninterrupted run ends. The loop leaves the model where it
found it (device, ``requires_grad``, eval mode).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.calib import random_windows
from ..errors import NumericalError
from ..evaluate.loss import mean_loss
from ..progress import meter
from .checkpoint import check_progress, check_state, damaged, load_checkpoint, restoring, save_checkpoint

Evaluate = Callable[[list[torch.Tensor]], torch.Tensor]
"""``evaluate(window_sets)``: the model's mean loss on each set of (n, seq_len) windows, in eval mode."""


@dataclass
class TrainPlan:
    """How the loop trains. ``schedule(step)`` multiplies ``lr``; it is not part of the checkpoint
    digest, so the caller's fingerprint must name what shapes it (warm-up, decay)."""

    steps: int
    lr: float
    schedule: Callable[[int], float]
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    checkpoint: Path | None = None
    save_every: int = 50

    def fingerprint(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("schedule", "checkpoint", "save_every")}


class TrainHook:
    """What a method adds to plain LM training; the default adds nothing.

    ``begin_step`` runs before the step's first forward; ``loss`` (inside autocast, per micro-batch)
    is added to the LM loss; ``after_backward`` sees the step's gradients (unscaled, clipped) before
    any optimizer steps; ``optimizers`` step with the model's; ``status`` goes on the progress bar;
    ``eval_mode`` is the context of held-out evaluations. ``state_dict`` / ``load_state_dict`` travel
    in the checkpoint; ``fingerprint`` must match on resume.
    """

    def begin_step(self, step: int) -> None:
        """Prepare optimizer step ``step`` (0-based)."""

    def loss(self, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, step: int) -> None:
        """Called once per optimizer step, after backward and clipping."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def status(self) -> str:
        return ""

    def eval_mode(self) -> AbstractContextManager:
        return nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def fingerprint(self) -> dict:
        return {}


class Objective:
    """A loss that replaces the LM loss as what each micro-batch minimises (distillation,
    :class:`secateurs.training.distill.Distillation`). ``start`` runs before the model moves to the
    device and before the first step (``windows``: the micro-batches of the whole run), ``loss`` per
    micro-batch inside autocast, ``finish`` after the run, even a failed one; ``fingerprint`` joins
    the checkpoint digest."""

    def start(self, model: nn.Module, batches: Batches, windows: int, device: torch.device) -> None:
        """Ready what the loss needs on ``device``."""

    def loss(self, batch: torch.Tensor, logits: torch.Tensor, lm: torch.Tensor, index: int) -> torch.Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        """Undo ``start``."""

    def fingerprint(self) -> dict:
        return {}


class Batches:
    """Where the loop's token batches come from, and the randomness of each step.

    ``start`` runs once inside the loop's forked RNG, before step ``start``; ``begin_step`` may
    re-weight the source from held-out losses; ``next(index)`` is micro-batch ``index`` (counted over
    the whole run: ``step × grad_accum + micro``). ``summary`` gives :class:`TrainLog` fields it fills.
    """

    batch_size: int
    seq_len: int
    fixed: bool = False
    """Whether ``next(index)`` is a function of ``index`` alone (what a top-k teacher cache needs)."""

    def start(self, step: int) -> None:
        """Seed what the run needs before its first (or resumed) step."""

    def begin_step(self, step: int, evaluate: Evaluate) -> None:
        """Called before each optimizer step."""

    def next(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def fingerprint(self) -> dict:
        return {}


class SeededWindows(Batches):
    """Random windows of one token stream; micro-batch ``index`` and its dropout are seeded by
    (seed, index) alone, so a resumed run draws exactly what the uninterrupted one would."""

    fixed = True

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int, name: str) -> None:
        self.ids, self.batch_size, self.seq_len, self.seed, self.name = ids, batch_size, seq_len, seed, name

    def next(self, index: int) -> torch.Tensor:
        batch = random_windows(self.ids, self.batch_size, self.seq_len, self.seed * 1_000_003 + index, self.name)
        torch.manual_seed(self.seed * 7_919 + index)
        return batch


@dataclass
class HeldOut:
    """Held-out windows (n, seq_len), never drawn from the training text, whose mean loss is measured
    before the first step and every ``every`` steps (and after the last): the run's held-out curve."""

    windows: torch.Tensor
    every: int


@dataclass
class TrainLog:
    """What the loop did: steps in total, where it resumed, tokens, the loss of every step, time and
    precision; with dynamic batch loading also the domain weights over time and tokens per domain;
    with distillation the LM loss of every step beside the objective's (``losses``); with a held-out
    set its curve as [tokens seen, loss] pairs."""

    steps: int
    resumed_from: int
    tokens: int
    losses: list[float]
    seconds: float
    precision: str
    domain_weights: list[list[float]] | None = None
    domain_tokens: dict[str, int] | None = None
    lm_losses: list[float] | None = None
    held_out: list[list[float]] | None = None

    def to_dict(self) -> dict:
        """The stage record's view: the last ten steps' mean loss instead of every step's."""
        record = {k: v for k, v in asdict(self).items() if k not in ("losses", "lm_losses") and v is not None}
        record["final_loss"] = _tail_mean(self.losses)
        if self.lm_losses is not None:
            record["final_lm_loss"] = _tail_mean(self.lm_losses)
        return record


def _tail_mean(losses: list[float], window: int = 10) -> float | None:
    return sum(losses[-window:]) / len(losses[-window:]) if losses else None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA (fp16 where bf16 is unsupported), float32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def enable_checkpointing(model: nn.Module, on: bool = True) -> None:
    """Turn activation checkpointing on or off under either name: transformers 5.2x renamed
    ``gradient_checkpointing_*`` (kept as deprecated aliases) to ``activation_checkpointing_*``, and
    5.17 (still common on GPU images) has only the old names."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def digest(fingerprint: dict) -> str:
    """A stable hash of settings (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def _transformer(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (activation checkpointing is its switch)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_rates(
    plan: TrainPlan,
    step: int,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    base_rates: list[float],
    hook_optimizers: list[torch.optim.Optimizer],
    hook_rates: list[list[float]],
) -> None:
    """After a restore, the learning rates are the run's: the schedule's base rates and position,
    the rate it gives at ``step``, and the hook's optimizers' rates as they were before."""
    expected = [base * plan.schedule(step) for base in base_rates]
    current = [group["lr"] for group in scheduler.optimizer.param_groups]
    if scheduler.base_lrs != base_rates or scheduler.last_epoch != step or current != expected:
        raise damaged(plan.checkpoint, f"its learning rate {current} is not the run's {expected} at step {step}")
    if [[group["lr"] for group in opt.param_groups] for opt in hook_optimizers] != hook_rates:
        raise damaged(plan.checkpoint, "a learning rate of its hook's optimizers is not the run's")


def train(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Batches,
    plan: TrainPlan,
    device: torch.device,
    hook: TrainHook | None = None,
    fingerprint: dict | None = None,
    description: str = "train",
    distill: Objective | None = None,
    held_out: HeldOut | None = None,
) -> TrainLog:
    """Train ``params`` (named, in ``model.named_parameters()`` order) for ``plan.steps`` optimizer steps.

    With ``plan.checkpoint`` the state is saved every ``plan.save_every`` steps and at the end, and
    a checkpoint there is resumed from if its digest (``fingerprint``, the plan, the hook's and the
    batches' fingerprints) matches; one that does not is a one-line error. ``distill`` makes each
    micro-batch's objective its distillation loss; ``held_out`` records a held-out curve.
    """
    hook = hook or TrainHook()
    names, trained = list(params), list(params.values())
    home = next(model.parameters()).device
    was_trainable = [p.requires_grad for p in trained]
    if distill is not None:  # before the student moves: a top-k cache is built with the teacher alone there
        distill.start(model, batches, plan.steps * plan.grad_accum, device)
    model.to(device)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=plan.lr, weight_decay=plan.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.schedule)
    precision = resolve_precision(plan.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision in ("bf16", "fp16")
        else nullcontext()
    )
    identity = {"plan": plan.fingerprint(), "hook": hook.fingerprint(), "batches": batches.fingerprint(),
                "run": fingerprint or {}}
    if distill is not None:
        identity["distill"] = distill.fingerprint()
    if held_out is not None:
        identity["held_out"] = {"every": held_out.every, "windows": list(held_out.windows.shape)}
    key = digest(identity)
    start, losses = 0, []
    # Curves beside the loss, present only when asked for (a teacher-free checkpoint is as before).
    curves: dict[str, list] = {}
    if distill is not None:
        curves["lm"] = []
    if held_out is not None:
        curves["held_out"] = []

    def snapshot(step: int) -> dict:
        """The state a checkpoint holds: what a resumed run needs to end where this one would."""
        return {
            "digest": key,
            "step": step,
            "losses": losses,
            "params": {name: p.detach() for name, p in zip(names, trained)},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "hook": hook.state_dict(),
            "batches": batches.state_dict(),
            **({"curves": curves} if curves else {}),
        }

    state = load_checkpoint(plan.checkpoint, key) if plan.checkpoint else None
    if state is not None:
        start, losses = check_progress(plan.checkpoint, state, plan.steps)
        check_state(plan.checkpoint, state, snapshot(start), [optimizer, *hook.optimizers()], start)
        rates = [[group["lr"] for group in opt.param_groups] for opt in hook.optimizers()]
        base_rates = list(scheduler.base_lrs)
        with restoring(plan.checkpoint), torch.no_grad():
            for name, p in zip(names, trained):
                p.copy_(state["params"][name])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            hook.load_state_dict(state["hook"])
            batches.load_state_dict(state["batches"])
            curves = {name: [list(map(float, point)) if isinstance(point, (list, tuple)) else float(point)
                             for point in state["curves"][name]] for name in curves}
        _check_rates(plan, start, scheduler, base_rates, hook.optimizers(), rates)

    def evaluate(window_sets: list[torch.Tensor]) -> torch.Tensor:
        model.eval()
        with hook.eval_mode():
            means = [mean_loss(model, windows.split(1), device, autocast) for windows in window_sets]
        return torch.tensor(means, dtype=torch.float64)

    def measure_held_out(step: int) -> None:
        tokens = step * plan.grad_accum * batches.batch_size * batches.seq_len
        curves["held_out"].append([float(tokens), float(evaluate([held_out.windows])[0])])

    if plan.gradient_checkpointing:
        enable_checkpointing(_transformer(model))
    clock = time.perf_counter()
    shows_status = type(hook).status is not TrainHook.status
    bar = meter(description, plan.steps, completed=start, loss="-", **({"status": ""} if shows_status else {}))
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bar as update:
            batches.start(start)
            if held_out is not None and start == 0:
                measure_held_out(0)
            for step in range(start, plan.steps):
                batches.begin_step(step, evaluate)
                model.train()
                hook.begin_step(step)
                total = lm_total = 0.0
                for micro in range(plan.grad_accum):
                    index = step * plan.grad_accum + micro
                    batch = batches.next(index).to(device)
                    with autocast:
                        output = model(input_ids=batch, labels=batch, use_cache=False)
                        lm = output.loss
                        objective = lm if distill is None else distill.loss(batch, output.logits, lm, index)
                        added = hook.loss(step)
                    if not torch.isfinite(objective):
                        raise NumericalError(f"the training loss became {objective.item()} at step {step}; lower --lr")
                    loss = objective if added is None else objective + added
                    scaler.scale(loss / plan.grad_accum).backward()
                    total += objective.item() / plan.grad_accum
                    lm_total += lm.item() / plan.grad_accum
                scaler.unscale_(optimizer)
                if plan.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trained, plan.max_grad_norm)
                hook.after_backward(step)
                for opt in (optimizer, *hook.optimizers()):
                    scaler.step(opt)
                    opt.zero_grad(set_to_none=True)
                scaler.update()
                scheduler.step()
                losses.append(total)
                if distill is not None:
                    curves["lm"].append(lm_total)
                if held_out is not None and ((step + 1) % held_out.every == 0 or step + 1 == plan.steps):
                    measure_held_out(step + 1)
                update(step + 1, loss=f"{total:.4f}", **({"status": hook.status()} if shows_status else {}))
                if plan.checkpoint and ((step + 1) % plan.save_every == 0 or step + 1 == plan.steps):
                    save_checkpoint(plan.checkpoint, snapshot(step + 1))
    finally:
        model.eval()
        if distill is not None:
            distill.finish()
        if plan.gradient_checkpointing:
            enable_checkpointing(_transformer(model), on=False)
        optimizer.zero_grad(set_to_none=True)
        for p, trainable in zip(trained, was_trainable):
            p.requires_grad_(trainable)
        model.to(home)
    tokens = plan.steps * plan.grad_accum * batches.batch_size * batches.seq_len
    return TrainLog(plan.steps, start, tokens, losses, time.perf_counter() - clock, precision, **batches.summary(),
                    lm_losses=curves.get("lm"), held_out=curves.get("held_out"))
