"""The ``width`` stage: remove heads / MLP channels (:func:`secateurs.width`) to a smaller dense model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from ..structured.registry import method_names
from .base import Evaluation, Request, Stage
from .flags import (
    DataDir,
    Device,
    Dtype,
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
)

if TYPE_CHECKING:
    from ..model.load import LoadedModel
    from ..structured.base import WidthReport


class WidthStage(Stage):
    name = "width"

    def parse(
        self,
        model: Model,
        out: Out,
        method: Annotated[str, Help(f"One of: {', '.join(method_names())}.")] = "llm-pruner",
        ratio: Annotated[
            float,
            Help("uniform: fraction of each targeted kind's groups removed per layer (rounded to whole groups); global: fraction of the targeted parameters."),
        ] = 0.2,
        importance: Annotated[
            str | None, Help("llm-pruner: taylor (default), vector, hessian; magnitude: l2 (default), l1.")
        ] = None,
        aggregate: Annotated[str, Help("Combine a group's per-linear scores: sum, prod or max.")] = "sum",
        target: Annotated[str, Help("heads (KV groups under GQA), channels (MLP) or both.")] = "both",
        mode: Annotated[str, Help("uniform (same ratio per layer) or global (one ranking across layers).")] = "uniform",
        keep_first: Annotated[int, Help("Leave the first N layers whole (LLM-Pruner uses 4 on LLaMA-7B).")] = 0,
        keep_last: Annotated[int, Help("Leave the last N layers whole (LLM-Pruner uses 2 on LLaMA-7B).")] = 0,
        bias_compensation: Annotated[bool, Help("FLAP: fold removed features' mean into the output bias.")] = True,
        round_to: Annotated[
            int, Help("Keep a multiple of N MLP channels per layer (8 or 16: faster matrix products; uniform mode).")
        ] = 1,
        calib: Annotated[str, Help("Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path.")] = "wikitext2",
        n_samples: Annotated[int | None, Help("Calibration sequences (default: the method's paper default).")] = None,
        seq_len: Annotated[int | None, Help("Tokens per calibration sequence (default 128, as in the papers).")] = None,
        seed: Seed = 0,
        data_dir: DataDir = None,
        ppl: Annotated[str | None, Help("After pruning, measure perplexity on these datasets.")] = None,
        limit_windows: LimitWindows = None,
        eval_seq_len: EvalSeqLen = 2048,
        device: Device = "auto",
        dtype: Dtype = "float32",
        overwrite: Overwrite = False,
        trust_remote_code: TrustRemoteCode = False,
    ) -> Request:
        """Remove whole attention heads and MLP channels; save a smaller dense model."""
        from ..engine.sequential import EngineOptions
        from ..structured.base import WidthConfig, method_class

        config = WidthConfig(
            method, ratio, importance, aggregate, target, mode, keep_first, keep_last, bias_compensation, round_to
        )
        method_class(method)(config)
        calib_config = config.calibration(calib, n_samples, seq_len, seed, data_dir)
        if calib_config is not None:
            calib_config.validate()
        engine = EngineOptions(device=device)
        engine.torch_device()
        datasets = csv_list(ppl)
        check_eval_flags(datasets, limit_windows, eval_seq_len)
        check_at_least(0, keep_first=keep_first, keep_last=keep_last)
        check_at_least(1, round_to=round_to)
        return Request(self, model, config, out, calib_config, engine,
                       Evaluation(datasets, eval_seq_len, limit_windows, data_dir, device),
                       dtype, overwrite, trust_remote_code)

    def check_model(self, request: Request, skeleton: LoadedModel | None) -> None:
        if skeleton is None:
            return
        calib = request.calib
        check_context(skeleton, seq_len=calib.seq_len if calib else None,
                      eval_seq_len=request.evaluation.seq_len if request.evaluation.datasets else None)
        if calib is not None:
            cpu_cost_note(skeleton, request.engine.device, calib.n_samples, calib.seq_len)

    def apply(self, loaded: LoadedModel, request: Request) -> WidthReport:
        from ..api import width

        return width(loaded, request.config, request.calib, request.engine)

    def rows(self, request: Request, report: WidthReport) -> list[list[str]]:
        return [
            ["method", f"{request.config.method} ({report.importance or 'its metric'}, {request.config.mode})"],
            *[[f"{kind} removed (achieved)", f"{value:.4f}"] for kind, value in report.achieved().items()],
            ["parameters", f"{report.params_before:,} → {report.params_after:,} (−{report.reduction:.2%})"],
            ["per-layer widths (plain transformers: trust_remote_code)", "yes" if report.per_layer_config else "no"],
            ["time (s)", f"{report.seconds:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]
