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

With ``config.distill`` on, the loss is distillation from the model the pruned one came from
(:mod:`secateurs.training.distill`); the masks are kept exactly as with the LM loss.

This module is the driver: the settings (:class:`RecoverConfig`), the training and held-out text
(:func:`training_text`), the checkpoint folder layout, and :func:`recover_lora` (attach, train,
merge, report).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..data.calib import self_generated, tokenize
from ..data.overlap import check_disjoint
from ..data.sources import load_text
from ..errors import NumericalError, UsageError
from ..model.linear import sparsity_of, weight_matrix
from ..model.load import LoadedModel
from ..record import RecoverStage, peak_memory_mb
from .adapters import Adapters, attach
from .config import RecoverConfig
from ..training.distill import Distillation, load_teacher
from ..training.loop import HeldOut, SeededWindows, TrainHook, TrainLog, TrainPlan, digest, train

CHECKPOINT = "recover_state.safetensors"
TEACHER_CACHE = "teacher_topk.safetensors"
HELD_OUT_SEED_OFFSET = 1000  # teacher-written held-out text: another seed than the training text's


def checkpoint_files(folder: str | Path) -> list[Path]:
    """Where a run in ``folder`` checkpoints: ``folder`` itself and its ``round-N`` subfolders (iterative)."""
    folder = Path(folder).expanduser()
    return [sub / CHECKPOINT for sub in [*sorted(folder.glob("round-*")), folder]]


def remove_checkpoints(folder: str | Path) -> None:
    """Delete the checkpoints a finished run left, and their folders if nothing else is in them."""
    for path in checkpoint_files(folder):
        path.unlink(missing_ok=True)
        (path.parent / TEACHER_CACHE).unlink(missing_ok=True)
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
    distill: Distillation | None = None,
    held_out: HeldOut | None = None,
) -> TrainLog:
    """Train the adapters for ``config.steps`` optimizer steps on seeded windows of ``ids`` (1-D token ids).

    ``identity`` (e.g. the model source and size) joins the checkpoint fingerprint; ``distill`` is
    the loss when given (its top-k cache, if any, lives in the checkpoint folder).
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
    if adapters.experts:  # a run with expert adapters trains other weights than one without (or a dense model)
        fingerprint["expert_adapters"] = True
    if distill is not None and distill.cache_path is None and folder is not None:
        distill.cache_path = folder / TEACHER_CACHE
    return train(adapters.peft_model, adapters.trainable(), batches, plan, device, hook, fingerprint, description,
                 distill, held_out)


def train_ids(loaded: LoadedModel, config: RecoverConfig, teacher: LoadedModel | None = None) -> torch.Tensor:
    """The training text's token ids (the ``train`` split: never the evaluation text); ``self``: text
    ``teacher`` writes, as many tokens as the run reads (its budget, else steps × tokens per step)."""
    if config.data == "self":
        if teacher is None:
            raise UsageError("--data self is text the teacher writes; add --distill kl (or kl+lm)")
        budget = config.tokens or config.training_steps() * config.tokens_per_step()
        count = -(-budget // config.seq_len) + 1
        return self_generated(teacher.model, loaded.tokenizer, count, config.seq_len, config.seed).flatten()
    ids = tokenize(loaded.tokenizer, load_text(config.data, "train", config.data_dir))
    if ids.numel() < config.seq_len + 1:
        raise UsageError(f"{config.data} has {ids.numel()} tokens, fewer than --seq-len {config.seq_len} + 1")
    return ids


def held_out_windows(loaded: LoadedModel, config: RecoverConfig, teacher: LoadedModel | None = None) -> HeldOut | None:
    """``config.eval_data``'s first ``eval_windows`` windows: a dataset's test split, teacher-written
    text of another seed, or a file refused if it shares a span with the training text."""
    name = config.eval_data
    if name is None:
        return None
    if name == "self":
        if teacher is None:
            raise UsageError("--eval-data self is text the teacher writes; add --distill kl (or kl+lm)")
        seed = config.seed + HELD_OUT_SEED_OFFSET
        windows = self_generated(teacher.model, loaded.tokenizer, config.eval_windows, config.seq_len, seed)
        return HeldOut(windows, config.eval_every)
    text = load_text(name, "test", config.data_dir)
    if config.data != "self":
        check_disjoint(load_text(config.data, "train", config.data_dir), text, config.data, name)
    ids = tokenize(loaded.tokenizer, text)
    need = config.eval_windows * config.seq_len
    if ids.numel() < need:
        raise UsageError(f"{name} has {ids.numel()} tokens, fewer than --eval-windows {config.eval_windows} × "
                         f"--seq-len {config.seq_len}")
    return HeldOut(ids[:need].reshape(config.eval_windows, config.seq_len), config.eval_every)


def prepare(
    loaded: LoadedModel, config: RecoverConfig, device: torch.device, dense: bool = False,
    teacher: LoadedModel | None = None,
) -> tuple[RecoverConfig, torch.Tensor, Distillation | None, HeldOut | None]:
    """Everything a recovery checks and reads before it trains: the teacher (``dense``: the model as
    given is it, for methods that prune it themselves; or one already loaded, for rounds), the
    training ids, the steps a token budget sets, the held-out set."""
    config.validate()
    distill = None
    if config.distill.enabled:
        teacher = teacher or load_teacher(loaded, config.distill, device, dense)
        distill = Distillation(teacher, config.distill, loaded.spec)
    ids = train_ids(loaded, config, teacher)
    config = replace(config, steps=config.training_steps(None if config.data == "self" else ids.numel()))
    return config, ids, distill, held_out_windows(loaded, config, teacher)


def identity(loaded: LoadedModel) -> dict:
    """What identifies the model for a checkpoint: its source and every parameter's shape."""
    shapes = {name: list(p.shape) for name, p in loaded.model.named_parameters()}
    return {"source": loaded.source, "shapes": digest(shapes)}


def mean_sparsity(loaded: LoadedModel) -> float:
    """Mean fraction of exact zeros over the block linears."""
    values = [sparsity_of(weight_matrix(module)) for module in loaded.spec.named_linears(loaded.model).values()]
    return sum(values) / max(len(values), 1)


def training_extra(distill: Distillation | None, log: TrainLog) -> dict:
    """What a recovery's record adds for distillation (the teacher, the LM loss beside the objective)
    and for a held-out set (its curve: [tokens seen, loss])."""
    extra: dict = {}
    if distill is not None:
        extra["teacher"] = distill.teacher.source
        extra["lm_loss"] = {"per_step": log.lm_losses}
    if log.held_out is not None:
        extra["held_out"] = log.held_out
    return extra


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

    @classmethod
    def after_training(cls, method: str, config: RecoverConfig, log: TrainLog, adapters: Adapters,
                       loaded: LoadedModel, sparsity_before: float, zeros_kept: bool, start: float,
                       device: torch.device, extra: dict) -> RecoverReport:
        """The report of a finished training run (LoRA's, LoRAPrune's): what the merged model keeps,
        measured now, and the time since ``start`` (a ``time.perf_counter()``)."""
        return cls(method=method, config=config, log=log, masked_linears=len(adapters.masked),
                   sparsity_before=sparsity_before, sparsity_after=mean_sparsity(loaded), zeros_kept=zeros_kept,
                   seconds=time.perf_counter() - start, peak_memory_mb=peak_memory_mb(device), device=str(device),
                   extra=extra)

    @property
    def tokens(self) -> int:
        return self.log.steps * self.config.tokens_per_step()

    def loss_start_end(self, window: int = 10) -> tuple[float, float]:
        """Mean training loss over the first and the last ``window`` steps (single steps are noisy)."""
        losses = self.log.losses
        n = max(1, min(window, len(losses) // 2))
        return (sum(losses[:n]) / n, sum(losses[-n:]) / n) if losses else (math.nan, math.nan)

    def stage_record(self) -> RecoverStage:
        first, last = self.loss_start_end()
        config = {k: v for k, v in asdict(self.config).items() if k not in ("checkpoint_dir", "data_dir")}
        return RecoverStage(
            method=self.method,
            config=config,
            seed=self.config.seed,
            steps=self.log.steps,
            resumed_from=self.log.resumed_from,
            tokens=self.tokens,
            precision=self.log.precision,
            loss={"first": first, "last": last, "per_step": self.log.losses},
            masked_linears=self.masked_linears,
            sparsity={"before": self.sparsity_before, "after": self.sparsity_after},
            zeros_kept=self.zeros_kept,
            **self.extra,
            seconds=round(self.seconds, 3),
            peak_memory_mb=round(self.peak_memory_mb, 1),
            device=self.device,
        )


def recover_lora(
    loaded: LoadedModel, config: RecoverConfig, device: torch.device, hook: TrainHook | None = None,
    teacher: LoadedModel | None = None,
) -> RecoverReport:
    """Train masked LoRA adapters on ``loaded.model`` and merge them, in place (``teacher``: a teacher
    already loaded, e.g. by iterative pruning for all its rounds)."""
    config, ids, distill, held_out = prepare(loaded, config, device, teacher=teacher)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    before = mean_sparsity(loaded)
    who = identity(loaded)
    adapters = attach(loaded, config)
    try:
        log = train_adapters(adapters, config, ids, device, hook, who, distill=distill, held_out=held_out)
    except BaseException:
        adapters.discard()
        raise
    kept = adapters.merge()
    if not kept:
        raise NumericalError("a pruned weight became non-zero in the merge; please report this")
    return RecoverReport.after_training("lora", config, log, adapters, loaded, before, kept, start, device,
                                        training_extra(distill, log))
