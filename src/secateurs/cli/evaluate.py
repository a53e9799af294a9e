"""``secateurs eval``: perplexity of a model (original or pruned) on standard datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..api import evaluate_perplexity
from ..data.sources import check_name
from ..errors import UsageError
from ..model.load import load_model
from . import app
from .common import BatchSize, DataDir, Device, Dtype, csv_list, err_console, friendly, out_console, table


@app.command("eval")
@friendly
def eval_command(
    model: Annotated[str, typer.Argument(help="HF folder (e.g. a secateurs OUT), hub id, .gguf file, or smollm2-135m.")],
    ppl: Annotated[str, typer.Option(help="Datasets, comma-separated: wikitext2, ptb, c4, or .txt/.jsonl paths.")] = "wikitext2",
    seq_len: Annotated[int, typer.Option(help="Window length (papers use 2048 or the model's context).")] = 2048,
    limit_windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows.")] = None,
    data_dir: DataDir = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 1,
    json_out: Annotated[str | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
) -> None:
    """Measure perplexity (non-overlapping windows over the joined test split)."""
    datasets = csv_list(ppl)
    if not datasets:
        raise UsageError("--ppl needs at least one dataset, e.g. --ppl wikitext2")
    for name in datasets:
        check_name(name)
    loaded = load_model(model, dtype)
    results = evaluate_perplexity(loaded, datasets, seq_len, limit_windows, data_dir, device, batch_size)
    rows = []
    for name, value in results.items():
        if isinstance(value, str):
            err_console.print(f"[yellow]{name}:[/] {value}", highlight=False, soft_wrap=True)
            rows.append([name, "unavailable", "", ""])
        else:
            rows.append([name, f"{value.ppl:.3f}", str(value.windows), str(value.seq_len)])
    out_console.print(table(f"perplexity of {model}", ["dataset", "ppl", "windows", "seq_len"], rows))
    if json_out:
        payload = {k: (v if isinstance(v, str) else v.to_dict()) for k, v in results.items()}
        Path(json_out).write_text(json.dumps({"model": model, "perplexity": payload}, indent=2) + "\n")
    if all(isinstance(v, str) for v in results.values()):
        raise typer.Exit(2)
