"""The ``experts`` stage: remove whole routed experts of a mixture-of-experts model (:func:`secateurs.experts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..moe.config import ExpertConfig
from ..schema import group, option
from .base import CalibratedRequest, CalibratedStage, Outcome, Table

if TYPE_CHECKING:
    from ..model.load import LoadedModel
    from ..moe.prune import ExpertReport


@dataclass
class ExpertsRequest(CalibratedRequest):
    """Remove the lowest-scoring routed experts of every MoE layer (REAP, frequency, EAN); plain transformers loads the result."""

    config: ExpertConfig = group(ExpertConfig)
    stream: bool = option(
        False,
        "Never hold the whole model: score each block as it is read from MODEL's safetensors shards, then read "
        "each again, cut its experts and write it to OUT. Resumable: rerun the same command.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stream and self.evaluation.datasets:
            raise UsageError("--stream writes OUT block by block: drop --ppl, then run secateurs eval on OUT")


class ExpertsStage(CalibratedStage):
    name = "experts"
    config_class = ExpertsRequest

    def check_shapes(self, request: ExpertsRequest, skeleton: LoadedModel) -> None:
        """A dense model, a --keep below the router's top-k (or, under group-limited routing, below what
        each group needs), and calibration too short to reach every expert stop here, before any
        weight loads."""
        from ..moe.prune import moe_shape

        shape = moe_shape(skeleton.spec, skeleton.model.config)
        shape.kept(request.config)
        shape.check_calibration(request.calib.n_samples * request.calib.seq_len)

    def execute(self, request: ExpertsRequest) -> Outcome | None:
        """Streamed shard by shard with ``stream``; else the shared load → verb → evaluate → save."""
        if not request.stream:
            return super().execute(request)
        from ..api import experts_streamed

        report, path = experts_streamed(request.model, request.out, request.config, request.calib, request.engine,
                                        request.dtype, request.overwrite)
        rows = self.rows(request, report) + [["saved to", str(path)]]
        return Outcome([Table(self.title(request), ["", "value"], rows)], path)

    def apply(self, loaded: LoadedModel, request: ExpertsRequest) -> ExpertReport:
        from ..api import experts

        return experts(loaded, request.config, request.calib, request.engine)

    def rows(self, request: ExpertsRequest, report: ExpertReport) -> list[list[str]]:
        unrouted = sum(len(v) for v in report.unrouted.values())
        return [
            ["method", report.config.method],
            ["experts per MoE layer", f"{report.n_experts_before} -> "
             + ("/".join(str(len(v)) for v in report.kept.values()) if report.config.mode == "global"
                else str(report.n_experts_after))],
            ["MoE layers", str(len(report.kept))],
            ["unrouted experts (scored 0)", str(unrouted)],
            *([["experts merged into kept ones", str(sum(len(v) for f in report.merged.values() for v in f.values()))]]
              if report.config.merge else []),
            ["time (s)", f"{report.seconds['total']:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]
