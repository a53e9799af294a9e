"""``secateurs layers``: remove whole decoder layers (depth pruning), optionally compensated."""

from __future__ import annotations

from typing import Annotated

import typer

from ..api import evaluate_perplexity, save
from ..data.calib import CalibConfig
from ..depth.plot import score_plot
from ..depth.prune import LayerConfig, prune_layers
from ..depth.registry import scorer_names
from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..model.load import load_model
from ..model.save import check_out
from . import app
from .common import BatchSize, DataDir, Device, Dtype, EvalPpl, EvalSeqLen, LimitWindows, Overwrite, Seed, TrustRemoteCode, check_at_least, check_context, check_eval_flags, check_out_folder, cpu_cost_note, csv_list, friendly, out_console, parse_options, perplexity_rows, preflight, ready, table


@app.command("layers")
@friendly
def layers_command(
    model: Annotated[str, typer.Argument(help="HF folder, hub id, .gguf file, or smollm2-135m.")],
    out: Annotated[str, typer.Option("--out", help="Output folder (written atomically).")],
    remove: Annotated[int, typer.Option("--remove", help="Number of decoder layers to remove.")],
    method: Annotated[str, typer.Option(help=f"Layer criterion: {', '.join(scorer_names())}.")] = "gradmap",
    compensate: Annotated[
        bool, typer.Option("--compensate", help="Fit GradMAP's projection compensation and fold it into a down projection.")
    ] = False,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Criterion option key=value (repeatable).")
    ] = None,
    compensation_option: Annotated[
        list[str] | None, typer.Option("--compensation-option", help="Compensation option key=value (shift, alpha, select, accept).")
    ] = None,
    calib: Annotated[str, typer.Option(help="Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path.")] = "wikitext2",
    n_samples: Annotated[int, typer.Option(help="Calibration sequences (GradMAP: 128).")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 2048,
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
) -> None:
    """Remove N decoder layers chosen by a criterion; the result is a smaller model that plain transformers loads."""
    config = LayerConfig(method, remove, compensate, parse_options(option), parse_options(compensation_option))
    config.validate()
    calib_config = CalibConfig(calib, n_samples, seq_len, seed, data_dir)
    calib_config.validate()
    engine = EngineOptions(device=device, batch_size=batch_size)
    engine.torch_device()
    check_eval_flags(csv_list(ppl), limit_windows, eval_seq_len)
    check_at_least(1, batch_size=batch_size)
    check_out_folder(out, model, overwrite, dtype)
    skeleton = preflight(model, trust_remote_code)
    if skeleton is not None:
        n_layers = skeleton.spec.num_layers(skeleton.model.config)
        if remove >= n_layers:
            raise UsageError(f"--remove {remove} would leave no layers: the model has {n_layers}; remove at most {n_layers - 1}")
        check_context(skeleton, seq_len=seq_len, eval_seq_len=eval_seq_len if ppl else None)
        cpu_cost_note(skeleton, device, n_samples, seq_len)
    ready()
    loaded = load_model(model, dtype, trust_remote_code)
    check_out(out, loaded.local_path, overwrite)
    report = prune_layers(loaded, config, calib_config, engine)
    rows = [
        ["method", method],
        ["layers", f"{report.n_layers_before} -> {report.n_layers_before - len(report.removed)}"],
        ["removed (original indices)", ", ".join(map(str, report.removed))],
        ["compensated layer", str(report.compensation["layer"]) if report.compensation else "-"],
        ["time (s)", f"{report.seconds['total']:.1f}"],
        ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
    ]
    results = {}
    new_rows, new_results = perplexity_rows(evaluate_perplexity(loaded, csv_list(ppl), eval_seq_len, limit_windows, data_dir, device, batch_size))
    rows += new_rows
    results.update(new_results)
    plot = score_plot({method: report.first_scores()}, {method: report.removed}, report.n_layers_before)
    path = save(loaded, out, [report.stage_record()], results, overwrite, extras={"layer_scores.png": plot})
    rows.append(["saved to", str(path)])
    out_console.print(table("secateurs layers", ["", "value"], rows))
