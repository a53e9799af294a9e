"""LoRA recovery over ``peft`` that keeps every pruned weight at exactly zero.

The recipe is LLM-Pruner's post-training (Ma, Fang, Wang, NeurIPS 2023, §3.3 and its
``post_training.py``): LoRA adapters of rank 8 (alpha 16, dropout 0.05) on every block linear
(q/k/v/o, gate/up/down), AdamW at learning rate 1e-4 with 100 warm-up steps then linear decay,
gradient clipping at 1.0, sequences of 256 tokens; then the adapters are merged into the weights.
LLM-Pruner tunes on Alpaca; here the data is language-modelling text (WikiText-2 / C4 train, or any
.txt / .jsonl), as the issue asks, and the number of steps is explicit.

The adapters are masked where the model is sparse, so the merge keeps every pruned weight at zero
(:mod:`.adapters`). Training is the one loop (:mod:`secateurs.training.loop`): the batch of step t is a seeded
function of (seed, t) and dropout is seeded per step, so a run stopped and resumed from its last
checkpoint (adapters, optimizer, schedule, losses; written atomically every ``save_every`` steps)
ends bit-identical to an uninterrupted one. Mixed precision (bf16 autocast, or fp16 with a gradient
scaler) and gradient checkpointing are on by default on CUDA; a progress bar shows the loss.

This module is the driver: the settings (:class:`RecoverConfig`), the training text, the
checkpoint folder layout, and :func:`recover_lora` (attach, train, merge, report).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.calib import tokenize
from ..data.sources import load_text
from ..errors import NumericalError, UsageError
from ..model.linear import sparsity_of, weight_matrix
from ..model.load import LoadedModel
from ..record import peak_memory_mb
from .adapters import Adapters, attach
from .config import RecoverConfig
from ..training.loop import SeededWindows, TrainHook, TrainLog, TrainPlan, digest, train

CHECKPOINT = "recover_state.safetensors"


def checkpoint_files(folder: str | Path) -> list[Path]:
    """Where a run in ``folder`` checkpoints: ``folder`` itself and its ``round-N`` subfolders (iterative)."""
    folder = Path(folder).expanduser()
    return [sub / CHECKPOINT for sub in [*sorted(folder.glob("round-*")), folder]]


def remove_checkpoints(folder: str | Path) -> None:
    """Delete the checkpoints a finished run left, and their folders if nothing else is in them."""
    for path in checkpoint_files(folder):
        path.unlink(missing_ok=True)
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()


def _schedule(config: RecoverConfig):
    """Linear warm-up then linear decay to zero (transformers' default schedule, as LLM-Pruner uses)."""
    warmup, total = config.warmup(), config.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def train_adapters(
    adapters: Adapters,
    config: RecoverConfig,
    ids: torch.Tensor,
    device: torch.device,
    hook: TrainHook | None = None,
    identity: dict | None = None,
    description: str = "lora",
) -> TrainLog:
    """Train the adapters for ``config.steps`` optimizer steps on seeded windows of ``ids`` (1-D token ids).

    ``identity`` (e.g. the model source and size) joins the checkpoint fingerprint.
    """
    folder = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None
    plan = TrainPlan(
        steps=config.steps, lr=config.lr, schedule=_schedule(config), weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, grad_accum=config.grad_accum, precision=config.precision,
        gradient_checkpointing=config.gradient_checkpointing, checkpoint=folder / CHECKPOINT if folder else None,
        save_every=config.save_every,
    )
    batches = SeededWindows(ids, config.batch_size, config.seq_len, config.seed, config.data)
    fingerprint = {"config": config.fingerprint(), "model": identity or {}}
    return train(adapters.peft_model, adapters.trainable(), batches, plan, device, hook, fingerprint, description)


def train_ids(loaded: LoadedModel, config: RecoverConfig) -> torch.Tensor:
    """The training text's token ids (the ``train`` split: never the evaluation text)."""
    ids = tokenize(loaded.tokenizer, load_text(config.data, "train", config.data_dir))
    if ids.numel() < config.seq_len + 1:
        raise UsageError(f"{config.data} has {ids.numel()} tokens, fewer than --seq-len {config.seq_len} + 1")
    return ids


def identity(loaded: LoadedModel) -> dict:
    """What identifies the model for a checkpoint: its source and every parameter's shape."""
    shapes = {name: list(p.shape) for name, p in loaded.model.named_parameters()}
    return {"source": loaded.source, "shapes": digest(shapes)}


def mean_sparsity(loaded: LoadedModel) -> float:
    """Mean fraction of exact zeros over the block linears."""
    values = [sparsity_of(weight_matrix(module)) for module in loaded.spec.named_linears(loaded.model).values()]
    return sum(values) / max(len(values), 1)


@dataclass
class RecoverReport:
    """What a recovery did: the settings, steps and tokens, losses, sparsity kept, time and memory."""

    method: str
    config: RecoverConfig
    log: TrainLog
    masked_linears: int
    sparsity_before: float
    sparsity_after: float
    zeros_kept: bool
    seconds: float
    peak_memory_mb: float
    device: str
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.log.steps * self.config.tokens_per_step()

    def loss_start_end(self, window: int = 10) -> tuple[float, float]:
        """Mean training loss over the first and the last ``window`` steps (single steps are noisy)."""
        losses = self.log.losses
        n = max(1, min(window, len(losses) // 2))
        return (sum(losses[:n]) / n, sum(losses[-n:]) / n) if losses else (math.nan, math.nan)

    def stage_record(self) -> dict:
        first, last = self.loss_start_end()
        config = {k: v for k, v in asdict(self.config).items() if k not in ("checkpoint_dir", "data_dir")}
        return {
            "stage": "recover",
            "method": self.method,
            "config": config,
            "seed": self.config.seed,
            "steps": self.log.steps,
            "resumed_from": self.log.resumed_from,
            "tokens": self.tokens,
            "precision": self.log.precision,
            "loss": {"first": first, "last": last, "per_step": self.log.losses},
            "masked_linears": self.masked_linears,
            "sparsity": {"before": self.sparsity_before, "after": self.sparsity_after},
            "zeros_kept": self.zeros_kept,
            **self.extra,
            "seconds": round(self.seconds, 3),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "device": self.device,
        }


def recover_lora(
    loaded: LoadedModel, config: RecoverConfig, device: torch.device, hook: TrainHook | None = None
) -> RecoverReport:
    """Train masked LoRA adapters on ``loaded.model`` and merge them, in place."""
    config.validate()
    ids = train_ids(loaded, config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    before = mean_sparsity(loaded)
    who = identity(loaded)
    adapters = attach(loaded, config)
    try:
        log = train_adapters(adapters, config, ids, device, hook, who)
    except BaseException:
        adapters.discard()
        raise
    kept = adapters.merge()
    if not kept:
        raise NumericalError("a pruned weight became non-zero in the merge; please report this")
    return RecoverReport(
        method="lora",
        config=config,
        log=log,
        masked_linears=len(adapters.masked),
        sparsity_before=before,
        sparsity_after=mean_sparsity(loaded),
        zeros_kept=kept,
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
        device=str(device),
    )
