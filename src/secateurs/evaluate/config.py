"""What ``secateurs bench`` measures, :class:`SpeedConfig`: light (no torch), since its flags are derived
from these fields (:mod:`secateurs.schema`) and ``--help`` must not import torch. The measuring is
:mod:`secateurs.evaluate.speed`'s."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..schema import option

DECODE_METHODS = ("cuda-graph", "compile")


def _ints(flag_name: str):
    """A parser of a comma-separated list of integers for ``flag_name``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise UsageError(f"{flag_name} {text!r} must be comma-separated integers, e.g. 1,8") from None

    return parse


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass
class SpeedConfig:
    """What to measure. Defaults: three prompt lengths up to 2048 (the papers' context), batch 1 and 8."""

    prompt_lengths: tuple[int, ...] = option(
        (128, 512, 2048), "Prefill prompt lengths, comma-separated (default 128,512,2048).",
        parse=_ints("--prompt-lengths"),
    )
    decode_batches: tuple[int, ...] = option(
        (1, 8), "Decode batch sizes, comma-separated (default 1,8).", parse=_ints("--batches")
    )
    decode_prompt: int = 32
    new_tokens: int = option(64, "Greedy decode steps timed per batch size.")
    warmup: int = option(2, "Untimed runs before each measurement.")
    repeats: int = option(5, "Timed runs; the median is reported.")
    seed: int = option(0, "Seed of the random prompt ids.")
    cuda_graphs: bool = option(True, "Replay the decode step as a CUDA graph (CUDA only; off = eager).")
    decode_methods: tuple[str, ...] = option(
        DECODE_METHODS,
        "Decode methods timed on CUDA, fastest reported: cuda-graph (static cache, step in a CUDA graph), "
        "compile (the step through torch.compile, then a CUDA graph). Default: both.",
        parse=_names,
    )

    def check(self) -> None:
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise UsageError("--prompt-lengths needs positive lengths, e.g. 128,512,2048")
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise UsageError("--batches needs positive batch sizes, e.g. 1,8")
        if self.new_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise UsageError("--new-tokens and --repeats must be at least 1, --warmup at least 0")
        unknown = set(self.decode_methods) - set(DECODE_METHODS)
        if unknown or not self.decode_methods:
            raise UsageError(f"--decode-methods takes some of {', '.join(DECODE_METHODS)} (got {', '.join(self.decode_methods)})")
