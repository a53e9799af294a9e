"""``secateurs shear``: targeted structured pruning to a chosen shape (LLM-Shearing), then continued
pretraining with dynamic batch loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..api import evaluate_perplexity, save, shear
from ..data.sources import check_name
from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..files import check_writable
from ..model.load import load_model
from ..model.save import check_out
from ..recover.checkpoint import check_checkpoints
from ..structured.shearing import CONTINUE_CHECKPOINT, PRUNE_CHECKPOINT, ShearConfig, ShearTarget
from . import app
from .common import DataDir, Device, Dtype, EvalSeqLen, LimitWindows, Overwrite, TrustRemoteCode, check_context, check_eval_flags, check_out_folder, csv_list, friendly, out_console, perplexity_rows, preflight, ready, table


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in csv_list(text)]
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be comma-separated numbers, one per --data domain") from None


@app.command("shear")
@friendly
def shear_command(
    model: Annotated[str, typer.Argument(help="HF folder, hub id, .gguf file, or smollm2-135m.")],
    out: Annotated[str, typer.Option("--out", help="Output folder (written atomically).")],
    target: Annotated[
        str | None, typer.Option(help="Target shape, e.g. layers=24,hidden=528,heads=6,kv_heads=2,intermediate=1344.")
    ] = None,
    target_config: Annotated[
        str | None, typer.Option(help="JSON file with the target sizes (our keys or a transformers config's).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Mask-learning steps (the paper: 3,200).")] = 100,
    continue_steps: Annotated[int, typer.Option(help="Continued-pretraining steps of the sheared model.")] = 0,
    data: Annotated[
        str, typer.Option(help="Training domains, comma-separated: wikitext2, ptb, c4, or .txt/.jsonl paths.")
    ] = "wikitext2",
    domain_weights: Annotated[str | None, typer.Option(help="Initial domain weights (default: equal).")] = None,
    reference_loss: Annotated[
        str | None, typer.Option(help="Reference loss per domain (default: the source model's held-out loss).")
    ] = None,
    update_every: Annotated[int, typer.Option(help="Steps between domain-weight updates (the paper: 50).")] = 50,
    eval_windows: Annotated[int, typer.Option(help="Held-out windows per domain for those updates.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.")] = 512,
    lr: Annotated[float, typer.Option(help="Model learning rate (the paper: 1e-4).")] = 1e-4,
    mask_lr: Annotated[float, typer.Option(help="Learning rate of masks and multipliers (the paper: 1.0).")] = 1.0,
    lagrangian_warmup: Annotated[
        float, typer.Option(help="Fraction of --steps over which the target ramps in (the paper: 0.2).")
    ] = 0.2,
    bf16: Annotated[bool, typer.Option(help="Train under bfloat16 autocast.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward to save memory.")] = False,
    checkpoint_dir: Annotated[
        str | None, typer.Option(help="Save resumable checkpoints here; a matching one is resumed from.")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed for batches and mask sampling.")] = 0,
    data_dir: DataDir = None,
    ppl: Annotated[str | None, typer.Option(help="After shearing, measure perplexity on these datasets.")] = None,
    limit_windows: LimitWindows = None,
    eval_seq_len: EvalSeqLen = 2048,
    device: Device = "auto",
    dtype: Dtype = "float32",
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Prune to a chosen architecture with learned L0 masks; save a plain, smaller transformers model."""
    if (target is None) == (target_config is None):
        raise UsageError("give exactly one of --target layers=...,hidden=... or --target-config FILE.json")
    shape = ShearTarget.parse(target) if target is not None else ShearTarget.from_json(target_config)
    datasets = csv_list(data)
    for name in datasets:
        check_name(name)
    config = ShearConfig(
        target=shape, datasets=datasets, steps=steps, continue_steps=continue_steps, lr=lr, mask_lr=mask_lr,
        lagrangian_warmup=lagrangian_warmup, batch_size=batch_size, seq_len=seq_len, update_every=update_every,
        eval_windows=eval_windows, reference_loss=_floats(reference_loss, "--reference-loss"),
        domain_weights=_floats(domain_weights, "--domain-weights"), bf16=bf16,
        gradient_checkpointing=gradient_checkpointing, seed=seed, data_dir=data_dir,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
    )
    config.validate()
    engine = EngineOptions(device=device)
    engine.torch_device()
    check_eval_flags(csv_list(ppl), limit_windows, eval_seq_len)
    check_out_folder(out, model, overwrite, dtype)
    if checkpoint_dir:
        folder = Path(checkpoint_dir).expanduser()
        check_checkpoints([folder / PRUNE_CHECKPOINT, folder / CONTINUE_CHECKPOINT])
        check_writable(folder.resolve() / PRUNE_CHECKPOINT, f"--checkpoint-dir {checkpoint_dir}")
    skeleton = preflight(model, trust_remote_code)
    if skeleton is not None:
        check_context(skeleton, seq_len=seq_len, eval_seq_len=eval_seq_len if ppl else None)
    ready()
    loaded = load_model(model, dtype, trust_remote_code)
    check_out(out, loaded.local_path, overwrite)
    report = shear(loaded, config, engine)
    plan = report.plan
    weights = (report.continue_log or report.prune_log).domain_weights[-1]
    rows = [
        *[[label, f"{plan.source[kind]} → {plan.target[kind]}"] for kind, label in
          (("layers", "layers"), ("hidden", "hidden"), ("heads", "KV heads"), ("channels", "intermediate"))],
        ["query heads", f"{plan.source['heads'] * plan.per_group} → {plan.target['heads'] * plan.per_group}"],
        ["block parameters", f"{report.params_before:,} → {report.params_after:,} ({report.params_after / report.params_before:.1%})"],
        ["tokens (mask learning + continued)", f"{report.prune_log.tokens:,} + {report.continue_log.tokens if report.continue_log else 0:,}"],
        ["final domain weights", ", ".join(f"{n}={w:.3f}" for n, w in zip(datasets, weights))],
        ["time (s)", f"{report.seconds:.1f}"],
        ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
    ]
    results = {}
    new_rows, new_results = perplexity_rows(evaluate_perplexity(loaded, csv_list(ppl), eval_seq_len, limit_windows, data_dir, device))
    rows += new_rows
    results.update(new_results)
    path = save(loaded, out, [report.stage_record()], results, overwrite)
    rows.append(["saved to", str(path)])
    out_console.print(table("secateurs shear", ["", "value"], rows))
