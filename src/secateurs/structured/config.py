"""The structured family's requests, :class:`WidthConfig` and :class:`ShearConfig`: light (no torch),
since ``secateurs width`` / ``shear`` derive their method flags from these fields
(:mod:`secateurs.schema`) and ``--help`` must not import torch. The verbs that run them are
:mod:`secateurs.structured.base` and :mod:`secateurs.structured.shearing`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..data.config import CalibConfig
from ..errors import UsageError
from ..schema import group, help_of, option
from ..training.config import DISTILL_FLAGS, DistillConfig
from .registry import AGGREGATES, MODES, TARGETS, method_class, method_names

if TYPE_CHECKING:
    from .shearing.dynamic_batch import TrainSettings
    from .shearing.target import ShearTarget


@dataclass
class WidthConfig:
    """A width-pruning request.

    ``ratio``: in ``uniform`` mode the fraction of each targeted kind's groups removed from every
    prunable layer (LLM-Pruner's ``pruning_ratio``); in ``global`` mode the fraction of the
    targeted parameters removed overall. ``importance`` picks the score where a method has several
    (None: the method's paper default). ``keep_first`` / ``keep_last`` leave layers whole
    (LLM-Pruner prunes layers 4–30 of LLaMA-7B's 32, i.e. keep_first=4, keep_last=2).
    ``round_to``: keep a multiple of this many MLP channels per layer (uniform mode), for fast kernels.
    """

    method: str = option("llm-pruner", f"One of: {', '.join(method_names())}.")
    ratio: float = option(
        0.2,
        "uniform: fraction of each targeted kind's groups removed per layer (rounded to whole groups); global: fraction of the targeted parameters.",
    )
    importance: str | None = option(None, "llm-pruner: taylor (default), vector, hessian; magnitude: l2 (default), l1.")
    aggregate: str = option("sum", "Combine a group's per-linear scores: sum, prod or max.")
    target: str = option("both", "heads (KV groups under GQA), channels (MLP) or both.")
    mode: str = option("uniform", "uniform (same ratio per layer) or global (one ranking across layers).")
    keep_first: int = option(0, "Leave the first N layers whole (LLM-Pruner uses 4 on LLaMA-7B).")
    keep_last: int = option(0, "Leave the last N layers whole (LLM-Pruner uses 2 on LLaMA-7B).")
    bias_compensation: bool = option(True, "FLAP: fold removed features' mean into the output bias.")
    round_to: int = option(1, "Keep a multiple of N MLP channels per layer (8 or 16: faster matrix products; uniform mode).")

    def calibration(
        self, source: str = "wikitext2", n_samples: int | None = None, seq_len: int | None = None, seed: int = 0,
        data_dir: str | None = None,
    ) -> CalibConfig | None:
        """The calibration this method's paper used (its own sample count and length where not given),
        or None for a method that needs no data; so the API and the CLI calibrate alike."""
        cls = method_class(self.method)
        if not cls.needs_calibration:
            return None
        return CalibConfig(source, n_samples or cls.default_samples, seq_len or cls.default_seq_len, seed, data_dir)

    def kinds(self) -> tuple[str, ...]:
        if self.target not in TARGETS:
            raise UsageError(f"unknown --target {self.target!r}; use heads, channels or both")
        return TARGETS[self.target]

    def validate(self, n_layers: int) -> list[int]:
        """Check the request against the model; returns the prunable layer indices."""
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio must be in (0, 1), got {self.ratio:g}")
        if self.mode not in MODES:
            raise UsageError(f"unknown --mode {self.mode!r}; use uniform or global")
        if self.aggregate not in AGGREGATES:
            raise UsageError(f"unknown --aggregate {self.aggregate!r}; use one of {', '.join(AGGREGATES)}")
        if self.round_to < 1:
            raise UsageError(f"--round-to must be at least 1, got {self.round_to}")
        if self.round_to > 1 and self.mode != "uniform":
            raise UsageError("--round-to applies to --mode uniform; drop it or use --mode uniform")
        if self.keep_first < 0 or self.keep_last < 0:
            raise UsageError("--keep-first and --keep-last must be at least 0")
        layers = list(range(self.keep_first, n_layers - self.keep_last))
        if not layers:
            raise UsageError(
                f"--keep-first {self.keep_first} and --keep-last {self.keep_last} leave none of the "
                f"{n_layers} layers to prune; lower them"
            )
        self.kinds()
        return layers


def parse_floats(text: str | None, flag_name: str) -> list[float] | None:
    """A comma-separated list of numbers, one per training domain."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag_name} {text!r} must be comma-separated numbers, one per --data domain") from None


def _domains(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass
class ShearConfig:
    """A shearing request: the target shape, the two phases' lengths and their shared settings.

    ``steps``: mask-learning steps (the paper: 3,200 of 32 x 4,096 tokens); ``continue_steps``:
    continued pretraining of the sliced model. ``mask_lr`` is the paper's ``lag_lr`` (1.0) for
    mask logits and multipliers; ``lagrangian_warmup`` the fraction of ``steps`` over which the target
    ramps in (the paper: 20%). ``reference_loss``: per-domain reference for dynamic batch loading
    (default: the source model's held-out loss). The Lagrangian game needs hundreds of steps or more to
    settle: with tens, the masks overshoot the target together and the cut is close to random
    (benchmarks/sections/shearing.md). ``target`` is required (None only while a request is built).
    ``distill``: continued pretraining distills from the model as given (Minitron), on the fly.
    """

    target: ShearTarget | None = None
    datasets: list[str] = option(
        help="Training domains, comma-separated: wikitext2, ptb, c4, or .txt/.jsonl paths (default: wikitext2).",
        parse=_domains, default_factory=lambda: ["wikitext2"],
    )
    steps: int = option(100, "Mask-learning steps (the paper: 3,200).")
    continue_steps: int = option(0, "Continued-pretraining steps of the sheared model.")
    lr: float = option(1e-4, "Model learning rate (the paper: 1e-4).")
    mask_lr: float = option(1.0, "Learning rate of masks and multipliers (the paper: 1.0).")
    lagrangian_warmup: float = option(0.2, "Fraction of --steps over which the target ramps in (the paper: 0.2).")
    batch_size: int = option(4, "Sequences per step.")
    seq_len: int = option(512, "Tokens per training sequence.")
    update_every: int = option(50, "Steps between domain-weight updates (the paper: 50).")
    eval_windows: int = option(4, "Held-out windows per domain for those updates.")
    reference_loss: list[float] | None = option(
        None, "Reference loss per domain (default: the source model's held-out loss).",
        parse=functools.partial(parse_floats, flag_name="--reference-loss"),
    )
    domain_weights: list[float] | None = option(
        None, "Initial domain weights (default: equal).", parse=functools.partial(parse_floats, flag_name="--domain-weights")
    )
    bf16: bool = option(False, "Train under bfloat16 autocast.")
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    seed: int = option(0, "Seed for batches and mask sampling.")
    data_dir: str | None = option(CalibConfig.data_dir, help_of(CalibConfig, "data_dir"), decls=("--data-dir",))
    checkpoint_dir: str | None = option(None, "Save resumable checkpoints here; a matching one is resumed from.")
    checkpoint_every: int = option(100, "Steps between checkpoints.")
    distill: DistillConfig = group(DistillConfig, rename=DISTILL_FLAGS)

    def settings(self, steps: int, seed_offset: int) -> TrainSettings:
        from .shearing.dynamic_batch import TrainSettings

        return TrainSettings(
            steps=steps, lr=self.lr, batch_size=self.batch_size, seq_len=self.seq_len,
            update_every=self.update_every, bf16=self.bf16, gradient_checkpointing=self.gradient_checkpointing,
            seed=self.seed + seed_offset, checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every,
        )

    def validate(self) -> None:
        if self.target is None:
            raise UsageError("give exactly one of --target layers=...,hidden=... or --target-config FILE.json")
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (mask learning), got {self.steps}")
        if self.continue_steps < 0:
            raise UsageError(f"--continue-steps must be at least 0, got {self.continue_steps}")
        if not 0 <= self.lagrangian_warmup <= 1:
            raise UsageError(f"--lagrangian-warmup must be in [0, 1], got {self.lagrangian_warmup:g}")
        if self.mask_lr <= 0:
            raise UsageError(f"--mask-lr must be positive, got {self.mask_lr:g}")
        if self.eval_windows < 1:
            raise UsageError(f"--eval-windows must be at least 1, got {self.eval_windows}")
        if self.reference_loss is not None and len(self.reference_loss) != len(self.datasets):
            raise UsageError(f"--reference-loss needs one value per --data domain ({len(self.datasets)})")
        self.settings(self.steps, 0).validate()
        self.distill.validate()
        if self.distill.enabled and not self.continue_steps:
            raise UsageError("--distill trains the sheared model in continued pretraining; add --continue-steps N")
        if self.distill.top_k is not None:
            raise UsageError("shearing draws its batches as it trains, so it distills on the fly; drop --distill-top-k")
