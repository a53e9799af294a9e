"""The ``shear`` stage: targeted structured pruning to a chosen shape (:func:`secateurs.shear`,
LLM-Shearing), then continued pretraining with dynamic batch loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.sources import check_name
from ..engine.options import EngineOptions
from ..errors import UsageError
from ..files import check_writable
from ..schema import group, option
from ..structured.config import ShearConfig
from .base import Stage, StageConfig
from .flags import check_context
from .groups import Evaluation, LoadOptions, evaluation_after, model_argument, out_option

if TYPE_CHECKING:
    from ..model.load import LoadedModel
    from ..structured.shearing import ShearReport


@dataclass
class ShearRequest(StageConfig):
    """Prune to a chosen architecture with learned L0 masks; save a plain, smaller transformers model."""

    model: str = model_argument()
    out: str = out_option()
    target: str | None = option(None, "Target shape, e.g. layers=24,hidden=528,heads=6,kv_heads=2,intermediate=1344.")
    target_config: str | None = option(None, "JSON file with the target sizes (our keys or a transformers config's).")
    config: ShearConfig = group(ShearConfig, rename={"datasets": "data"}, exclude=("target",))
    engine: EngineOptions = group(EngineOptions, exclude=("batch_size", "offload_activations"))
    evaluation: Evaluation = evaluation_after(("before", "batch_size"), "After shearing, measure perplexity on these datasets.")
    load: LoadOptions = group(LoadOptions)

    def __post_init__(self) -> None:
        """The target shape (from --target or --target-config) and every check that needs no model."""
        from ..structured.shearing import ShearTarget

        if self.config.target is None:
            if (self.target is None) == (self.target_config is None):
                raise UsageError("give exactly one of --target layers=...,hidden=... or --target-config FILE.json")
            self.config.target = (ShearTarget.parse(self.target) if self.target is not None
                                  else ShearTarget.from_json(self.target_config))
        for name in self.config.datasets:
            check_name(name)
        self.config.validate()
        self.engine.torch_device()
        self.evaluation.check()


class ShearStage(Stage):
    name = "shear"
    config_class = ShearRequest

    def check_files(self, request: ShearRequest) -> None:
        from ..training.checkpoint import check_checkpoints
        from ..structured.shearing import CONTINUE_CHECKPOINT, PRUNE_CHECKPOINT

        checkpoint_dir = request.config.checkpoint_dir
        if checkpoint_dir:
            folder = Path(checkpoint_dir).expanduser()
            check_checkpoints([folder / PRUNE_CHECKPOINT, folder / CONTINUE_CHECKPOINT])
            check_writable(folder.resolve() / PRUNE_CHECKPOINT, f"--checkpoint-dir {checkpoint_dir}")

    def check_model(self, request: ShearRequest, skeleton: LoadedModel | None) -> None:
        check_context(skeleton, seq_len=request.config.seq_len,
                      eval_seq_len=request.evaluation.seq_len if request.evaluation.datasets else None)

    def apply(self, loaded: LoadedModel, request: ShearRequest) -> ShearReport:
        from ..api import shear

        return shear(loaded, request.config, request.engine)

    def rows(self, request: ShearRequest, report: ShearReport) -> list[list[str]]:
        plan = report.plan
        weights = (report.continue_log or report.prune_log).domain_weights[-1]
        return [
            *[[label, f"{plan.source[kind]} → {plan.target[kind]}"] for kind, label in
              (("layers", "layers"), ("hidden", "hidden"), ("heads", "KV heads"), ("channels", "intermediate"))],
            ["query heads", f"{plan.source['heads'] * plan.per_group} → {plan.target['heads'] * plan.per_group}"],
            ["block parameters", f"{report.params_before:,} → {report.params_after:,} ({report.params_after / report.params_before:.1%})"],
            ["tokens (mask learning + continued)", f"{report.prune_log.tokens:,} + {report.continue_log.tokens if report.continue_log else 0:,}"],
            ["final domain weights", ", ".join(f"{n}={w:.3f}" for n, w in zip(request.config.datasets, weights))],
            ["time (s)", f"{report.seconds:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]
