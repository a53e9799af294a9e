"""The expert-pruning request, :class:`ExpertConfig`: light (no torch), since ``secateurs experts``'s
flags are derived from its fields (:mod:`secateurs.schema`) and ``--help`` must not import torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..schema import option

METHODS = ("reap", "frequency", "ean")


@dataclass(frozen=True)
class ExpertConfig:
    """Which experts to keep: a criterion and the share of each layer's routed experts kept."""

    method: str = option("reap", f"Expert criterion: {', '.join(METHODS)}.")
    keep: float = option(0.5, "Share of each MoE layer's routed experts kept (same count in every layer).",
                         decls=("--keep",))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown expert criterion {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < self.keep <= 1.0:
            raise UsageError(f"--keep is the share of experts kept, in (0, 1]; got {self.keep:g}")

    def kept_count(self, n_experts: int, top_k: int) -> int:
        """Experts kept per layer; refuses a count below the router's top-k (it must pick k distinct experts)."""
        kept = max(1, round(self.keep * n_experts))
        if kept < top_k:
            raise UsageError(
                f"--keep {self.keep:g} keeps {kept} of {n_experts} experts, fewer than the router's top-k of {top_k}; "
                f"keep at least {top_k / n_experts:.3g}"
            )
        return kept
