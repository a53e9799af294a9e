"""``secateurs recover``: LoRA recovery that keeps the sparsity, LoRAPrune, iterative prune + fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..api import PruneConfig, check_prune, evaluate_perplexity, loraprune, prune_iterative, recover, save
from ..data.calib import CalibConfig
from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..files import check_writable
from ..model.load import load_model
from ..model.save import check_out
from ..recover.checkpoint import check_checkpoints
from ..recover.lora import CHECKPOINT, PRECISIONS, RecoverConfig, checkpoint_files, remove_checkpoints
from ..recover.loraprune import MODES, LoRAPruneConfig
from ..sparsity.registry import method_names
from . import app
from .common import DataDir, Device, Dtype, EvalSeqLen, LimitWindows, Overwrite, TrustRemoteCode, check_at_least, check_context, check_eval_flags, check_out_folder, csv_list, friendly, out_console, parse_options, parse_sparsity, perplexity_rows, preflight, ready, table

METHODS = ("lora", "loraprune", "iterative")


@app.command("recover")
@friendly
def recover_command(
    model: Annotated[str, typer.Argument(help="The pruned model: HF folder, hub id, .gguf file, or smollm2-135m.")],
    out: Annotated[str, typer.Option("--out", help="Output folder (written atomically).")],
    method: Annotated[str, typer.Option(help="lora (recover a pruned model), loraprune (prune while tuning), iterative (prune + tune in rounds).")] = "lora",
    steps: Annotated[int, typer.Option(help="Optimizer steps (per round for iterative).")] = 200,
    rank: Annotated[int, typer.Option(help="LoRA rank (LLM-Pruner: 8).")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (LLM-Pruner: 16).")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout (LLM-Pruner: 0.05).")] = 0.05,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: 1e-4 as LLM-Pruner; loraprune 3e-4 as its code).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps (default min(100, steps/10)).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence (LLM-Pruner: 256).")] = 256,
    data: Annotated[str, typer.Option(help="Training text: wikitext2, c4, ptb (train split) or a .txt/.jsonl path.")] = "wikitext2",
    data_dir: DataDir = None,
    seed: Annotated[int, typer.Option(help="Seed for batches, dropout and adapter init.")] = 0,
    precision: Annotated[str, typer.Option(help=f"{', '.join(PRECISIONS)} (auto: bf16 autocast on CUDA, fp32 on CPU).")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in the backward pass (less memory).")] = True,
    checkpoint_dir: Annotated[str | None, typer.Option(help="Where to checkpoint (default OUT.ckpt); a matching checkpoint there is resumed.")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    ratio: Annotated[float, typer.Option(help="loraprune: fraction of groups (or weights, --target unstructured) removed per layer.")] = 0.2,
    target: Annotated[str, typer.Option(help=f"loraprune: {', '.join(MODES)}.")] = "both",
    keep_first: Annotated[int | None, typer.Option(help="loraprune: leave the first N layers whole (default 10% of layers).")] = None,
    keep_last: Annotated[int | None, typer.Option(help="loraprune: leave the last N layers whole (default 1).")] = None,
    prune_every: Annotated[int, typer.Option(help="loraprune: prune every N steps (paper code: 10).")] = 10,
    cooldown: Annotated[float, typer.Option(
        help="loraprune: fraction of the steps tuned at the final shape after the schedule ends "
             "(0.1; 0.5 recovered better at 300 steps on SmolLM2, see BENCHMARKS.md).")] = 0.1,
    prune: Annotated[str, typer.Option(help=f"iterative: one-shot method ({', '.join(method_names())}).")] = "wanda",
    sparsity: Annotated[str | None, typer.Option(help="iterative: final sparsity (default 0.5).")] = None,
    pattern: Annotated[str, typer.Option(help="iterative: unstructured (N:M takes --rounds 1).")] = "unstructured",
    rounds: Annotated[int, typer.Option(help="iterative: prune + recover rounds.")] = 4,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="iterative: method option key=value.")] = None,
    calib: Annotated[str, typer.Option(help="iterative: calibration data for the one-shot method.")] = "wikitext2",
    n_samples: Annotated[int, typer.Option(help="iterative: calibration sequences.")] = 128,
    calib_seq_len: Annotated[int, typer.Option(help="iterative: tokens per calibration sequence.")] = 2048,
    ppl: Annotated[str | None, typer.Option(help="Measure perplexity on these datasets before and after.")] = None,
    limit_windows: LimitWindows = None,
    eval_seq_len: EvalSeqLen = 2048,
    device: Device = "auto",
    dtype: Dtype = "float32",
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Recover quality after pruning with LoRA (sparsity kept exactly), or prune while tuning."""
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    datasets = csv_list(ppl)
    check_eval_flags(datasets, limit_windows, eval_seq_len)
    check_at_least(1, batch_size=batch_size, grad_accum=grad_accum, save_every=save_every, rounds=rounds, prune_every=prune_every)
    checkpoints = checkpoint_dir or f"{Path(out).expanduser().resolve()}.ckpt"
    config = RecoverConfig(
        steps=steps, rank=rank, alpha=alpha, dropout=dropout, lr=lr or (3e-4 if method == "loraprune" else 1e-4),
        warmup_steps=warmup_steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, data=data,
        data_dir=data_dir, seed=seed, precision=precision, gradient_checkpointing=gradient_checkpointing,
        checkpoint_dir=checkpoints, save_every=save_every,
    )
    config.validate()
    engine = EngineOptions(device=device)
    torch_device = engine.torch_device()
    lp_config = LoRAPruneConfig(ratio, target, keep_first, keep_last, prune_every, cooldown=cooldown)
    iterative_config = PruneConfig(prune, parse_sparsity(sparsity), pattern, parse_options(option))
    if method == "loraprune":
        lp_config.validate()
    calib_config = None
    if method == "iterative":
        calib_config = CalibConfig(calib, n_samples, calib_seq_len, seed, data_dir)
        calib_config.validate()
    check_out_folder(out, model, overwrite, dtype)
    check_checkpoints(checkpoint_files(checkpoints))
    check_writable(Path(checkpoints).expanduser().resolve() / CHECKPOINT, f"--checkpoint-dir {checkpoints}")
    skeleton = preflight(model, trust_remote_code)
    if skeleton is not None:
        check_context(skeleton, seq_len=seq_len, calib_seq_len=calib_seq_len if method == "iterative" else None,
                      eval_seq_len=eval_seq_len if datasets else None)
        if method == "loraprune":
            lp_config.layers(skeleton.spec.num_layers(skeleton.model.config))
    if method == "iterative":
        check_prune(skeleton, iterative_config, calib_config)
    ready()
    loaded = load_model(model, dtype, trust_remote_code)
    check_out(out, loaded.local_path, overwrite)
    if method == "loraprune":
        lp_config.layers(loaded.spec.num_layers(loaded.model.config))
    results, rows = {}, [["method", method]]
    new_rows, new_results = perplexity_rows(evaluate_perplexity(loaded, datasets, eval_seq_len, limit_windows, data_dir, device), " before", "_before")
    rows += new_rows
    results.update(new_results)
    if method == "lora":
        report = recover(loaded, config, device)
    elif method == "loraprune":
        report = loraprune(loaded, lp_config, config, device)
    else:
        report = prune_iterative(loaded, iterative_config, rounds, config, calib_config, engine)
    record = report.stage_record()
    if method == "iterative":
        rows += [[f"round {r['round']}", f"sparsity {r['achieved_sparsity']:.4f}, loss {r['recover_loss']['first']:.3f} → {r['recover_loss']['last']:.3f}"] for r in record["rounds"]]
        rows += [["sparsity (mean)", f"{record['achieved_sparsity']:.4f}"], ["tokens", f"{report.tokens:,}"]]
    else:
        first, last = report.loss_start_end()
        rows += [
            ["steps (resumed from)", f"{report.log.steps} ({report.log.resumed_from})"],
            ["tokens", f"{report.tokens:,}"],
            ["train loss first → last 10 steps", f"{first:.4f} → {last:.4f}"],
            ["sparsity before → after", f"{report.sparsity_before:.4f} → {report.sparsity_after:.4f}"],
            ["masked linears (zeros kept exactly)", f"{report.masked_linears} ({'yes' if report.zeros_kept else 'NO'})"],
        ]
        if "params" in record:
            rows.append(["parameters", f"{record['params']['before']:,} → {record['params']['after']:,}"])
    rows.append(["time (s)", f"{report.seconds:.1f}"])
    new_rows, new_results = perplexity_rows(evaluate_perplexity(loaded, datasets, eval_seq_len, limit_windows, data_dir, device), " after", "")
    rows += new_rows
    results.update(new_results)
    path = save(loaded, out, [record], results, overwrite)
    remove_checkpoints(checkpoints)
    rows.append(["saved to", str(path)])
    out_console.print(table(f"secateurs recover ({torch_device})", ["", "value"], rows))
