"""How LoRA recovery, LoRAPrune and iterative pruning train: one settings dataclass, with
LLM-Pruner's post-training recipe as its defaults (see :mod:`.lora`), and what LoRAPrune prunes.
Light (no torch): ``secateurs recover`` derives its flags and ``--help`` from these fields
(:mod:`secateurs.schema`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from ..data.config import CalibConfig
from ..data.sources import check_name
from ..errors import UsageError
from ..schema import group, help_of, option
from ..structured.registry import TARGET_NAMES
from ..training.config import DISTILL_FLAGS, DistillConfig, parse_tokens

# The recovery stages' choices, here (no torch) because the CLI's --help lists them.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LORAPRUNE_MODES = (*TARGET_NAMES, "unstructured")


@dataclass
class RecoverConfig:
    """How to train the adapters. Defaults: LLM-Pruner's post-training recipe (see :mod:`.lora`).

    ``batch_size`` sequences per micro-batch, ``grad_accum`` micro-batches per optimizer step
    (LLM-Pruner: 4 × 16 = 64; the default here is 4 × 1 so that a short schedule still takes
    many steps). ``warmup_steps`` None means min(100, steps // 10). ``checkpoint_dir`` None
    disables checkpoints; with one, a matching checkpoint found there is resumed.

    ``distill`` (off unless its ``loss`` is set): knowledge distillation from the dense model as the
    loss (:class:`~secateurs.training.config.DistillConfig`, Minitron's defaults). ``data`` may also
    be ``self``: text the teacher writes itself (data-free; needs ``distill``). ``tokens`` (e.g.
    ``2M``) sets the steps from a token budget; a budget larger than the training text is refused
    unless ``epochs`` says how often the text may be repeated (``epochs`` alone sets the budget to
    that many passes). ``eval_data``: held-out text (a dataset's test split, a file that shares no
    span with the training text, or ``self``: teacher-written with another seed) whose loss is
    measured every ``eval_every`` steps, the run's held-out curve.

    ``experts`` (mixture-of-experts models; no effect on dense ones): LoRA on the routed experts' fused
    parameters too, one rank-``rank`` pair per expert, masked so every pruned expert weight stays zero
    (:mod:`.adapters`); routers are never adapted. On by default because the routed experts hold most
    of an MoE model's weights and most of what pruning removed (``secateurs prune`` prunes them like any
    linear), so recovery that skipped them would adapt a small part of the damaged model (attention and
    shared experts). Off (``--no-experts``) is the behaviour before expert adapters existed, and what to
    use when memory is short: a masked expert update is materialised at the size of the fused
    parameter in each forward (peft's ParamWrapper has no dropout, so expert adapters train without it).
    """

    steps: int = option(200, "Optimizer steps (per round for iterative).")
    rank: int = option(8, "LoRA rank (LLM-Pruner: 8).")
    alpha: float = option(16.0, "LoRA alpha (LLM-Pruner: 16).")
    dropout: float = option(0.05, "LoRA dropout (LLM-Pruner: 0.05).")
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = option(None, "Linear warm-up steps (default min(100, steps/10)).")
    max_grad_norm: float = 1.0
    batch_size: int = option(4, "Sequences per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    seq_len: int = option(256, "Tokens per training sequence (LLM-Pruner: 256).")
    data: str = option("wikitext2", "Training text: wikitext2, c4, ptb (train split) or a .txt/.jsonl path.")
    data_dir: str | None = option(CalibConfig.data_dir, help_of(CalibConfig, "data_dir"), decls=("--data-dir",))
    seed: int = option(0, "Seed for batches, dropout and adapter init.")
    precision: str = option("auto", f"{', '.join(PRECISIONS)} (auto: bf16 autocast on CUDA, fp32 on CPU).")
    gradient_checkpointing: bool = option(True, "Recompute activations in the backward pass (less memory).")
    mask_min_sparsity: float = 0.01
    experts: bool = option(
        True, "MoE models: LoRA on the routed experts too (masked per expert, routers frozen); off: attention and "
        "shared experts only."
    )
    checkpoint_dir: str | None = option(
        None, "Where to checkpoint (default OUT.ckpt); a matching checkpoint there is resumed."
    )
    save_every: int = option(50, "Checkpoint every N steps.")
    distill: DistillConfig = group(DistillConfig, rename=DISTILL_FLAGS)
    tokens: int | None = option(
        None, "Token budget, e.g. 2M (sets the steps: budget ÷ tokens per step).", parse=parse_tokens
    )
    epochs: float | None = option(None, "Passes over the training text a --tokens budget may take (alone: sets the budget).")
    eval_data: str | None = option(
        None, "Held-out text for a loss curve: wikitext2, ptb, c4 (test split), self, or a .txt/.jsonl path."
    )
    eval_every: int = option(50, "Steps between held-out losses (with --eval-data).")
    eval_windows: int = option(16, "Held-out windows of --seq-len tokens (with --eval-data).")

    def __post_init__(self) -> None:
        """A budget given as text in Python (``tokens="2M"``) reads as it does on the command line."""
        self.tokens = parse_tokens(self.tokens)

    def validate(self) -> None:
        for name in ("steps", "rank", "batch_size", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr:g}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout:g}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown --precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.mask_min_sparsity <= 1.0:
            raise UsageError(f"mask_min_sparsity must be in [0, 1], got {self.mask_min_sparsity:g}")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"--epochs must be positive, got {self.epochs:g}")
        if self.eval_every < 1 or self.eval_windows < 1:
            raise UsageError("--eval-every and --eval-windows must be at least 1")
        self.distill.validate()
        check_name(self.data, allow_self=True)
        if self.data == "self" and not self.distill.enabled:
            raise UsageError("--data self is text the teacher writes; add --distill kl (or kl+lm)")
        if self.eval_data is not None:
            check_name(self.eval_data, allow_self=True)

    def training_steps(self, data_tokens: int | None = None) -> int:
        """The optimizer steps: ``steps``, or a budget's (``tokens``, else ``epochs`` × ``data_tokens``)
        in whole steps; a budget beyond the text without ``epochs`` is one line, before any training."""
        budget = self.tokens
        if budget is None and self.epochs is not None and data_tokens is not None:
            budget = int(self.epochs * data_tokens)
        if budget is None:
            return self.steps
        if data_tokens is not None and budget > data_tokens * (self.epochs or 1):
            what = f"{self.epochs:g} passes over" if self.epochs else "the"
            raise UsageError(f"--tokens {budget:,} is more than {what} {data_tokens:,} tokens of {self.data}; "
                             "pass --epochs N to repeat the text, or give more text")
        return max(1, -(-budget // self.tokens_per_step()))

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)

    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def fingerprint(self) -> dict:
        """Settings that change the result: a checkpoint resumes only under the same ones. Options left
        off are left out, so a checkpoint written before they existed still resumes."""
        found = {k: v for k, v in asdict(self).items()
                 if k not in ("checkpoint_dir", "save_every", "data_dir", "experts")}  # experts: by the adapters
        if not self.distill.enabled:
            del found["distill"]
        if self.eval_data is None:
            del found["eval_every"], found["eval_windows"]
        return {k: v for k, v in found.items() if not (k in ("tokens", "epochs", "eval_data") and v is None)}


@dataclass
class LoRAPruneConfig:
    """What to prune and how fast. ``ratio``: the fraction of each targeted kind's groups removed from
    every prunable layer (uniform, like ``secateurs width``), or of each prunable linear's weights
    (``target='unstructured'``). ``keep_first`` / ``keep_last`` None: the released code's choice."""

    ratio: float = option(0.2, "loraprune: fraction of groups (or weights, --target unstructured) removed per layer.")
    target: str = option("both", f"loraprune: {', '.join(LORAPRUNE_MODES)}.")
    keep_first: int | None = option(None, "loraprune: leave the first N layers whole (default 10% of layers).")
    keep_last: int | None = option(None, "loraprune: leave the last N layers whole (default 1).")
    prune_every: int = option(10, "loraprune: prune every N steps (paper code: 10).")
    warmup: float = 0.1
    cooldown: float = option(
        0.1,
        "loraprune: fraction of the steps tuned at the final shape after the schedule ends "
        "(0.1; 0.5 recovered better at 300 steps on SmolLM2, see BENCHMARKS.md).",
    )
    initial_ratio: float = 0.0
    ema: float = 0.9
    # The adapters' learning rate in LoRAPrune's released code; RecoverConfig's own default (1e-4) is
    # LLM-Pruner's, so a LoRAPrune run builds its training config through train_config().
    train_lr: ClassVar[float] = 3e-4

    def train_config(self, **fields) -> RecoverConfig:
        """The training settings for a LoRAPrune run: ``fields`` as given, the paper's lr unless set."""
        fields.setdefault("lr", self.train_lr)
        return RecoverConfig(**fields)

    @property
    def structured(self) -> bool:
        return self.target != "unstructured"

    def validate(self) -> None:
        """The checks that need no model, so a command fails before it loads one."""
        if self.target not in LORAPRUNE_MODES:
            raise UsageError(f"unknown --target {self.target!r}; use one of {', '.join(LORAPRUNE_MODES)}")
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio must be in (0, 1), got {self.ratio:g}")
        if not 0.0 <= self.initial_ratio <= self.ratio:
            raise UsageError(f"initial_ratio must be in [0, --ratio], got {self.initial_ratio:g}")
        if self.prune_every < 1:
            raise UsageError(f"--prune-every must be at least 1, got {self.prune_every}")
        if self.warmup < 0 or self.cooldown < 0 or self.warmup + self.cooldown >= 1:
            raise UsageError(f"warm-up ({self.warmup:g}) and --cooldown ({self.cooldown:g}) must be non-negative and sum to less than 1")
        if not 0.0 <= self.ema < 1.0:
            raise UsageError(f"ema must be in [0, 1), got {self.ema:g}")

    def layers(self, n_layers: int, moe: bool = False, experts: bool = True) -> list[int]:
        """Validate against the model; returns the prunable layer indices. ``moe``: the model is a
        mixture of experts: unstructured LoRAPrune scores and prunes every routed expert's matrix
        through its own adapter (``experts``, which it therefore needs); the structured targets are
        refused in one line, as width pruning refuses MoE models (experts are not dependency groups)."""
        if moe and self.structured:
            raise UsageError(
                f"LoRAPrune --target {self.target} does not slice a mixture-of-experts model's experts; use --target "
                "unstructured (each routed expert pruned through its own adapter), or secateurs experts to remove "
                "whole experts and then recover with LoRA"
            )
        if moe and not experts:
            raise UsageError("LoRAPrune on a mixture-of-experts model prunes the routed experts through their adapters; "
                             "drop --no-experts")
        self.validate()
        first = int(0.1 * n_layers) if self.keep_first is None else self.keep_first
        last = 1 if self.keep_last is None else self.keep_last
        if first < 0 or last < 0:
            raise UsageError("--keep-first and --keep-last must be at least 0")
        layers = list(range(first, n_layers - last))
        if not layers:
            raise UsageError(f"keeping the first {first} and last {last} of {n_layers} layers leaves none to prune")
        return layers

    def ratio_at(self, step: int, steps: int) -> float:
        """The cubic schedule (Zhu & Gupta, 2017, as LoRAPrune uses it) at 0-based ``step``."""
        start, end = self.warmup * steps, steps - self.cooldown * steps
        if step < start:
            return self.initial_ratio
        if step >= end:
            return self.ratio
        left = 1.0 - (step - start) / max(end - start, 1e-9)
        return self.ratio + (self.initial_ratio - self.ratio) * left**3
