"""The ``experts`` stage: remove whole routed experts of a mixture-of-experts model (:func:`secateurs.experts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..data.config import CalibConfig
from ..engine.options import EngineOptions
from ..moe.config import ExpertConfig
from ..schema import group
from .base import Stage, StageConfig
from .flags import check_at_least
from .groups import Evaluation, LoadOptions, evaluation_after, model_argument, out_option

if TYPE_CHECKING:
    from ..model.load import LoadedModel
    from ..moe.prune import ExpertReport


@dataclass
class ExpertsRequest(StageConfig):
    """Remove the lowest-scoring routed experts of every MoE layer (REAP, frequency, EAN); plain transformers loads the result."""

    model: str = model_argument()
    out: str = out_option()
    config: ExpertConfig = group(ExpertConfig)
    calib: CalibConfig = group(CalibConfig, rename={"source": "calib"})
    engine: EngineOptions = group(EngineOptions, exclude=("offload_activations",))
    evaluation: Evaluation = evaluation_after()
    load: LoadOptions = group(LoadOptions)

    def __post_init__(self) -> None:
        """Everything that needs no model, checked once, before any weight loads."""
        self.config.validate()
        self.calib.validate()
        self.engine.torch_device()
        self.evaluation.check()
        check_at_least(1, batch_size=self.engine.batch_size)


class ExpertsStage(Stage):
    name = "experts"
    config_class = ExpertsRequest

    def check_model(self, request: ExpertsRequest, skeleton: LoadedModel | None) -> None:
        """A dense model, group-limited routing and a --keep below the router's top-k stop here, before
        any weight loads."""
        if skeleton is None:
            return
        from ..moe.prune import moe_shape

        n_experts, top_k = moe_shape(skeleton.spec, skeleton.model.config)
        request.config.kept_count(n_experts, top_k)
        request.check_windows(skeleton)

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
