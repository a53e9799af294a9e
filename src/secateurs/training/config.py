"""How a recovery distills (:class:`DistillConfig`) and how much text it reads (:func:`parse_tokens`).
Light (no torch): the recovery configs nest :class:`DistillConfig`, and ``secateurs recover`` /
``shear`` derive their flags and ``--help`` from its fields (:mod:`secateurs.schema`). The loss
itself is :mod:`secateurs.training.distill`."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import UsageError
from ..schema import option

DISTILL_LOSSES = ("kl", "kl+lm")
HIDDEN_LOSSES = ("cosine", "mse")
DEFAULT_TOP_K = 64
"""The top-k a cache keeps unless told: 64 of SmolLM2's 49,152 tokens hold nearly all of a trained
teacher's probability mass at T = 1, and 64 × (2 + 4) bytes per token keeps 2M tokens under 800 MB."""

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_tokens(text: str | int | None, flag: str = "--tokens") -> int | None:
    """A token count as people write it: ``2M``, ``500k``, ``1.5M``, ``2000000`` (k = 10³, M = 10⁶, G/B = 10⁹)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", text)
    if match is None:
        raise UsageError(f"{flag} {text!r} is not a token count; write e.g. 2M, 500k or 2000000")
    count = int(round(float(match.group(1)) * _SUFFIXES[match.group(2).lower()]))
    if count < 1:
        raise UsageError(f"{flag} must be at least 1 token, got {text!r}")
    return count


def parse_layers(text: str | list | None) -> list[tuple[int, int]] | None:
    """Hidden-state pairs ``student:teacher`` (or one index for both), comma-separated: ``3,7:11``."""
    if text is None or isinstance(text, list):
        return None if text is None else [tuple(pair) for pair in text]
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            student, _, teacher = part.partition(":")
            pairs.append((int(student), int(teacher or student)))
        except ValueError:
            raise UsageError(f"--distill-hidden {text!r} must be layer indices, e.g. 3,7 or 3:5 (student:teacher)") from None
    return pairs or None


@dataclass
class DistillConfig:
    """Knowledge distillation from the model the pruned one came from, as a recovery loss.

    ``loss`` None (the default) trains on the LM loss alone, as before distillation existed; ``kl`` is T² · KL(teacher ‖ student) over every position's next-token distribution at
    temperature ``temperature`` (Hinton, Vinyals & Dean 2015: T² keeps the gradients' scale as T
    changes); ``kl+lm`` is ``alpha`` · KD + (1 − ``alpha``) · LM loss. The defaults are Minitron's
    (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
    and Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice"): logit KD alone, T = 1,
    which they found best in most settings. ``hidden``: also match these hidden states (pairs of
    student and teacher block indices), each model's block output passed through its own final norm,
    by ``hidden_loss`` (cosine: 1 − cos; mse) times ``hidden_weight``; off by default (Minitron's
    intermediate-state loss helped only where depth was pruned, and needs equal hidden sizes here).

    ``teacher`` None: the model the pruned one came from (``input`` in its ``secateurs.json``) for
    ``recover --method lora``; the model as given for LoRAPrune, iterative pruning and shearing, which
    prune it themselves. ``top_k`` None computes the teacher's logits beside the student at every
    step; a number caches the teacher's top-k logits once over the run's training windows
    (safetensors: values fp16, indices int32) so the teacher never shares memory with the student,
    and the loss then uses the teacher's distribution renormalised over its top k (the tail's mass,
    small for a trained teacher at T = 1, is dropped: an approximation that is exact at k = vocab).
    """

    loss: str | None = option(
        None, "Distill from the dense model: kl (logit KD alone, Minitron's choice) or kl+lm (mixed by --distill-alpha)."
    )
    teacher: str | None = option(None, "Teacher model (default: the model the pruned one came from, from its secateurs.json).")
    temperature: float = option(1.0, "Distillation temperature T (loss scaled by T², Hinton); Minitron: 1.")
    alpha: float = option(0.5, "kl+lm: weight of the KD term (the LM loss gets 1 - alpha).")
    top_k: int | None = option(
        None, f"Cache the teacher's top-k logits once instead of keeping it beside the student (e.g. {DEFAULT_TOP_K})."
    )
    hidden: list[tuple[int, int]] | None = option(
        None, "Also match hidden states of these blocks (student:teacher, comma-separated; off by default).",
        parse=parse_layers,
    )
    hidden_loss: str = option("cosine", f"Hidden-state loss: {', '.join(HIDDEN_LOSSES)} (after each model's final norm).")
    hidden_weight: float = option(1.0, "Weight of the hidden-state loss.")

    @property
    def enabled(self) -> bool:
        return self.loss is not None

    def validate(self) -> None:
        if self.loss is None:
            given = [flag for flag, value in (("--teacher", self.teacher), ("--distill-top-k", self.top_k),
                                              ("--distill-hidden", self.hidden)) if value is not None]
            if given:
                raise UsageError(f"{given[0]} needs --distill kl or kl+lm")
            return
        if self.loss not in DISTILL_LOSSES:
            raise UsageError(f"unknown --distill {self.loss!r}; use one of {', '.join(DISTILL_LOSSES)}")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be positive, got {self.temperature:g}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--distill-alpha must be in [0, 1], got {self.alpha:g}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--distill-top-k must be at least 1, got {self.top_k}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise UsageError(f"unknown --distill-hidden-loss {self.hidden_loss!r}; use one of {', '.join(HIDDEN_LOSSES)}")
        if self.hidden and self.top_k is not None:
            raise UsageError("--distill-hidden needs the teacher beside the student; drop --distill-top-k")

    def fingerprint(self) -> dict:
        """What changes the result (the teacher is fingerprinted by what was loaded, not its name)."""
        return {k: v for k, v in asdict(self).items() if k != "teacher"}


DISTILL_FLAGS = {"loss": "distill", "alpha": "distill_alpha", "top_k": "distill_top_k", "hidden": "distill_hidden",
                 "hidden_loss": "distill_hidden_loss", "hidden_weight": "distill_hidden_weight"}
"""The flag names of :class:`DistillConfig`'s fields where the bare name would clash (``alpha`` is LoRA's)."""
