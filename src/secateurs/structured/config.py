"""The width-pruning request, :class:`WidthConfig`: light (no torch), since ``secateurs width``'s method
flags are derived from its fields (:mod:`secateurs.schema`) and ``--help`` must not import torch. The
verb that runs it is :mod:`secateurs.structured.base`."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.config import CalibConfig
from ..errors import UsageError
from ..schema import option
from .registry import AGGREGATES, MODES, TARGETS, method_class, method_names


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
