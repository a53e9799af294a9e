"""The ``experts`` stage: remove whole routed experts of a mixture-of-experts model (:func:`secateurs.experts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..moe.config import ExpertConfig
from ..schema import group
from .base import CalibratedRequest, CalibratedStage

if TYPE_CHECKING:
    from ..model.load import LoadedModel
    from ..moe.prune import ExpertReport


@dataclass
class ExpertsRequest(CalibratedRequest):
    """Remove the lowest-scoring routed experts of every MoE layer (REAP, frequency, EAN); plain transformers loads the result."""

    config: ExpertConfig = group(ExpertConfig)


class ExpertsStage(CalibratedStage):
    name = "experts"
    config_class = ExpertsRequest

    def check_shapes(self, request: ExpertsRequest, skeleton: LoadedModel) -> None:
        """A dense model, group-limited routing and a --keep below the router's top-k stop here, before
        any weight loads."""
        from ..moe.prune import moe_shape

        n_experts, top_k = moe_shape(skeleton.spec, skeleton.model.config)
        request.config.kept_count(n_experts, top_k)

    def apply(self, loaded: LoadedModel, request: ExpertsRequest) -> ExpertReport:
        from ..api import experts

        return experts(loaded, request.config, request.calib, request.engine)

    def rows(self, request: ExpertsRequest, report: ExpertReport) -> list[list[str]]:
        unrouted = sum(len(v) for v in report.unrouted.values())
        return [
            ["method", report.config.method],
            ["experts per MoE layer", f"{report.n_experts_before} -> {report.n_experts_after}"],
            ["MoE layers", str(len(report.kept))],
            ["unrouted experts (scored 0)", str(unrouted)],
            ["time (s)", f"{report.seconds['total']:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]
