"""``secateurs prune``: unstructured / N:M sparsity, block by block, saved as an HF folder."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..api import PruneConfig, PruneReport, check_prune, evaluate_perplexity, export_sparse, prune, prune_streamed, save
from ..data.calib import CalibConfig
from ..engine.distributed import DistributedHooks, init_from_env, launched_by_torchrun, relaunch, shutdown
from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..model.load import load_model
from ..model.save import check_out
from ..sparsity.reconstruct import parse_reconstruct
from ..sparsity.registry import method_names
from . import app
from .common import BatchSize, DataDir, Device, Dtype, EvalPpl, EvalSeqLen, LimitWindows, Overwrite, Seed, TrustRemoteCode, check_at_least, check_context, check_eval_flags, check_out_folder, cpu_cost_note, csv_list, err_console, friendly, out_console, parse_options, parse_sparsity, perplexity_rows, preflight, ready, table


@app.command("prune")
@friendly
def prune_command(
    model: Annotated[str, typer.Argument(help="HF folder, hub id, .gguf file, or smollm2-135m.")],
    out: Annotated[str, typer.Option("--out", help="Output folder (written atomically).")],
    method: Annotated[str, typer.Option(help=f"One of: {', '.join(method_names())}.")] = "magnitude",
    sparsity: Annotated[
        str | None,
        typer.Option(help="Fraction of weights to remove in [0, 1), or one value per block, comma-separated. Default 0.5; N:M implies 1-N/M."),
    ] = None,
    pattern: Annotated[str, typer.Option(help="unstructured, 2:4, 4:8 or any N:M.")] = "unstructured",
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Method option key=value (repeatable).")
    ] = None,
    allocation: Annotated[
        str, typer.Option(help="Spread --sparsity over blocks: uniform, owl (outlier-weighted, needs --calib) or atp (rising with depth).")
    ] = "uniform",
    owl_m: Annotated[float, typer.Option(help="OWL: a weight is an outlier above M × its block's mean Wanda score.")] = 5.0,
    owl_lambda: Annotated[float, typer.Option(help="OWL: block sparsities stay within target ± lambda.")] = 0.08,
    atp_spread: Annotated[
        float | None,
        typer.Option(help="ATP: last block's sparsity minus the first's; default: searched on the calibration loss."),
    ] = None,
    reconstruct: Annotated[
        str | None,
        typer.Option(help="After each block's masks are fixed, train its kept weights to reproduce the dense block (needs --calib): on, or steps=N,lr=X,batch=B."),
    ] = None,
    permute: Annotated[
        bool, typer.Option(help="N:M only: permute the MLP's hidden channels before choosing groups (folded back: a plain N:M model).")
    ] = False,
    calib: Annotated[
        str | None,
        typer.Option(help="Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path. Methods that need data require it."),
    ] = None,
    n_samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 2048,
    seed: Seed = 0,
    data_dir: DataDir = None,
    ppl: EvalPpl = None,
    limit_windows: LimitWindows = None,
    eval_seq_len: EvalSeqLen = 2048,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 1,
    offload_activations: Annotated[
        bool, typer.Option(help="Keep calibration activations in host memory between blocks.")
    ] = False,
    overwrite: Overwrite = False,
    export: Annotated[
        str, typer.Option(help="dense: a plain HF folder; sparse: pruned linears stored compressed (2:4 / bitmap), load with secateurs.")
    ] = "dense",
    stream: Annotated[
        bool,
        typer.Option(help="Never hold the whole model: read each block from MODEL's safetensors shards, write it to OUT's when done. Resumable: rerun the same command."),
    ] = False,
    nproc: Annotated[
        int, typer.Option(help="Processes to split calibration over (one per GPU); launches torchrun. Under torchrun its world size is used.")
    ] = 1,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Prune a model's linears to a sparsity (unstructured or N:M) and save it."""
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
    check_eval_flags(csv_list(ppl), limit_windows, eval_seq_len)
    check_at_least(1, batch_size=batch_size, nproc=nproc)
    if export not in ("dense", "sparse"):
        raise UsageError(f"--export {export!r} is not known; use dense or sparse")
    if stream and (csv_list(ppl) or export != "dense"):
        raise UsageError("--stream writes OUT block by block: drop --ppl / --export sparse, then run secateurs eval on OUT")
    check_out_folder(out, model, overwrite, dtype)
    skeleton = preflight(model, trust_remote_code)
    check_prune(skeleton, config, calib_config)
    if skeleton is not None:
        check_context(skeleton, seq_len=seq_len if calib_config else None, eval_seq_len=eval_seq_len if ppl else None)
        if calib_config is not None:
            cpu_cost_note(skeleton, device, n_samples, seq_len)
    ready()
    if nproc != 1 and not launched_by_torchrun():
        relaunch(nproc, sys.argv[1:])
        return
    group = init_from_env(engine.torch_device())
    if group is not None:
        engine.hooks = DistributedHooks(group)
    if stream:
        report, path = prune_streamed(model, out, config, calib_config, engine, dtype, overwrite, group)
        if path is not None:
            out_console.print(table("secateurs prune", ["", "value"], _summary(method, report) + [["saved to", str(path)]]))
        shutdown()
        return
    loaded = load_model(model, dtype, trust_remote_code)
    check_out(out, loaded.local_path, overwrite)
    report = prune(loaded, config, calib_config, engine)
    shutdown()
    if group is not None and not group.is_main:
        return  # every rank holds the same weights; rank 0 evaluates and writes
    results = {}
    rows = _summary(method, report)
    datasets = csv_list(ppl)
    if datasets:
        measured = evaluate_perplexity(loaded, datasets, eval_seq_len, limit_windows, data_dir, device, batch_size)
        new_rows, new_results = perplexity_rows(measured)
        rows += new_rows
        results.update(new_results)
    stages = [report.stage_record()]
    if export == "sparse":
        try:
            stages.append(export_sparse(loaded))
        except UsageError as exc:
            err_console.print(f"[yellow]saving dense:[/] {exc}", highlight=False, soft_wrap=True)
        else:
            sizes = stages[-1]["weight_bytes"]
            rows.append(["export", f"sparse, {len(stages[-1]['layers'])} linears at {sizes['compressed'] / sizes['dense']:.3f} of dense bytes"])
    path = save(loaded, out, stages, results, overwrite)
    rows.append(["saved to", str(path)])
    out_console.print(table("secateurs prune", ["", "value"], rows))


def _summary(method: str, report: PruneReport) -> list[list[str]]:
    return [
        ["method", method],
        ["pattern", str(report.target.pattern)],
        ["target sparsity (mean)", f"{report.target.mean:.4f}"],
        ["achieved sparsity (mean)", f"{report.achieved:.4f}"],
        ["time (s)", f"{report.seconds:.1f}"],
        ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
    ]
