"""Zero-shot accuracy and perplexity of SmolLM2-135M, dense and pruned, in one run.

Variants: dense; magnitude / Wanda / SparseGPT at 50% unstructured and 2:4; GradMAP removing 6
layers; LLM-Pruner removing 20% of width. A variant whose method is not available (not registered
or failing) becomes a row that says why. Every variant sees the same calibration windows (WikiText-2
validation), then WikiText-2 test perplexity (first --limit-windows windows of --seq-len) and the
seven zero-shot tasks through lm-eval on the local copies (first --limit documents each).

Each variant's record (stages + results, the secateurs.json format) is written to
benchmarks/results/zeroshot/<variant>.json, and the table, plots and report.md are produced from
those records by ``secateurs report`` (``--report-only`` redoes just that step):

    SECATEURS_DATA=../shared/data nice -n 10 python benchmarks/zeroshot.py --limit 10 --limit-windows 10
"""

from __future__ import annotations

import argparse
import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from records import save_results

import secateurs
from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import EngineOptions
from secateurs.evaluate.zeroshot import PAPER_TASKS, zero_shot
from secateurs.record import build_record
from secateurs.report import write_report
from secateurs.runs import load_run

OUT = Path(__file__).parent / "results" / "zeroshot"


@dataclass(frozen=True)
class Variant:
    """One row: a pruning stage (kind + arguments) applied to a fresh dense model."""

    name: str
    kind: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


VARIANTS = (  # in the order they run, most wanted first, so a cut-short CPU run still has the key rows
    Variant("dense"),
    Variant("magnitude-50", "prune", {"method": "magnitude", "sparsity": 0.5}),
    Variant("wanda-50", "prune", {"method": "wanda", "sparsity": 0.5}),
    Variant("sparsegpt-50", "prune", {"method": "sparsegpt", "sparsity": 0.5}),
    Variant("gradmap-6-layers", "layers", {"method": "gradmap", "remove": 6}),
    Variant("llm-pruner-20", "width", {"method": "llm-pruner", "ratio": 0.2}),
    Variant("magnitude-2of4", "prune", {"method": "magnitude", "pattern": "2:4"}),
    Variant("wanda-2of4", "prune", {"method": "wanda", "pattern": "2:4"}),
    Variant("sparsegpt-2of4", "prune", {"method": "sparsegpt", "pattern": "2:4"}),
)


def prune_stage(loaded, variant: Variant, calib: CalibConfig, engine: EngineOptions) -> dict:
    """Apply the variant in place and return its stage record."""
    if variant.kind == "prune":
        from secateurs.sparsity.registry import method_names

        if variant.args["method"] not in method_names():
            raise LookupError(f"{variant.args['method']} is not registered")
        config = secateurs.PruneConfig(variant.args["method"], variant.args.get("sparsity"),
                                       variant.args.get("pattern", "unstructured"))
        return secateurs.prune(loaded, config, calib, engine).stage_record()
    if variant.kind == "layers":
        from secateurs.depth.prune import LayerConfig, prune_layers

        return prune_layers(loaded, LayerConfig(variant.args["method"], variant.args["remove"]), calib,
                            engine).stage_record()
    if variant.kind == "width":
        from secateurs.structured.base import WidthConfig, prune_width

        return prune_width(loaded, WidthConfig(variant.args["method"], variant.args["ratio"]), calib,
                           engine).stage_record()
    raise ValueError(variant.kind)


def run_variant(variant: Variant, args: argparse.Namespace, calib: CalibConfig, engine: EngineOptions) -> dict:
    loaded = secateurs.load_model("smollm2-135m")
    stages = [] if variant.kind is None else [prune_stage(loaded, variant, calib, engine)]
    results: dict[str, Any] = {}
    ppl = secateurs.evaluate_perplexity(loaded, ["wikitext2"], args.seq_len, args.limit_windows, None, args.device,
                                        args.batch_size)["wikitext2"]
    results["ppl_wikitext2"] = {"error": ppl} if isinstance(ppl, str) else ppl.to_dict()
    start = time.perf_counter()
    results["zeroshot"] = zero_shot(loaded, PAPER_TASKS, args.limit, None, args.device, args.batch_size).to_dict()
    results["zeroshot"]["seconds"] = round(time.perf_counter() - start, 1)
    record = build_record("smollm2-135m", stages, results)
    record["label"] = variant.name
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10, help="first N documents per zero-shot task (0: all)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--limit-windows", type=int, default=10, help="first N perplexity windows (0: all)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--only", default=None, help="comma-separated variant names to (re)run")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from saved records")
    args = parser.parse_args()
    args.limit = args.limit or None
    args.limit_windows = args.limit_windows or None
    OUT.mkdir(parents=True, exist_ok=True)
    calib = CalibConfig("wikitext2", args.calib_samples, args.seq_len, 0)
    engine = EngineOptions(device=args.device)
    chosen = set(args.only.split(",")) if args.only else {v.name for v in VARIANTS}
    missing: dict[str, str] = {}
    for variant in VARIANTS:
        path = OUT / f"{variant.name}.json"
        if args.report_only or variant.name not in chosen:
            continue
        start = time.perf_counter()
        try:
            record = run_variant(variant, args, calib, engine)
        except Exception as exc:  # a method another engineer is still building: report the row as missing
            missing[variant.name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            traceback.print_exc()
            path.unlink(missing_ok=True)
            continue
        record["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                             "device": args.device}
        record["seconds_total"] = round(time.perf_counter() - start, 1)
        save_results(path, record)
        print(f"{variant.name}: done in {record['seconds_total']} s", flush=True)
    runs = [load_run(OUT / f"{v.name}.json") for v in VARIANTS if (OUT / f"{v.name}.json").is_file()]
    report = write_report(runs, OUT, title="SmolLM2-135M: dense vs pruned, zero-shot and perplexity")
    print(report.read_text())
    summary = {"runs": [r.to_dict() for r in runs], "missing": missing,
               "not_run": [v.name for v in VARIANTS if not (OUT / f"{v.name}.json").is_file()]}
    save_results(OUT.parent / "zeroshot.json", summary)


if __name__ == "__main__":
    main()
