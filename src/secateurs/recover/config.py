"""How LoRA recovery, LoRAPrune and iterative pruning train: one settings dataclass, with
LLM-Pruner's post-training recipe as its defaults (see :mod:`.lora`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data.sources import check_name
from ..errors import UsageError
from ..structured.registry import TARGET_NAMES

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
    """

    steps: int = 200
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    data: str = "wikitext2"
    data_dir: str | None = None
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = True
    mask_min_sparsity: float = 0.01
    checkpoint_dir: str | None = None
    save_every: int = 50

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
        check_name(self.data)

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)

    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def fingerprint(self) -> dict:
        """Settings that change the result: a checkpoint resumes only under the same ones."""
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint_dir", "save_every", "data_dir")}
