"""``secateurs eval``: perplexity and zero-shot accuracy (lm-eval) of a model, original or pruned."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..api import evaluate_perplexity
from ..errors import UsageError
from ..evaluate.zeroshot import PAPER_TASKS, ZeroShot, check_tasks, zero_shot
from ..model.load import load_model
from ..model.save import write_output_file
from . import app
from .common import BatchSize, DataDir, Device, Dtype, LimitWindows, TrustRemoteCode, check_at_least, check_context, check_eval_flags, check_json_out, csv_list, err_console, friendly, out_console, preflight, ready, table


@app.command("eval")
@friendly
def eval_command(
    model: Annotated[str, typer.Argument(help="HF folder (e.g. a secateurs OUT), hub id, .gguf file, or smollm2-135m.")],
    ppl: Annotated[
        str | None,
        typer.Option(help="Datasets, comma-separated: wikitext2, ptb, c4, or .txt/.jsonl paths. Default wikitext2, none with --tasks."),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help=f"Zero-shot lm-eval tasks, comma-separated, e.g. {','.join(PAPER_TASKS)}."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score only the first N documents of each zero-shot task.")] = None,
    seq_len: Annotated[int, typer.Option(help="Window length (papers use 2048 or the model's context).")] = 2048,
    limit_windows: LimitWindows = None,
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 1,
    json_out: Annotated[str | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Measure perplexity (non-overlapping windows over the joined test split) and zero-shot accuracy."""
    task_names = csv_list(tasks)
    if tasks is not None and not task_names:
        raise UsageError(f"--tasks needs at least one task, e.g. --tasks {','.join(PAPER_TASKS)}")
    datasets = csv_list(ppl) if ppl is not None else [] if task_names else ["wikitext2"]
    if ppl is not None and not datasets:
        raise UsageError("--ppl needs at least one dataset, e.g. --ppl wikitext2")
    check_eval_flags(datasets, limit_windows, seq_len, "--seq-len")
    check_at_least(1, batch_size=batch_size)
    if task_names:
        check_tasks(task_names, limit)
    check_json_out(json_out)
    skeleton = preflight(model, trust_remote_code)
    check_context(skeleton, seq_len=seq_len if datasets else None)
    ready()
    loaded = load_model(model, dtype, trust_remote_code)
    results = evaluate_perplexity(loaded, datasets, seq_len, limit_windows, data_dir, device, batch_size)
    scores = zero_shot(loaded, task_names, limit, data_dir, device, batch_size) if task_names else None
    rows = []
    for name, value in results.items():
        if isinstance(value, str):
            err_console.print(f"[yellow]{name}:[/] {value}", highlight=False, soft_wrap=True)
            rows.append([name, "unavailable", "", ""])
        else:
            rows.append([name, f"{value.ppl:.3f}", str(value.windows), str(value.seq_len)])
    if rows:
        out_console.print(table(f"perplexity of {model}", ["dataset", "ppl", "windows", "seq_len"], rows))
    if scores is not None:
        _print_zero_shot(model, scores)
    if json_out:
        payload = {k: (v if isinstance(v, str) else v.to_dict()) for k, v in results.items()}
        document = {"model": model, "perplexity": payload}
        if scores is not None:
            document["zeroshot"] = scores.to_dict()
        write_output_file(json_out, json.dumps(document, indent=2) + "\n", "--json")
    if all(isinstance(v, str) for v in results.values()) and (scores is None or not scores.results):
        raise typer.Exit(2)


def _print_zero_shot(model: str, scores: ZeroShot) -> None:
    for reason in scores.unavailable.values():
        err_console.print(f"[yellow]{reason}[/]", highlight=False, soft_wrap=True)
    rows = [[name, f"{r.acc:.4f}", "" if r.acc_norm is None else f"{r.acc_norm:.4f}", str(r.samples), r.source]
            for name, r in scores.results.items()]
    rows += [[name, "unavailable", "", "", ""] for name in scores.unavailable]
    if scores.mean_acc is not None:
        rows.append(["mean", f"{scores.mean_acc:.4f}", "", "", ""])
    title = f"zero-shot accuracy of {model} (lm-eval {scores.lm_eval_version}" + (
        f", first {scores.limit} documents)" if scores.limit else ")")
    out_console.print(table(title, ["task", "acc", "acc_norm", "n", "data"], rows))
