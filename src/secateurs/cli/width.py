"""``secateurs width``: structured width pruning (heads / MLP channels) to a smaller dense model."""

from __future__ import annotations

from typing import Annotated

import typer

from ..api import evaluate_perplexity, save, width
from ..data.calib import CalibConfig
from ..engine.sequential import EngineOptions
from ..model.load import load_model
from ..model.save import check_out
from ..structured.base import WidthConfig, method_class, method_names
from . import app
from .common import DataDir, Device, Dtype, EvalSeqLen, LimitWindows, Overwrite, Seed, TrustRemoteCode, check_at_least, check_context, check_eval_flags, check_out_folder, cpu_cost_note, csv_list, friendly, out_console, perplexity_rows, preflight, ready, table


@app.command("width")
@friendly
def width_command(
    model: Annotated[str, typer.Argument(help="HF folder, hub id, .gguf file, or smollm2-135m.")],
    out: Annotated[str, typer.Option("--out", help="Output folder (written atomically).")],
    method: Annotated[str, typer.Option(help=f"One of: {', '.join(method_names())}.")] = "llm-pruner",
    ratio: Annotated[
        float,
        typer.Option(help="uniform: fraction of each targeted kind's groups removed per layer (rounded to whole groups); global: fraction of the targeted parameters."),
    ] = 0.2,
    importance: Annotated[
        str | None, typer.Option(help="llm-pruner: taylor (default), vector, hessian; magnitude: l2 (default), l1.")
    ] = None,
    aggregate: Annotated[str, typer.Option(help="Combine a group's per-linear scores: sum, prod or max.")] = "sum",
    target: Annotated[str, typer.Option(help="heads (KV groups under GQA), channels (MLP) or both.")] = "both",
    mode: Annotated[str, typer.Option(help="uniform (same ratio per layer) or global (one ranking across layers).")] = "uniform",
    keep_first: Annotated[int, typer.Option(help="Leave the first N layers whole (LLM-Pruner uses 4 on LLaMA-7B).")] = 0,
    keep_last: Annotated[int, typer.Option(help="Leave the last N layers whole (LLM-Pruner uses 2 on LLaMA-7B).")] = 0,
    bias_compensation: Annotated[bool, typer.Option(help="FLAP: fold removed features' mean into the output bias.")] = True,
    round_to: Annotated[
        int, typer.Option(help="Keep a multiple of N MLP channels per layer (8 or 16: faster matrix products; uniform mode).")
    ] = 1,
    calib: Annotated[str, typer.Option(help="Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path.")] = "wikitext2",
    n_samples: Annotated[int | None, typer.Option(help="Calibration sequences (default: the method's paper default).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per calibration sequence (default 128, as in the papers).")] = None,
    seed: Seed = 0,
    data_dir: DataDir = None,
    ppl: Annotated[str | None, typer.Option(help="After pruning, measure perplexity on these datasets.")] = None,
    limit_windows: LimitWindows = None,
    eval_seq_len: EvalSeqLen = 2048,
    device: Device = "auto",
    dtype: Dtype = "float32",
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Remove whole attention heads and MLP channels; save a smaller dense model."""
    config = WidthConfig(
        method, ratio, importance, aggregate, target, mode, keep_first, keep_last, bias_compensation, round_to
    )
    cls = method_class(method)
    cls(config)
    calib_config = None
    if cls.needs_calibration:
        calib_config = CalibConfig(
            calib, n_samples or cls.default_samples, seq_len or cls.default_seq_len, seed, data_dir
        )
        calib_config.validate()
    engine = EngineOptions(device=device)
    engine.torch_device()
    check_eval_flags(csv_list(ppl), limit_windows, eval_seq_len)
    check_at_least(0, keep_first=keep_first, keep_last=keep_last)
    check_at_least(1, round_to=round_to)
    check_out_folder(out, model, overwrite, dtype)
    skeleton = preflight(model, trust_remote_code)
    if skeleton is not None:
        check_context(skeleton, seq_len=calib_config.seq_len if calib_config else None, eval_seq_len=eval_seq_len if ppl else None)
        if calib_config is not None:
            cpu_cost_note(skeleton, device, calib_config.n_samples, calib_config.seq_len)
    ready()
    loaded = load_model(model, dtype, trust_remote_code)
    check_out(out, loaded.local_path, overwrite)
    report = width(loaded, config, calib_config, engine)
    achieved = report.achieved()
    rows = [
        ["method", f"{method} ({report.importance or 'its metric'}, {mode})"],
        *[[f"{kind} removed (achieved)", f"{value:.4f}"] for kind, value in achieved.items()],
        ["parameters", f"{report.params_before:,} → {report.params_after:,} (−{report.reduction:.2%})"],
        ["per-layer widths (plain transformers: trust_remote_code)", "yes" if report.per_layer_config else "no"],
        ["time (s)", f"{report.seconds:.1f}"],
        ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
    ]
    results = {}
    new_rows, new_results = perplexity_rows(evaluate_perplexity(loaded, csv_list(ppl), eval_seq_len, limit_windows, data_dir, device))
    rows += new_rows
    results.update(new_results)
    path = save(loaded, out, [report.stage_record()], results, overwrite)
    rows.append(["saved to", str(path)])
    out_console.print(table("secateurs width", ["", "value"], rows))
