"""Recovery after pruning on one model: perplexity before and after masked-LoRA recovery for three
pruning kinds, and LoRAPrune against one-shot LLM-Pruner + the same LoRA at an equal budget.

    SECATEURS_DATA=../shared/data nice -n 10 python benchmarks/recovery.py \
        --model smollm2-135m --steps 24 --batch-size 1 --seq-len 256 --windows 16

Rows (each from a fresh copy of the model): SparseGPT 2:4, LLM-Pruner 30% width, GradMAP minus
6 layers, each then LoRA; LLM-Pruner 20% width + LoRA and LoRAPrune 20% width with the same steps,
tokens, learning rate and data; Wanda 60% one-shot + LoRA against iterative Wanda 60% in 3 rounds
(20%, 40%, 60%), each round followed by a third of the same LoRA steps (equal training tokens). Training text is WikiText-2 "train" (locally the validation file);
perplexity is on the first ``--windows`` windows of the WikiText-2 test split, so the two never
overlap. Every row writes to benchmarks/results/recovery.json as it finishes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from secateurs.api import PruneConfig, evaluate_perplexity, loraprune, prune, prune_iterative, recover, width
from secateurs.data.calib import CalibConfig
from secateurs.depth.prune import LayerConfig, prune_layers
from secateurs.model.load import load_model
from secateurs.recover.lora import RecoverConfig
from secateurs.recover.loraprune import LoRAPruneConfig
from secateurs.sparsity.registry import METHODS as SPARSITY_METHODS
from secateurs.structured.base import WidthConfig, count_parameters

from records import save_results

RESULTS = Path(__file__).parent / "results" / "recovery.json"


def ppl(loaded, args) -> float:
    value = evaluate_perplexity(loaded, ["wikitext2"], args.eval_seq_len, args.windows, device=args.device)["wikitext2"]
    return value.ppl


def recover_config(args) -> RecoverConfig:
    return RecoverConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
        warmup_steps=args.warmup, seed=args.seed, precision="auto",
    )


def pruned_then_lora(name: str, prune_step, args, dense: float) -> dict:
    """Prune a fresh model with ``prune_step``, measure, recover with LoRA, measure again."""
    loaded = load_model(args.model)
    params_before = count_parameters(loaded.model)
    start = time.perf_counter()
    detail = prune_step(loaded)
    prune_seconds = time.perf_counter() - start
    before = ppl(loaded, args)
    report = recover(loaded, recover_config(args), args.device)
    after = ppl(loaded, args)
    first, last = report.loss_start_end(5)
    return {
        "case": name, "dense_ppl": dense, "pruned_ppl": before, "recovered_ppl": after,
        "ratio_after_over_before": after / before, "steps": report.log.steps, "tokens": report.tokens,
        "recover_seconds": round(report.seconds, 1), "prune_seconds": round(prune_seconds, 1),
        "loss_first5": first, "loss_last5": last, "masked_linears": report.masked_linears,
        "sparsity_before": report.sparsity_before, "sparsity_after": report.sparsity_after,
        "zeros_kept": report.zeros_kept, "params_before": params_before,
        "params_after": count_parameters(loaded.model), "detail": detail,
    }


def run_loraprune(args, dense: float, cooldown: float) -> dict:
    """LoRAPrune to 20% width; ``cooldown`` is the fraction of the steps tuned at the final shape."""
    loaded = load_model(args.model)
    params_before = count_parameters(loaded.model)
    config = LoRAPruneConfig(ratio=0.2, target="both", keep_first=0, keep_last=0, cooldown=cooldown)
    report = loraprune(loaded, config, recover_config(args), args.device)
    after = ppl(loaded, args)
    record = report.stage_record()
    first, last = report.loss_start_end(5)
    return {
        "case": "LoRAPrune 20% width (prunes while tuning)" + ("" if cooldown == LoRAPruneConfig.cooldown else f", cooldown {cooldown:g}"),
        "dense_ppl": dense, "pruned_ppl": None,
        "recovered_ppl": after, "ratio_after_over_before": None, "steps": report.log.steps, "tokens": report.tokens,
        "recover_seconds": round(report.seconds, 1), "prune_seconds": 0.0, "loss_first5": first, "loss_last5": last,
        "masked_linears": report.masked_linears, "sparsity_before": report.sparsity_before,
        "sparsity_after": report.sparsity_after, "zeros_kept": report.zeros_kept, "params_before": params_before,
        "params_after": count_parameters(loaded.model), "detail": {"groups_removed": record["groups_removed"]},
    }


def run_iterative(args, dense: float, calib: CalibConfig, rounds: int) -> dict:
    """Wanda 60% reached in ``rounds`` prune + LoRA steps, with the one-shot row's total steps split evenly."""
    loaded = load_model(args.model)
    params_before = count_parameters(loaded.model)
    config = recover_config(args)
    config.steps = max(1, args.steps // rounds)
    report = prune_iterative(loaded, PruneConfig("wanda", 0.6), rounds, config, calib)
    after = ppl(loaded, args)
    first = report.recoveries[0].loss_start_end(5)[0]
    last = report.recoveries[-1].loss_start_end(5)[1]
    return {
        "case": f"iterative Wanda 60% ({rounds} rounds of prune + LoRA)", "dense_ppl": dense, "pruned_ppl": None,
        "recovered_ppl": after, "ratio_after_over_before": None, "steps": config.steps * rounds, "tokens": report.tokens,
        "recover_seconds": round(sum(r.seconds for r in report.recoveries), 1),
        "prune_seconds": round(sum(r["prune_seconds"] for r in report.rounds), 1),
        "loss_first5": first, "loss_last5": last, "masked_linears": report.recoveries[-1].masked_linears,
        "sparsity_before": report.recoveries[-1].sparsity_before, "sparsity_after": report.sparsity,
        "zeros_kept": all(r.zeros_kept for r in report.recoveries), "params_before": params_before,
        "params_after": count_parameters(loaded.model), "detail": {"rounds": report.rounds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--loraprune-cooldown", default=str(LoRAPruneConfig.cooldown),
                        help="Comma-separated fractions of the steps LoRAPrune tunes at the final shape (one row each).")
    parser.add_argument("--only", default=None, help="Comma-separated case numbers (1-7) to run.")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to write (rows are merged into it).")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    calib = CalibConfig("wikitext2", args.calib_samples, args.calib_seq_len, args.seed)
    width_calib = CalibConfig("wikitext2", 10, 128, args.seed)  # LLM-Pruner's default: 10 × 128
    dense = ppl(load_model(args.model), args)
    print(f"dense wikitext2 ppl ({args.windows} × {args.eval_seq_len}): {dense:.3f}", flush=True)

    def sparsegpt(loaded):
        report = prune(loaded, PruneConfig("sparsegpt", None, "2:4"), calib)
        return {"achieved_sparsity": report.achieved}

    def llm_pruner(ratio):
        def step(loaded):
            report = width(loaded, WidthConfig("llm-pruner", ratio, target="both"), width_calib)
            return {"groups_removed": report.achieved(), "param_reduction": report.reduction}
        return step

    def wanda60(loaded):
        report = prune(loaded, PruneConfig("wanda", 0.6), calib)
        return {"achieved_sparsity": report.achieved}

    def gradmap(loaded):
        report = prune_layers(loaded, LayerConfig("gradmap", remove=6), calib)
        return {"removed_layers": report.removed}

    cases = {
        "1": ("SparseGPT 2:4 + LoRA", sparsegpt if "sparsegpt" in SPARSITY_METHODS else None),
        "2": ("LLM-Pruner 30% width + LoRA", llm_pruner(0.3)),
        "3": ("GradMAP -6 layers + LoRA", gradmap),
        "4": ("LLM-Pruner 20% width + LoRA", llm_pruner(0.2)),
        "5": ("LoRAPrune", None),
        "6": ("Wanda 60% one-shot + LoRA", wanda60),
        "7": ("iterative Wanda 60%", None),
    }
    wanted = args.only.split(",") if args.only else list(cases)
    previous = json.loads(args.results.read_text()) if args.results.is_file() and args.only else {}
    rows = {row["case"]: row for row in previous.get("rows", [])}
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, " + (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    )
    cooldowns = [float(c) for c in args.loraprune_cooldown.split(",")]
    jobs = [(key, cooldown) for key in wanted for cooldown in (cooldowns if key == "5" else [None])]
    for key, cooldown in jobs:
        name, step = cases[key]
        start = time.perf_counter()
        if key == "5":
            row = run_loraprune(args, dense, cooldown)
        elif key == "7":
            row = run_iterative(args, dense, calib, rounds=3)
        else:
            row = pruned_then_lora(name, step, args, dense) if step else None
        if row is None:
            print(f"{name}: method not registered, skipped", flush=True)
            continue
        row["total_seconds"] = round(time.perf_counter() - start, 1)
        rows[row["case"]] = row
        args.results.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        save_results(args.results, {"args": settings, "machine": machine, "rows": list(rows.values())})
        pruned = f"{row['pruned_ppl']:.2f}" if row["pruned_ppl"] is not None else "-"
        print(
            f"{row['case']}: ppl {pruned} -> {row['recovered_ppl']:.2f} "
            f"(dense {dense:.2f}), {row['steps']} steps, {row['tokens']} tokens, {row['recover_seconds']} s, "
            f"sparsity {row['sparsity_before']:.4f} -> {row['sparsity_after']:.4f}, zeros kept {row['zeros_kept']}, "
            f"params {row['params_before']:,} -> {row['params_after']:,}",
            flush=True,
        )
    print("\n| case | pruned ppl | recovered ppl | after/before | steps | tokens | recover s | sparsity after | zeros kept | params |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        pruned = f"{row['pruned_ppl']:.2f}" if row["pruned_ppl"] is not None else "-"
        ratio = f"{row['ratio_after_over_before']:.3f}" if row["ratio_after_over_before"] else "-"
        print(
            f"| {row['case']} | {pruned} | {row['recovered_ppl']:.2f} | {ratio} | {row['steps']} | {row['tokens']} | "
            f"{row['recover_seconds']} | {row['sparsity_after']:.4f} | {row['zeros_kept']} | {row['params_after'] / 1e6:.1f}M |"
        )


if __name__ == "__main__":
    main()
