"""The expert-pruning request, :class:`ExpertConfig`: light (no torch), since ``secateurs experts``'s
flags are derived from its fields (:mod:`secateurs.schema`) and ``--help`` must not import torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..schema import option

METHODS = ("reap", "frequency", "ean")
MODES = ("uniform", "global")


@dataclass(frozen=True)
class ExpertConfig:
    """Which experts to keep: a criterion, the share of routed experts kept, how it is spread over
    the MoE layers, and whether a removed expert is dropped or merged into a kept one."""

    method: str = option("reap", f"Expert criterion: {', '.join(METHODS)}.")
    keep: float = option(0.5, "Share of the routed experts kept (of each MoE layer's with --mode uniform).",
                         decls=("--keep",))
    mode: str = option(
        "uniform",
        "uniform (the same count in every MoE layer: plain transformers loads the folder) or global (the budget "
        "spread by score over the layers, at least top-k each; the folder reloads through secateurs' own class).",
    )
    merge: bool = option(
        False,
        "Fold each removed expert into its most similar kept one (cosine of their weights), averaging by how often "
        "calibration routed to each, instead of dropping it.",
    )

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown expert criterion {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < self.keep <= 1.0:
            raise UsageError(f"--keep is the share of experts kept, in (0, 1]; got {self.keep:g}")
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r} is not known; use {' or '.join(MODES)}")

    def kept_count(self, n_experts: int, top_k: int, groups: int = 1, top_groups: int = 1, group_min: int = 1) -> int:
        """Experts kept per layer (with --mode global: on average); refuses a count below the router's
        top-k (it must pick k distinct experts). Under group-limited routing (``groups`` > 1) every
        group keeps the same count, at least ``group_min`` (what its group score reads) and enough
        that the ``top_groups`` best groups hold top-k experts."""
        if groups > 1:
            if self.mode != "uniform":
                raise UsageError(
                    f"--mode global keeps a different count per layer; routing within {groups} expert groups "
                    "(n_group) needs the same count in every group: use --mode uniform"
                )
            size = n_experts // groups
            per_group = max(1, round(self.keep * size))
            need = max(group_min, -(-top_k // top_groups))
            if per_group < need:
                raise UsageError(
                    f"--keep {self.keep:g} keeps {per_group} of {size} experts in each of {groups} expert groups; "
                    f"the router needs {need} per group (top-{top_k} from {top_groups} groups, group score over "
                    f"{group_min}); keep at least {need / size:.3g}"
                )
            return per_group * groups
        kept = max(1, round(self.keep * n_experts))
        if kept < top_k:
            raise UsageError(
                f"--keep {self.keep:g} keeps {kept} of {n_experts} experts, fewer than the router's top-k of {top_k}; "
                f"keep at least {top_k / n_experts:.3g}"
            )
        return kept
