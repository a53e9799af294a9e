"""Layer pruning on one model: every criterion × removal count × (with / without compensation).

    SECATEURS_DATA=../shared/data python benchmarks/layer_pruning.py \
        --model smollm2-135m --removes 3,6,9 --n-samples 32 --seq-len 512 --windows 40

Every criterion sees the very same calibration windows. Iterative criteria (GradMAP, SLEB-style
ppl) run once to the largest count; the first k removals of that greedy run are exactly the run to
k, and their time is the time of the first k rounds. Compensation is fitted on a copy so every row
starts from the same model. ``--random-llama7b`` instead times GradMAP (and its compensation) on
a Llama-2-7B-shaped model with random bf16 weights: time only, no quality.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from secateurs.data.calib import CalibConfig, calibration_ids, tokenize
from secateurs.data.sources import load_text
from secateurs.depth.base import ScoringContext
from secateurs.depth.compensation import CompensationOptions, compensate
from secateurs.depth.registry import scorer_class
from secateurs.engine.sequential import EngineOptions
from secateurs.evaluate.perplexity import perplexity
from secateurs.model.arch import spec_for
from secateurs.model.drop_layers import layers_removed
from secateurs.model.load import LoadedModel, load_model
from secateurs.options import build_options

from records import run_record, save_results

# (row label, criterion, options); the first of each criterion is its paper default.
# Cheapest first, so a run cut short on a slow machine still has the fast criteria.
VARIANTS = [
    ("gradmap", "gradmap", {}),
    ("block-influence (ShortGPT)", "block-influence", {}),
    ("angular (Gromov)", "angular", {}),
    ("taylor (Shortened LLaMA)", "taylor", {}),
    ("gradmap weights mean|g|", "gradmap", {"target": "weights"}),
    ("gradmap one-shot", "gradmap", {"one_shot": True}),
    ("gradmap weights l2", "gradmap", {"target": "weights", "reduce": "l2"}),
    ("gradmap gate per batch", "gradmap", {"grain": "batch"}),
    ("gradmap gate per sequence", "gradmap", {"grain": "sequence"}),
    ("gradmap gate per token, squared", "gradmap", {"grain": "token", "reduce": "l2"}),
    ("ppl one-shot (Shortened LLaMA)", "ppl", {"one_shot": True}),
    ("ppl iterative (SLEB)", "ppl", {}),
]
COMPENSATED = {"gradmap", "block-influence (ShortGPT)", "angular (Gromov)", "taylor (Shortened LLaMA)", "ppl iterative (SLEB)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def select(loaded: LoadedModel, ctx: ScoringContext, method: str, options: dict, counts: list[int]) -> dict:
    """Removed layers and selection seconds for every count, from as few runs as the criterion allows."""
    cls = scorer_class(method)
    out = {}
    if method == "angular":
        for k in counts:
            scorer = cls(build_options(cls.Options, options))
            _sync(ctx.device)
            start = time.perf_counter()
            selection = scorer.choose(ctx, k)
            _sync(ctx.device)
            out[k] = {"removed": selection.removed, "seconds": time.perf_counter() - start, "scores": selection.rounds[0]}
        return out
    scorer = cls(build_options(cls.Options, options))
    scorer.check(ctx)
    _sync(ctx.device)
    start = time.perf_counter()
    selection = scorer.choose(ctx, max(counts))
    _sync(ctx.device)
    total = time.perf_counter() - start
    for k in counts:
        seconds = selection.round_seconds[k - 1] if selection.round_seconds else total
        out[k] = {"removed": sorted(selection.order[:k]), "seconds": seconds, "scores": selection.rounds[0]}
    return out


def quality(args, loaded: LoadedModel, device: torch.device, partial: dict) -> dict:
    """Every variant's rows; ``partial`` is rewritten to ``args.json`` after each row (long CPU runs)."""
    model, spec = loaded.model, loaded.spec
    model.to(device)
    counts = [int(c) for c in args.removes.split(",")]
    calib = CalibConfig("wikitext2", args.n_samples, args.seq_len, args.seed, args.data_dir)
    ids = calibration_ids(calib, loaded.tokenizer, model)
    batches = [b.to(device) for b in ids.split(args.batch_size)]
    ctx = ScoringContext(model, spec, batches, device, EngineOptions(str(device), args.batch_size))
    test_ids = tokenize(loaded.tokenizer, load_text("wikitext2", "test", args.data_dir))

    def ppl(m) -> float:
        return perplexity(m, test_ids, args.eval_seq_len, args.windows or None, device, args.eval_batch).ppl

    dense = ppl(model)
    print(f"dense perplexity {dense:.3f}", flush=True)
    rows = []
    n_layers = len(spec.blocks_of(model))
    runs = [run_record("dense", args.model, [], {"wikitext2": dense})]
    scores = {}
    for label, method, options in VARIANTS:
        if args.methods and method not in args.methods.split(","):
            continue
        chosen = select(loaded, ctx, method, options, counts)
        scores[label] = {str(k): v for k, v in chosen[counts[0]]["scores"].items()}
        for k in counts:
            with layers_removed(model, spec, chosen[k]["removed"]):
                plain = ppl(model)
            row = {"method": label, "remove": k, "removed": chosen[k]["removed"], "select_s": chosen[k]["seconds"], "ppl": plain}
            if label in COMPENSATED:
                work = copy.deepcopy(model)
                _sync(device)
                start = time.perf_counter()
                comp = compensate(work, spec, chosen[k]["removed"], batches, CompensationOptions(**args.comp))
                _sync(device)
                row["compensate_s"] = time.perf_counter() - start
                with layers_removed(work, spec, chosen[k]["removed"]):
                    row["ppl_compensated"] = ppl(work)
                row["compensated_layer"] = comp["layer"]
                del work
            rows.append(row)
            stage = {"stage": "layers", "method": label, "removed_layers": sorted(chosen[k]["removed"]),
                     "layers_before": n_layers, "scores": [scores[label]]}
            runs.append(run_record(f"{label} -{k}", args.model, [stage], {"wikitext2": plain}))
            if "ppl_compensated" in row:
                compensated = {**stage, "compensation": {"layer": row["compensated_layer"], **args.comp}}
                runs.append(run_record(f"{label} -{k} + compensation", args.model, [compensated],
                                       {"wikitext2": row["ppl_compensated"]}))
            print(json.dumps(row), flush=True)
            save_results(Path(args.json), {**partial, "dense_ppl": dense, "rows": rows}, runs)
    loo = [scores["ppl one-shot (Shortened LLaMA)"][str(i)] for i in range(len(spec.blocks_of(model)))] if "ppl one-shot (Shortened LLaMA)" in scores else None
    correlation = {}
    if loo:
        for label, per_layer in scores.items():
            if label.startswith("angular"):
                continue
            correlation[label] = _spearman([per_layer[str(i)] for i in range(len(loo))], loo)
    return {"dense_ppl": dense, "rows": rows, "first_round_scores": scores, "spearman_vs_leave_one_out": correlation,
            "runs": runs}


def table(result: dict, counts: list[int]) -> str:
    rows = result["rows"]
    sleb = {r["remove"]: r["select_s"] for r in rows if r["method"] == "ppl iterative (SLEB)"}
    grad = {r["remove"]: r["select_s"] for r in rows if r["method"] == "gradmap"}
    lines = [f"dense WikiText-2 perplexity: {result['dense_ppl']:.2f}", "",
             "| method | removed | ppl | ppl + compensation | select s | SLEB time / this | this / GradMAP time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        comp = f"{r['ppl_compensated']:.2f}" if "ppl_compensated" in r else "-"
        vs_sleb = f"{sleb[r['remove']] / r['select_s']:.1f}x" if r["remove"] in sleb else "-"
        vs_grad = f"{r['select_s'] / grad[r['remove']]:.2f}" if r["remove"] in grad else "-"
        lines.append(f"| {r['method']} | {r['remove']} {r['removed']} | {r['ppl']:.2f} | {comp} | {r['select_s']:.1f} | {vs_sleb} | {vs_grad} |")
    if result.get("spearman_vs_leave_one_out"):
        lines += ["", "Spearman rank correlation of first-round scores with leave-one-out calibration loss:"]
        lines += [f"- {k}: {v:+.3f}" for k, v in result["spearman_vs_leave_one_out"].items()]
    return "\n".join(lines)


def random_llama7b(args, device: torch.device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.requires_grad_(False)
    spec = spec_for(model)
    ids = torch.randint(0, config.vocab_size, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    batches = [b.to(device) for b in ids.split(args.batch_size)]
    ctx = ScoringContext(model, spec, batches, device, EngineOptions(str(device), args.batch_size))
    out = {"model": "Llama-2-7B shape, random bf16", "calibration": f"{args.n_samples} x {args.seq_len}", "remove": args.remove_7b}
    for label, options in (("gradmap", {}), ("gradmap one-shot", {"one_shot": True})):
        cls = scorer_class("gradmap")
        scorer = cls(build_options(cls.Options, options))
        torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        selection = scorer.choose(ctx, args.remove_7b)
        _sync(device)
        out[label] = {"seconds": time.perf_counter() - start, "removed": selection.removed,
                      "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
        print(label, out[label], flush=True)
    _sync(device)
    start = time.perf_counter()
    compensate(model, spec, out["gradmap"]["removed"], batches[:8])
    _sync(device)
    out["compensation_seconds_16_samples"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--removes", default="3,6,9")
    parser.add_argument("--methods", default=None, help="comma-separated criteria to run (default all)")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows; 0 = the whole test split")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--shift", default="relative")
    parser.add_argument("--alpha", type=float, default=1e-2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-llama7b", action="store_true")
    parser.add_argument("--remove-7b", type=int, default=8)
    parser.add_argument("--json", default="benchmarks/results/layer_pruning.json")
    args = parser.parse_args()
    args.comp = {"shift": args.shift, "alpha": args.alpha}
    device = EngineOptions(args.device).torch_device()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"machine": machine, "args": {k: v for k, v in vars(args).items()}}
    if args.random_llama7b:
        result["llama7b"] = random_llama7b(args, device)
    else:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result.update(quality(args, load_model(args.model), device, result))
        print(table(result, [int(c) for c in args.removes.split(",")]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    save_results(Path(args.json), result)
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
