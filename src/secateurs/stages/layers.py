"""The ``layers`` stage: remove whole decoder layers (:func:`secateurs.prune_layers`), optionally compensated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..data.config import CalibConfig
from ..depth.config import LayerConfig
from ..errors import UsageError
from ..schema import group
from .base import CalibratedRequest, CalibratedStage

if TYPE_CHECKING:
    from ..depth.prune import LayerReport
    from ..model.load import LoadedModel


@dataclass
class LayersRequest(CalibratedRequest):
    """Remove N decoder layers chosen by a criterion; the result is a smaller model that plain transformers loads."""

    config: LayerConfig = group(LayerConfig, rename={"options": "option", "compensation": "compensation_option"},
                                required=("remove",))
    calib: CalibConfig = group(
        CalibConfig, rename={"source": "calib"},
        help={"source": "Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path.",
              "n_samples": "Calibration sequences (GradMAP: 128)."},
    )


class LayersStage(CalibratedStage):
    name = "layers"
    config_class = LayersRequest

    def check_shapes(self, request: LayersRequest, skeleton: LoadedModel) -> None:
        remove = request.config.remove
        n_layers = skeleton.spec.num_layers(skeleton.model.config)
        if remove >= n_layers:
            raise UsageError(f"--remove {remove} would leave no layers: the model has {n_layers}; remove at most {n_layers - 1}")

    def apply(self, loaded: LoadedModel, request: LayersRequest) -> LayerReport:
        from ..api import prune_layers

        return prune_layers(loaded, request.config, request.calib, request.engine)

    def rows(self, request: LayersRequest, report: LayerReport) -> list[list[str]]:
        return [
            ["method", report.config.method],
            ["layers", f"{report.n_layers_before} -> {report.n_layers_before - len(report.removed)}"],
            ["removed (original indices)", ", ".join(map(str, report.removed))],
            ["compensated layer", str(report.compensation["layer"]) if report.compensation else "-"],
            ["time (s)", f"{report.seconds['total']:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]
