"""The ``prune`` stage: unstructured / N:M sparsity (:func:`secateurs.prune`), in memory, streamed
shard by shard, or split over processes."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

from ..errors import UsageError
from ..sparsity.registry import method_names
from .base import Evaluation, Outcome, Request, Stage, Table
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
    err_console,
    parse_options,
    parse_sparsity,
)

if TYPE_CHECKING:
    from ..api import PruneReport
    from ..model.load import LoadedModel


class PruneStage(Stage):
    name = "prune"

    def parse(
        self,
        model: Model,
        out: Out,
        method: Annotated[str, Help(f"One of: {', '.join(method_names())}.")] = "magnitude",
        sparsity: Annotated[
            str | None,
            Help("Fraction of weights to remove in [0, 1), or one value per block, comma-separated. Default 0.5; N:M implies 1-N/M."),
        ] = None,
        pattern: Annotated[str, Help("unstructured, 2:4, 4:8 or any N:M.")] = "unstructured",
        option: Annotated[list[str] | None, Help("Method option key=value (repeatable).", ("--option", "-o"))] = None,
        allocation: Annotated[
            str, Help("Spread --sparsity over blocks: uniform, owl (outlier-weighted, needs --calib) or atp (rising with depth).")
        ] = "uniform",
        owl_m: Annotated[float, Help("OWL: a weight is an outlier above M × its block's mean Wanda score.")] = 5.0,
        owl_lambda: Annotated[float, Help("OWL: block sparsities stay within target ± lambda.")] = 0.08,
        atp_spread: Annotated[
            float | None, Help("ATP: last block's sparsity minus the first's; default: searched on the calibration loss.")
        ] = None,
        reconstruct: Annotated[
            str | None,
            Help("After each block's masks are fixed, train its kept weights to reproduce the dense block, keeping them only where a held-out calibration share says the block got better (needs --calib): on, or steps=N,lr=X (relative to each matrix's RMS),batch=B,holdout=F,check=K."),
        ] = None,
        permute: Annotated[
            bool, Help("N:M only: permute the MLP's hidden channels before choosing groups (folded back: a plain N:M model).")
        ] = False,
        calib: Annotated[
            str | None,
            Help("Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path. Methods that need data require it."),
        ] = None,
        n_samples: Annotated[int, Help("Calibration sequences.")] = 128,
        seq_len: Annotated[int, Help("Tokens per calibration sequence.")] = 2048,
        seed: Seed = 0,
        data_dir: DataDir = None,
        ppl: EvalPpl = None,
        limit_windows: LimitWindows = None,
        eval_seq_len: EvalSeqLen = 2048,
        device: Device = "auto",
        dtype: Dtype = "float32",
        batch_size: BatchSize = 1,
        offload_activations: Annotated[bool, Help("Keep calibration activations in host memory between blocks.")] = False,
        overwrite: Overwrite = False,
        export: Annotated[
            str, Help("dense: a plain HF folder; sparse: pruned linears stored compressed in the compressed-tensors layout (sparse-24-bitmask / sparse-bitmask), loaded onto the sparse kernels by secateurs.")
        ] = "dense",
        stream: Annotated[
            bool,
            Help("Never hold the whole model: read each block from MODEL's safetensors shards, write it to OUT's when done. Resumable: rerun the same command."),
        ] = False,
        nproc: Annotated[
            int, Help("Processes to split calibration over (one per GPU); launches torchrun. Under torchrun its world size is used.")
        ] = 1,
        trust_remote_code: TrustRemoteCode = False,
    ) -> Request:
        """Prune a model's linears to a sparsity (unstructured or N:M) and save it."""
        from ..api import PruneConfig
        from ..data.calib import CalibConfig
        from ..engine.sequential import EngineOptions
        from ..sparsity.reconstruct import parse_reconstruct

        config = PruneConfig(
            method, parse_sparsity(sparsity), pattern, parse_options(option),
            allocation=allocation,
            allocation_options={"spread": atp_spread} if allocation == "atp" else {"m": owl_m, "lam": owl_lambda},
            reconstruct=parse_reconstruct(reconstruct), permute=permute,
        )
        calib_config = CalibConfig(calib, n_samples, seq_len, seed, data_dir) if calib else None
        config.check(calib_config)
        if config.reconstruct is not None and nproc != 1:
            raise UsageError("--reconstruct runs in one process (its optimiser steps are not shared between ranks); drop --nproc")
        engine = EngineOptions(device=device, batch_size=batch_size, offload_activations=offload_activations)
        engine.torch_device()
        if calib_config:
            calib_config.validate()
        datasets = csv_list(ppl)
        check_eval_flags(datasets, limit_windows, eval_seq_len)
        check_at_least(1, batch_size=batch_size, nproc=nproc)
        if export not in ("dense", "sparse"):
            raise UsageError(f"--export {export!r} is not known; use dense or sparse")
        if stream and (datasets or export != "dense"):
            raise UsageError("--stream writes OUT block by block: drop --ppl / --export sparse, then run secateurs eval on OUT")
        return Request(
            self, model, config, out, calib_config, engine,
            Evaluation(datasets, eval_seq_len, limit_windows, data_dir, device, batch_size),
            dtype, overwrite, trust_remote_code, {"export": export, "stream": stream, "nproc": nproc},
        )

    def check_model(self, request: Request, skeleton: LoadedModel | None) -> None:
        from ..api import check_prune

        check_prune(skeleton, request.config, request.calib)
        if skeleton is not None:
            calib = request.calib
            check_context(skeleton, seq_len=calib.seq_len if calib else None,
                          eval_seq_len=request.evaluation.seq_len if request.evaluation.datasets else None)
            if calib is not None:
                cpu_cost_note(skeleton, request.engine.device, calib.n_samples, calib.seq_len)

    def execute(self, request: Request) -> Outcome | None:
        """Relaunched under torchrun for ``nproc`` > 1; streamed shard by shard with ``stream``."""
        from ..api import prune_streamed
        from ..engine.distributed import DistributedHooks, init_from_env, launched_by_torchrun, relaunch, shutdown

        if request.options["nproc"] != 1 and not launched_by_torchrun():
            relaunch(request.options["nproc"], sys.argv[1:])
            return None
        group = init_from_env(request.engine.torch_device())
        request.options["group"] = group
        if group is not None:
            request.engine.hooks = DistributedHooks(group)
        if not request.options["stream"]:
            return super().execute(request)
        report, path = prune_streamed(request.model, request.out, request.config, request.calib, request.engine,
                                      request.dtype, request.overwrite, group)
        shutdown()
        if path is None:
            return None
        return Outcome([Table(self.title(request), ["", "value"], self.rows(request, report) + [["saved to", str(path)]])], path)

    def apply(self, loaded: LoadedModel, request: Request) -> PruneReport | None:
        from ..api import prune
        from ..engine.distributed import shutdown

        report = prune(loaded, request.config, request.calib, request.engine)
        shutdown()
        group = request.options.get("group")
        return None if group is not None and not group.is_main else report  # every rank holds the same weights

    def rows(self, request: Request, report: PruneReport) -> list[list[str]]:
        return [
            ["method", request.config.method],
            ["pattern", str(report.target.pattern)],
            ["target sparsity (mean)", f"{report.target.mean:.4f}"],
            ["achieved sparsity (mean)", f"{report.achieved:.4f}"],
            ["time (s)", f"{report.seconds:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]

    def records(self, loaded: LoadedModel, request: Request, report: PruneReport) -> tuple[list, list[list[str]]]:
        from ..api import export_sparse

        if request.options["export"] != "sparse":
            return [report], []
        try:
            exported = export_sparse(loaded)
        except UsageError as exc:
            err_console.print(f"[yellow]saving dense:[/] {exc}", highlight=False, soft_wrap=True)
            return [report], []
        sizes = exported["weight_bytes"]
        row = ["export", f"sparse, {len(exported['layers'])} linears at {sizes['compressed'] / sizes['dense']:.3f} of dense bytes"]
        return [report, exported], [row]
