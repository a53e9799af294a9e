"""The ``layers`` stage: remove whole decoder layers (:func:`secateurs.prune_layers`), optionally compensated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from ..depth.registry import scorer_names
from ..errors import UsageError
from .base import Evaluation, Request, Stage
from .flags import (
    BatchSize,
    DataDir,
    Device,
    Dtype,
    EvalPpl,
    EvalSeqLen,
    Help,
    LimitWindows,
    Model,
    Out,
    Overwrite,
    Seed,
    TrustRemoteCode,
    check_at_least,
    check_context,
    check_eval_flags,
    cpu_cost_note,
    csv_list,
    parse_options,
)

if TYPE_CHECKING:
    from ..depth.prune import LayerReport
    from ..model.load import LoadedModel


class LayersStage(Stage):
    name = "layers"

    def parse(
        self,
        model: Model,
        out: Out,
        remove: Annotated[int, Help("Number of decoder layers to remove.", ("--remove",))],
        method: Annotated[str, Help(f"Layer criterion: {', '.join(scorer_names())}.")] = "gradmap",
        compensate: Annotated[
            bool, Help("Fit GradMAP's projection compensation and fold it into a down projection.", ("--compensate",))
        ] = False,
        option: Annotated[list[str] | None, Help("Criterion option key=value (repeatable).", ("--option", "-o"))] = None,
        compensation_option: Annotated[
            list[str] | None,
            Help("Compensation option key=value (shift, alpha, select, accept).", ("--compensation-option",)),
        ] = None,
        calib: Annotated[str, Help("Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path.")] = "wikitext2",
        n_samples: Annotated[int, Help("Calibration sequences (GradMAP: 128).")] = 128,
        seq_len: Annotated[int, Help("Tokens per calibration sequence.")] = 2048,
        seed: Seed = 0,
        data_dir: DataDir = None,
        ppl: EvalPpl = None,
        limit_windows: LimitWindows = None,
        eval_seq_len: EvalSeqLen = 2048,
        device: Device = "auto",
        dtype: Dtype = "float32",
        batch_size: BatchSize = 1,
        overwrite: Overwrite = False,
        trust_remote_code: TrustRemoteCode = False,
    ) -> Request:
        """Remove N decoder layers chosen by a criterion; the result is a smaller model that plain transformers loads."""
        from ..data.calib import CalibConfig
        from ..depth.prune import LayerConfig
        from ..engine.sequential import EngineOptions

        config = LayerConfig(method, remove, compensate, parse_options(option), parse_options(compensation_option))
        config.validate()
        calib_config = CalibConfig(calib, n_samples, seq_len, seed, data_dir)
        calib_config.validate()
        engine = EngineOptions(device=device, batch_size=batch_size)
        engine.torch_device()
        datasets = csv_list(ppl)
        check_eval_flags(datasets, limit_windows, eval_seq_len)
        check_at_least(1, batch_size=batch_size)
        return Request(self, model, config, out, calib_config, engine,
                       Evaluation(datasets, eval_seq_len, limit_windows, data_dir, device, batch_size),
                       dtype, overwrite, trust_remote_code)

    def check_model(self, request: Request, skeleton: LoadedModel | None) -> None:
        if skeleton is None:
            return
        remove = request.config.remove
        n_layers = skeleton.spec.num_layers(skeleton.model.config)
        if remove >= n_layers:
            raise UsageError(f"--remove {remove} would leave no layers: the model has {n_layers}; remove at most {n_layers - 1}")
        calib = request.calib
        check_context(skeleton, seq_len=calib.seq_len, eval_seq_len=request.evaluation.seq_len if request.evaluation.datasets else None)
        cpu_cost_note(skeleton, request.engine.device, calib.n_samples, calib.seq_len)

    def apply(self, loaded: LoadedModel, request: Request) -> LayerReport:
        from ..api import prune_layers

        return prune_layers(loaded, request.config, request.calib, request.engine)

    def rows(self, request: Request, report: LayerReport) -> list[list[str]]:
        return [
            ["method", report.config.method],
            ["layers", f"{report.n_layers_before} -> {report.n_layers_before - len(report.removed)}"],
            ["removed (original indices)", ", ".join(map(str, report.removed))],
            ["compensated layer", str(report.compensation["layer"]) if report.compensation else "-"],
            ["time (s)", f"{report.seconds['total']:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]
