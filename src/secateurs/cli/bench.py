"""``secateurs bench``: prefill latency, time to first token, decode tokens/s, memory and checkpoint
size of a model, side by side with a dense baseline and with its sparse kernels, in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..api import bench
from ..errors import UsageError
from ..evaluate.speed import SpeedConfig
from ..files import write_atomic
from . import app
from .common import Device, check_json_out, csv_list, err_console, friendly, out_console, ready, table


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in csv_list(text))
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be comma-separated integers, e.g. 1,8") from None


@app.command("bench")
@friendly
def bench_command(
    model: Annotated[str, typer.Argument(help="The (pruned) model: HF folder, sparse export, hub id, .gguf, or smollm2-135m.")],
    baseline: Annotated[str | None, typer.Option(help="Dense model to compare against, measured in the same run.")] = None,
    sparse: Annotated[
        bool, typer.Option(help="Also run MODEL with its pruned linears swapped for sparse kernels (2:4 / bitmap).")
    ] = True,
    min_sparsity: Annotated[float, typer.Option(help="Unstructured linears below this sparsity stay dense.")] = 0.5,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float16 on CUDA, float32 on CPU), float32, bfloat16 or float16.")] = "auto",
    prompt_lengths: Annotated[str, typer.Option(help="Prefill prompt lengths, comma-separated.")] = "128,512,2048",
    batches: Annotated[str, typer.Option(help="Decode batch sizes, comma-separated.")] = "1,8",
    new_tokens: Annotated[int, typer.Option(help="Greedy decode steps timed per batch size.")] = 64,
    warmup: Annotated[int, typer.Option(help="Untimed runs before each measurement.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed runs; the median is reported.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the random prompt ids.")] = 0,
    cuda_graphs: Annotated[bool, typer.Option(help="Replay the decode step as a CUDA graph (CUDA only; off = eager).")] = True,
    decode_methods: Annotated[str, typer.Option(
        help="Decode methods timed on CUDA, fastest reported: cuda-graph (static cache, step in a CUDA graph), "
             "compile (the step through torch.compile, then a CUDA graph).")] = "cuda-graph,compile",
    json_out: Annotated[str | None, typer.Option("--json", help="Also write every number to this JSON file.")] = None,
) -> None:
    """Measure speed and memory: dense vs pruned vs pruned-on-sparse-kernels, as ratios to the first."""
    config = SpeedConfig(_ints(prompt_lengths, "--prompt-lengths"), _ints(batches, "--batches"), new_tokens=new_tokens,
                         warmup=warmup, repeats=repeats, seed=seed, cuda_graphs=cuda_graphs,
                         decode_methods=tuple(csv_list(decode_methods)))
    config.check()
    check_json_out(json_out)
    ready()
    report = bench(model, baseline, sparse=sparse, min_sparsity=min_sparsity, device=device, dtype=dtype, config=config)
    for note in report["notes"]:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    results = report["results"]
    first = results[0]
    columns = ["", *[r["label"] for r in results], *[f"{r['label']} / {first['label']}" for r in results[1:]]]
    rows: list[list[str]] = []

    def add(name: str, values: list, ratio_values: list, fmt: str = "{:.1f}") -> None:
        cells = [fmt.format(v) if v is not None else "n/a" for v in values]
        rows.append([name, *cells, *[f"{v:.2f}x" if v is not None else "n/a" for v in ratio_values]])

    for length in config.prompt_lengths:
        add(f"prefill {length} tok (ms)", [r["prefill_ms"][length] for r in results],
            [first["prefill_ms"][length] / r["prefill_ms"][length] for r in results[1:]])
    for length in config.prompt_lengths:
        add(f"time to first token {length} (ms)", [r["ttft_ms"][length] for r in results],
            [first["ttft_ms"][length] / r["ttft_ms"][length] for r in results[1:]])
    for batch in config.decode_batches:
        add(f"decode batch {batch} (tok/s)", [r["decode_tokens_per_s"][batch] for r in results],
            [r["decode_tokens_per_s"][batch] / first["decode_tokens_per_s"][batch] for r in results[1:]])
    for key, name in (("weight_mib", "weights stored (MiB)"), ("extra_mib", "run-time copies (MiB)"),
                      ("peak_mib", "peak memory (MiB)"), ("checkpoint_mib", "checkpoint (MiB)")):
        values = [r[key] for r in results]
        add(name, values, [v / first[key] if v is not None and first[key] else None for v in values[1:]], "{:.0f}")
    modes = "; ".join(f"{r['label']}: {r['decode_mode']}" for r in results)
    title = f"secateurs bench on {report['device']} ({report['dtype']}; decode by {modes})"
    out_console.print(table(title, columns, rows))
    if json_out:
        write_atomic(Path(json_out), json.dumps(report, indent=2, default=str) + "\n")
        out_console.print(f"saved {json_out}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
