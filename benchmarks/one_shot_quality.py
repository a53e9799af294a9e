"""Magnitude vs Wanda vs SparseGPT (50%, 2:4, 4:8, 8:16) and uniform vs OWL at 70%, secateurs only, one run.

The quality half of the one-shot comparison, cheap enough for a CPU: every variant prunes a fresh
copy of SmolLM2-135M with the same calibration windows and is scored on the same WikiText-2 test
windows. Prints a table and writes benchmarks/results/one_shot_quality.json.

    SECATEURS_DATA=../shared/data python benchmarks/one_shot_quality.py --n-samples 8 --seq-len 512 --windows 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import secateurs
from secateurs.data.calib import CalibConfig

from records import run_record, save_results

VARIANTS = (
    ("magnitude", "unstructured", 0.5, "uniform"),
    ("wanda", "unstructured", 0.5, "uniform"),
    ("sparsegpt", "unstructured", 0.5, "uniform"),
    ("magnitude", "2:4", None, "uniform"),
    ("wanda", "2:4", None, "uniform"),
    ("sparsegpt", "2:4", None, "uniform"),
    ("wanda", "4:8", None, "uniform"),
    ("sparsegpt", "4:8", None, "uniform"),
    ("wanda", "8:16", None, "uniform"),
    ("sparsegpt", "8:16", None, "uniform"),
    ("wanda", "unstructured", 0.7, "uniform"),
    ("wanda", "unstructured", 0.7, "owl"),
    ("sparsegpt", "unstructured", 0.7, "uniform"),
    ("sparsegpt", "unstructured", 0.7, "owl"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="MODEL as secateurs takes it (shortcut, folder, hub id or .gguf file).")
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None,
                        help="Comma-separated rows to run, as method:pattern:sparsity:allocation (e.g. wanda:unstructured:0.7:owl).")
    parser.add_argument("--config", action="append", default=[],
                        help="Run this PruneConfig instead of the fixed rows: a JSON object of its fields, e.g. "
                             '\'{"method": "wanda", "pattern": "2:4", "reconstruct": {"steps": 32}}\' (repeatable).')
    parser.add_argument("--no-dense", action="store_true", help="Skip the dense row.")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "one_shot_quality.json")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    calib = CalibConfig("wikitext2", args.n_samples, args.seq_len, args.seed)
    engine = secateurs.EngineOptions(device="cpu")

    def ppl(loaded) -> float:
        return secateurs.evaluate_perplexity(loaded, ["wikitext2"], args.seq_len, args.windows, device="cpu")["wikitext2"].ppl

    rows = [] if args.no_dense else [{"method": "dense", "pattern": "-", "sparsity": 0.0, "allocation": "-",
                                      "ppl": ppl(secateurs.load_model(args.model)), "prune_s": 0.0}]
    runs = [run_record("dense", args.model, [], {"wikitext2": row["ppl"]}) for row in rows]
    configs = [secateurs.PruneConfig(**json.loads(text)) for text in args.config] or [
        secateurs.PruneConfig(method, sparsity, pattern, allocation=allocation)
        for method, pattern, sparsity, allocation in VARIANTS
        if wanted is None or f"{method}:{pattern}:{sparsity}:{allocation}" in wanted
    ]
    for config in configs:
        loaded = secateurs.load_model(args.model)
        start = time.perf_counter()
        report = secateurs.prune(loaded, config, calib, engine)
        seconds = time.perf_counter() - start
        rows.append({"method": config.method, "pattern": config.pattern, "sparsity": round(report.achieved, 4),
                     "allocation": config.allocation, "options": config.options, "reconstruct": config.reconstruct,
                     "permute": config.permute, "ppl": ppl(loaded), "prune_s": round(seconds, 1),
                     "stages": {k: round(v, 1) for k, v in report.stage_seconds.items()}})
        label = f"{config.method} {config.pattern} {rows[-1]['sparsity']:.2f} {config.allocation}"
        runs.append(run_record(label, args.model, [report.stage_record()], {"wikitext2": rows[-1]["ppl"]}))
        print(rows[-1], flush=True)
    dense = rows[0]["ppl"] if rows and rows[0]["method"] == "dense" else float("nan")
    print(f"\n{args.model}, WikiText-2 first {args.windows}×{args.seq_len} windows; calibration "
          f"{args.n_samples}×{args.seq_len} WikiText-2 (validation file), seed {args.seed}")
    print(f"{'method':10s} {'pattern':13s} {'alloc':8s} {'steps':28s} {'sparsity':>8s} {'ppl':>10s} {'÷dense':>7s} {'prune s':>8s}")
    for r in rows:
        steps = " ".join(filter(None, [f"reconstruct={r['reconstruct']}" if r.get("reconstruct") is not None else "",
                                       "permute" if r.get("permute") else "", str(r.get("options") or "")]))
        print(f"{r['method']:10s} {r['pattern']:13s} {r['allocation']:8s} {steps:28s} {r['sparsity']:8.4f} {r['ppl']:10.3f} "
              f"{r['ppl'] / dense:7.2f} {r['prune_s']:8.1f}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    save_results(args.results, {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                                "args": settings, "rows": rows}, runs)


if __name__ == "__main__":
    main()
