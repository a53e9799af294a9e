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

:func:`pretrain` runs one shearing phase (mask learning or continued pretraining) through the one
training loop (:mod:`secateurs.training.loop`) with :class:`DomainBatches` as its batch source: AdamW, linear warm-up
then cosine decay, optional bf16 autocast and activation checkpointing, resumable checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...data.calib import tokenize
from ...data.sources import load_text
from ...errors import UsageError
from ...evaluate.loss import mean_loss
from ...training.loop import Batches, Evaluate, Objective, TrainHook, TrainLog, TrainPlan, train

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


def held_out_losses(model: nn.Module, domains: Domains, device: torch.device) -> torch.Tensor:
    """Mean next-token loss of ``model`` on each domain's held-out windows (the model moves to ``device``)."""
    model.to(device)
    return torch.tensor([mean_loss(model, windows.split(1), device) for windows in domains.held_out], dtype=torch.float64)


class DomainBatches(Batches):
    """One phase's batches: each sequence's domain drawn by the current weights from a seeded
    generator, the weights updated from held-out losses every ``update_every`` steps."""

    def __init__(self, domains: Domains, batch_size: int, seq_len: int, seed: int, update_every: int) -> None:
        self.domains, self.batch_size, self.seq_len = domains, batch_size, seq_len
        self.seed, self.update_every = seed, update_every
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = torch.zeros(len(domains.names), dtype=torch.long)

    def start(self, step: int) -> None:
        torch.manual_seed(self.seed + step)

    def begin_step(self, step: int, evaluate: Evaluate) -> None:
        if self.domains.dynamic and step > 0 and step % self.update_every == 0:
            self.domains.update(evaluate(self.domains.held_out))

    def next(self, index: int) -> torch.Tensor:
        batch, chosen = self.domains.sample(self.batch_size, self.seq_len, self.generator)
        self.counts += torch.bincount(chosen, minlength=len(self.domains.names))
        return batch

    def summary(self) -> dict:
        domains = self.domains
        return {
            "domain_weights": [list(map(float, domains.weights))] if not domains.history else domains.history,
            "domain_tokens": {name: int(n) * self.seq_len for name, n in zip(domains.names, self.counts)},
        }

    def state_dict(self) -> dict:
        return {"domains": self.domains.state_dict(), "generator": self.generator.get_state(), "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.domains.load_state_dict(state["domains"])
        self.generator.set_state(state["generator"])
        self.counts = state["counts"].long()

    def fingerprint(self) -> dict:
        return {"domains": self.domains.names, "update_every": self.update_every, "seed": self.seed}


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

    def plan(self, checkpoint: str | None) -> TrainPlan:
        """The loop's plan: every weight trained in float32 (or bf16 autocast), no accumulation."""
        folder = Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir and checkpoint else None
        return TrainPlan(
            steps=self.steps, lr=self.lr, schedule=self.factor, max_grad_norm=self.max_grad_norm,
            precision="bf16" if self.bf16 else "fp32", gradient_checkpointing=self.gradient_checkpointing,
            checkpoint=folder / checkpoint if folder else None, save_every=self.checkpoint_every,
        )


def pretrain(
    model: nn.Module,
    domains: Domains,
    settings: TrainSettings,
    device: torch.device,
    hook: TrainHook | None = None,
    checkpoint: str | None = None,
    fingerprint: dict | None = None,
    description: str = "train",
    distill: Objective | None = None,
) -> TrainLog:
    """Train every parameter of ``model`` for ``settings.steps`` steps on batches drawn from ``domains``
    (on the LM loss, or on ``distill``'s).

    With a ``checkpoint`` file name and ``settings.checkpoint_dir``, the state is saved every
    ``checkpoint_every`` steps and at the end, and a matching checkpoint there is resumed from.
    """
    settings.validate()
    batches = DomainBatches(domains, settings.batch_size, settings.seq_len, settings.seed, settings.update_every)
    run = {"settings": asdict(settings) | {"checkpoint_dir": None}, "run": fingerprint or {}}
    return train(model, dict(model.named_parameters()), batches, settings.plan(checkpoint), device, hook, run,
                 description, distill)
