"""Continued pretraining with dynamic batch loading (Xia et al., "Sheared LLaMA", ICLR 2024, §2.2).

A pruned model does not lose the same amount on every kind of text, so training on the original data
mix wastes tokens on domains that already recovered. Dynamic batch loading keeps one weight per data
domain, draws each training sequence's domain from those weights, and every ``update_every`` steps
measures the model's loss on each domain's held-out windows and moves weight toward the domains whose
loss is furthest above a reference loss (the paper's Algorithm 1, a DoReMi-style exponentiated update):

    excess_i = max(loss_i - reference_i, 0);  alpha_i = w_i * exp(excess_i);
    w_i <- (1 - c) * alpha_i / sum(alpha) + c / k,   c = 1e-4

The paper's reference losses come from scaling-law fits of the target size; without such a fit the
default here is the source model's own loss on the same held-out windows (a user who has better
references passes them). With one domain the weights stay ``[1.0]`` and this is ordinary training.

:func:`train` is the loop both shearing phases share (mask learning and continued pretraining): AdamW,
linear warm-up then cosine decay, optional bf16 autocast and gradient checkpointing, resumable
atomic checkpoints, and a progress bar with the loss and whatever the caller's :class:`TrainExtra`
reports (the expected size while masks are learned).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.calib import tokenize
from ..data.sources import load_text
from ..errors import NumericalError, UsageError
from ..progress import meter
from .checkpoint import load_checkpoint, restoring, save_checkpoint

SMOOTHING = 1e-4  # the paper's c (following DoReMi)


def update_weights(
    weights: torch.Tensor, losses: torch.Tensor, reference: torch.Tensor, smoothing: float = SMOOTHING
) -> torch.Tensor:
    """One dynamic-batch-loading update: more weight to domains with a larger excess loss."""
    excess = (losses - reference).clamp(min=0.0)
    alpha = weights * torch.exp(excess)
    alpha = alpha / alpha.sum()
    return (1 - smoothing) * alpha + smoothing / len(weights)


@dataclass
class Domains:
    """Token streams of several data domains, held-out windows of each, and their current weights."""

    names: list[str]
    train: list[torch.Tensor]
    held_out: list[torch.Tensor]
    weights: torch.Tensor
    reference: torch.Tensor | None = None
    history: list[list[float]] = field(default_factory=list)

    @classmethod
    def load(
        cls,
        names: list[str],
        tokenizer,
        seq_len: int,
        eval_windows: int,
        data_dir: str | None = None,
        weights: list[float] | None = None,
    ) -> Domains:
        """Tokenize each domain's training text; its last ``eval_windows`` windows are held out.

        Starts from ``weights`` (default: equal, as the paper starts from the source mix it has no
        better guess for).
        """
        if not names:
            raise UsageError("--data needs at least one dataset, e.g. wikitext2 or wikitext2,ptb")
        if len(set(names)) != len(names):
            raise UsageError(f"--data names a dataset twice ({','.join(names)}); list each domain once")
        train, held_out = [], []
        for name in names:
            ids = tokenize(tokenizer, load_text(name, "train", data_dir))
            cut = ids.numel() - eval_windows * seq_len
            if cut < seq_len + 1:
                raise UsageError(
                    f"{name} has {ids.numel()} tokens, too few for {eval_windows} held-out windows of "
                    f"{seq_len} plus training; use a shorter --seq-len or fewer --eval-windows"
                )
            train.append(ids[:cut])
            held_out.append(ids[cut:].reshape(eval_windows, seq_len) if eval_windows else ids[:0].reshape(0, seq_len))
        start = torch.full((len(names),), 1.0 / len(names)) if weights is None else torch.tensor(weights, dtype=torch.float64)
        if len(start) != len(names) or bool((start < 0).any()) or float(start.sum()) <= 0:
            raise UsageError(f"--domain-weights needs {len(names)} non-negative numbers, not all zero")
        return cls(list(names), train, held_out, (start / start.sum()).double())

    @property
    def dynamic(self) -> bool:
        return len(self.names) > 1

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of windows, each from a domain drawn by the current weights; returns (ids, domains)."""
        domains = torch.multinomial(self.weights.float(), batch_size, replacement=True, generator=generator)
        rows = []
        for d in domains.tolist():
            ids = self.train[d]
            start = int(torch.randint(0, ids.numel() - seq_len, (1,), generator=generator))
            rows.append(ids[start : start + seq_len])
        return torch.stack(rows), domains

    def update(self, losses: torch.Tensor) -> None:
        """Apply one update from the domains' held-out losses; the first call without a reference
        takes these losses as the reference."""
        losses = losses.double()
        if self.reference is None:
            self.reference = losses.clone()
        self.weights = update_weights(self.weights, losses, self.reference)
        self.history.append([round(float(w), 6) for w in self.weights])

    def state_dict(self) -> dict:
        return {"weights": self.weights, "reference": self.reference, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.reference, self.history = state["weights"], state["reference"], list(state["history"])


@torch.no_grad()
def held_out_losses(model: nn.Module, domains: Domains, device: torch.device, autocast=None) -> torch.Tensor:
    """Mean next-token loss of ``model`` on each domain's held-out windows (the model moves to ``device``)."""
    model.to(device)
    losses = []
    for windows in domains.held_out:
        total = 0.0
        for row in windows:
            batch = row[None].to(device)
            with autocast or nullcontext():
                total += float(model(input_ids=batch, labels=batch, use_cache=False).loss)
        losses.append(total / max(len(windows), 1))
    return torch.tensor(losses, dtype=torch.float64)


@dataclass
class TrainSettings:
    """One training phase. Defaults follow Sheared-LLaMA's pruning run (lr 1e-4, 10% warm-up,
    domain weights updated every 50 steps); the paper's batch is 32 x 4096 tokens, ours is small
    by default because it has to fit a CPU."""

    steps: int
    lr: float = 1e-4
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    batch_size: int = 4
    seq_len: int = 512
    update_every: int = 50
    bf16: bool = False
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100

    def validate(self) -> None:
        if self.steps < 0:
            raise UsageError(f"--steps must be at least 0, got {self.steps}")
        if self.batch_size < 1 or self.seq_len < 2:
            raise UsageError("--batch-size must be at least 1 and --seq-len at least 2")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr:g}")
        if self.update_every < 1 or self.checkpoint_every < 1:
            raise UsageError("--update-every and --checkpoint-every must be at least 1")

    def factor(self, step: int) -> float:
        """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_lr_ratio``."""
        warm = max(1, round(self.warmup * self.steps))
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainExtra:
    """What a phase adds to plain LM training (shearing's masks); the default adds nothing.

    ``begin_step`` runs before each forward, ``loss`` is added to the LM loss, ``after_backward`` may
    change gradients, ``optimizers`` are stepped with the model's, ``status`` goes on the progress bar,
    ``eval_mode`` is a context for the held-out evaluations of dynamic batch loading.
    """

    def begin_step(self, step: int) -> None:
        """Prepare the forward of optimizer step ``step`` (0-based)."""

    def loss(self, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self) -> None:
        """Called after backward, before the optimizers step."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def status(self) -> str:
        return ""

    def eval_mode(self):
        return nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


@dataclass
class TrainLog:
    """What a phase did: steps, tokens, per-step losses, domain weights over time, wall time."""

    steps: int
    resumed_from: int
    tokens: int
    losses: list[float]
    domain_weights: list[list[float]]
    domain_tokens: dict[str, int]
    seconds: float

    def to_dict(self) -> dict:
        record = asdict(self)
        record["final_loss"] = sum(self.losses[-10:]) / max(len(self.losses[-10:]), 1) if self.losses else None
        record.pop("losses")
        return record


def _digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()



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


def train(
    model: nn.Module,
    domains: Domains,
    settings: TrainSettings,
    device: torch.device,
    extra: TrainExtra | None = None,
    checkpoint: str | None = None,
    fingerprint: dict | None = None,
    description: str = "train",
) -> TrainLog:
    """Train every parameter of ``model`` for ``settings.steps`` steps on batches drawn from ``domains``.

    With a ``checkpoint`` file name and ``settings.checkpoint_dir``, the state is saved every
    ``checkpoint_every`` steps and at the end, and a matching checkpoint there is resumed from.
    """
    settings.validate()
    extra = extra or TrainExtra()
    model.to(device)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, settings.factor)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if settings.bf16 else nullcontext()
    path = Path(settings.checkpoint_dir).expanduser() / checkpoint if settings.checkpoint_dir and checkpoint else None
    digest = _digest({"settings": asdict(settings) | {"checkpoint_dir": None}, "run": fingerprint or {},
                      "domains": domains.names})
    generator = torch.Generator().manual_seed(settings.seed)
    start, losses = 0, []
    counts = torch.zeros(len(domains.names), dtype=torch.long)
    state = load_checkpoint(path, digest) if path else None
    if state is not None:
        with restoring(path):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            extra.load_state_dict(state["extra"])
            domains.load_state_dict(state["domains"])
            generator.set_state(state["generator"])
            start, losses, counts = int(state["step"]), [float(x) for x in state["losses"]], state["counts"].long()
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    clock = time.perf_counter()
    bar = meter(description, settings.steps, completed=start, loss="-", status="")
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bar as update:
            torch.manual_seed(settings.seed + start)
            for step in range(start, settings.steps):
                if domains.dynamic and step > 0 and step % settings.update_every == 0:
                    model.eval()
                    with extra.eval_mode():
                        domains.update(held_out_losses(model, domains, device, autocast))
                model.train()
                batch, chosen = domains.sample(settings.batch_size, settings.seq_len, generator)
                counts += torch.bincount(chosen, minlength=len(domains.names))
                batch = batch.to(device)
                extra.begin_step(step)
                with autocast:
                    lm = model(input_ids=batch, labels=batch, use_cache=False).loss
                    added = extra.loss(step)
                if not torch.isfinite(lm):
                    raise NumericalError(f"the training loss became {lm.item()} at step {step}; lower --lr")
                (lm if added is None else lm + added).backward()
                if settings.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                extra.after_backward()
                for opt in (optimizer, *extra.optimizers()):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                scheduler.step()
                losses.append(lm.item())
                update(step + 1, loss=f"{losses[-1]:.3f}", status=extra.status())
                done = step + 1
                if path and (done % settings.checkpoint_every == 0 or done == settings.steps):
                    save_checkpoint(path, {
                        "digest": digest, "step": done, "losses": losses, "counts": counts,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "extra": extra.state_dict(),
                        "domains": domains.state_dict(), "generator": generator.get_state(),
                    })
    finally:
        model.eval()
        if settings.gradient_checkpointing:
            enable_checkpointing(model, on=False)
        optimizer.zero_grad(set_to_none=True)
        model.requires_grad_(False)
    return TrainLog(
        steps=settings.steps,
        resumed_from=start,
        tokens=settings.steps * settings.batch_size * settings.seq_len,
        losses=losses,
        domain_weights=[list(map(float, domains.weights))] if not domains.history else domains.history,
        domain_tokens={name: int(n) * settings.seq_len for name, n in zip(domains.names, counts)},
        seconds=time.perf_counter() - clock,
    )
