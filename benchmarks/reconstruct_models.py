"""Issue 35: SparseGPT with and without block reconstruction on several real models and seeds.

For one model (a GGUF file) and one calibration seed: the dense perplexity, then for each pattern
(2:4, 50%, 70%) SparseGPT alone and SparseGPT + ``--reconstruct`` at each relative learning rate
given, every prune starting from the same dense weights. Protocol as the issue fixes it: calibration
16 × 512 tokens of WikiText-2 (the local validation file), perplexity on the first 40 × 512 windows
of WikiText-2 raw test. Rows are saved after each prune (a cut-off run keeps what it measured).

    SECATEURS_DATA=../shared/data python benchmarks/reconstruct_models.py MODEL.gguf --name smollm2-135m \\
        --seed 0 --device cuda --results benchmarks/results/reconstruct_smollm2-135m_seed0.json
    python benchmarks/reconstruct_models.py --table benchmarks/results/reconstruct_*_seed*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from records import run_record, save_results

PATTERNS = {"2:4": ("2:4", None), "50": ("unstructured", 0.5), "70": ("unstructured", 0.7)}


def _label(pattern: str, sparsity: float | None) -> str:
    return pattern if sparsity is None else f"{sparsity:.0%}"


def measure(args: argparse.Namespace) -> None:
    from secateurs.api import PruneConfig, evaluate_perplexity, prune
    from secateurs.data.calib import CalibConfig
    from secateurs.engine.sequential import EngineOptions
    from secateurs.model.load import load_model

    loaded = load_model(args.model)
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    calib = CalibConfig("wikitext2", args.n_samples, args.seq_len, seed=args.seed)
    device = args.device
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "cpu"

    def ppl() -> float:
        return evaluate_perplexity(loaded, ["wikitext2"], 512, args.windows, device=device)["wikitext2"].ppl

    payload = {"model": args.name, "seed": args.seed, "calibration": f"{args.n_samples} x {args.seq_len} wikitext2 valid",
               "eval": f"wikitext2 raw test, first {args.windows} x 512 windows", "card": card, "rows": []}
    if args.skip_dense:  # a slow machine: the dense ppl is the one already measured elsewhere
        runs, payload["dense_ppl"] = [], None
    else:
        runs = [run_record(f"{args.name} dense", args.name, [], {"wikitext2": ppl()})]
        payload["dense_ppl"] = runs[0]["results"]["ppl_wikitext2"]["ppl"]
        print(f"{args.name} seed {args.seed} dense {payload['dense_ppl']:.3f} ({card})", flush=True)
    variants = [None] + [float(x) for x in args.lrs.split(",") if x]  # --lrs "": plain SparseGPT only
    for pattern, sparsity in (PATTERNS[key] for key in args.patterns.split(",")):
        for lr in variants:
            loaded.model.load_state_dict(dense)
            reconstruct = None if lr is None else {"lr": lr, "steps": args.steps}
            config = PruneConfig(args.method, sparsity, pattern, reconstruct=reconstruct)
            start = time.perf_counter()
            report = prune(loaded, config, calib, EngineOptions(device=device))
            seconds = time.perf_counter() - start
            value = ppl()
            outcomes = list(report.reconstruction.values())
            row = {"pattern": _label(pattern, sparsity), "variant": "plain" if lr is None else f"reconstruct lr={lr:g}",
                   "lr": lr, "ppl": value, "prune_s": round(seconds, 2),
                   "blocks_kept_trained": sum(o["step"] > 0 for o in outcomes),
                   "blocks_left": sum(o["step"] == 0 for o in outcomes),
                   "mean_kept_over_start": statistics.fmean(o["kept"] / o["start"] for o in outcomes) if outcomes else None}
            payload["rows"].append(row)
            label = f"{args.name} {args.method} {row['pattern']} {row['variant']}"
            runs.append(run_record(label, args.name, [report.stage_record()], {"wikitext2": value}))
            save_results(args.results, payload, runs)
            print(f"{label}: ppl {value:.3f}, {seconds:.1f} s, blocks trained/left "
                  f"{row['blocks_kept_trained']}/{row['blocks_left']}", flush=True)


def table(paths: list[str]) -> None:
    """Mean perplexity over seeds per model × pattern × variant, and the change against plain (a
    variant measured in two files for the same seed counts once)."""
    cells: dict[tuple[str, str, str], dict[int, float]] = {}
    dense: dict[str, list[float]] = {}
    cards = set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        dense.setdefault(data["model"], []).append(data["dense_ppl"])
        cards.add(data["card"])
        for row in data["rows"]:
            cells.setdefault((data["model"], row["pattern"], row["variant"]), {})[data["seed"]] = row["ppl"]
    print(f"cards: {', '.join(sorted(cards))}")
    print("| model | dense | pattern | variant | ppl per seed | mean | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for (model, pattern, variant), by_seed in sorted(cells.items()):
        plain = statistics.fmean(cells.get((model, pattern, "plain"), {0: float("nan")}).values())
        mean = statistics.fmean(by_seed.values())
        print(f"| {model} | {statistics.fmean(dense[model]):.2f} | {pattern} | {variant} | "
              f"{' / '.join(f'{by_seed[s]:.2f}' for s in sorted(by_seed))} | {mean:.2f} | {mean / plain - 1:+.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--name", default="model")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lrs", default="0.03,0.01,0.1", help="relative learning rates of the reconstruct variants")
    parser.add_argument("--patterns", default="2:4,50,70", help=f"any of {', '.join(PATTERNS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-dense", action="store_true", help="do not measure the dense perplexity (slow CPU runs)")
    parser.add_argument("--results", default="benchmarks/results/reconstruct_models.json")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of saved results instead")
    args = parser.parse_args()
    if args.table:
        table(args.table)
    else:
        measure(args)


if __name__ == "__main__":
    main()
