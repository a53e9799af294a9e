"""The ``width`` stage: remove heads / MLP channels (:func:`secateurs.width`) to a smaller dense model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..data.config import CalibConfig
from ..engine.options import EngineOptions
from ..schema import group, help_of, option
from ..structured.config import WidthConfig
from .base import CalibratedStage, StageConfig
from .flags import check_at_least
from .groups import Evaluation, LoadOptions, evaluation_after, model_argument, out_option

if TYPE_CHECKING:
    from ..model.load import LoadedModel
    from ..structured.base import WidthReport


@dataclass
class WidthCalibration:
    """Width calibration: the method's paper's sample count and length unless given (so not a
    :class:`CalibConfig`, whose defaults are the unstructured papers' 128 × 2048)."""

    source: str = option(CalibConfig.source, "Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path.")
    n_samples: int | None = option(None, "Calibration sequences (default: the method's paper default).")
    seq_len: int | None = option(None, "Tokens per calibration sequence (default 128, as in the papers).")
    seed: int = option(CalibConfig.seed, help_of(CalibConfig, "seed"))


@dataclass
class WidthRequest(StageConfig):
    """Remove whole attention heads and MLP channels; save a smaller dense model."""

    model: str = model_argument()
    out: str = out_option()
    config: WidthConfig = group(WidthConfig)
    calibration: WidthCalibration = group(WidthCalibration, rename={"source": "calib"})
    engine: EngineOptions = group(EngineOptions, exclude=("batch_size", "offload_activations"))
    evaluation: Evaluation = evaluation_after(("before", "batch_size"), "After pruning, measure perplexity on these datasets.")
    load: LoadOptions = group(LoadOptions)
    save_format: str = option(
        "hf", "hf (transformers; per-layer widths through secateurs' own class) or deci (the block_configs layout "
        "vLLM and llama.cpp run: Llama-family, FFN widths in multiples of 256, one query head count; else hf, said in one line).",
    )
    calib: CalibConfig | None = field(init=False, default=None)  # the method's, set from ``calibration``

    def __post_init__(self) -> None:
        """The method's calibration and everything that needs no model, checked once before any weight loads."""
        from ..model.save import check_save_format
        from ..structured.registry import method_class

        check_save_format(self.save_format)
        config, given = self.config, self.calibration
        method_class(config.method)(config)
        self.calib = config.calibration(given.source, given.n_samples, given.seq_len, given.seed, self.evaluation.data_dir)
        if self.calib is not None:
            self.calib.validate()
        self.engine.torch_device()
        self.evaluation.check()
        check_at_least(0, keep_first=config.keep_first, keep_last=config.keep_last)
        check_at_least(1, round_to=config.round_to)


class WidthStage(CalibratedStage):
    name = "width"
    config_class = WidthRequest

    def check_shapes(self, request: WidthRequest, skeleton: LoadedModel) -> None:
        from ..model.save import check_save_format

        check_save_format(request.save_format, skeleton.model.config)  # a non-Llama model, before pruning it

    def apply(self, loaded: LoadedModel, request: WidthRequest) -> WidthReport:
        from ..api import width

        return width(loaded, request.config, request.calib, request.engine)

    def rows(self, request: WidthRequest, report: WidthReport) -> list[list[str]]:
        return [
            ["method", f"{request.config.method} ({report.importance or 'its metric'}, {request.config.mode})"],
            *[[f"{kind} removed (achieved)", f"{value:.4f}"] for kind, value in report.achieved().items()],
            ["parameters", f"{report.params_before:,} → {report.params_after:,} (−{report.reduction:.2%})"],
            ["per-layer widths (plain transformers: trust_remote_code)", "yes" if report.per_layer_config else "no"],
            ["time (s)", f"{report.seconds:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]
