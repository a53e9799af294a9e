"""Width pruning on SmolLM2-135M: perplexity, parameters and CPU latency per method and ratio.

Every method removes the same number of MLP channels per layer (uniform ratio, ``--target
channels``; SmolLM2 has only 3 KV groups per layer, so heads come in 33% steps), which gives equal
parameter counts at each ratio. Torch-Pruning (the library LLM-Pruner is built on) runs beside ours
on the same model, calibration samples and ratio, with its group Taylor importance.

Latency is paired: each pruned model's forward passes alternate with the dense model's in the same
loop, and the ratio of the two medians is reported, so load from other processes on a shared machine
falls on both sides. ``--round-to 1,16`` also prunes every method with its kept MLP channels rounded
to a multiple of 16 (``secateurs width --round-to``), because an odd width can make the smaller model
slower than the dense one on a CPU.

    SECATEURS_DATA=../shared/data nice -n 10 python benchmarks/width_pruning.py
    SECATEURS_DATA=../shared/data python benchmarks/width_pruning.py --methods llm-pruner,flap \
        --round-to 1,16 --out benchmarks/results/width_pruning_round.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import secateurs
from secateurs.data.calib import CalibConfig, calibration_ids, tokenize
from secateurs.data.sources import load_text
from secateurs.evaluate.perplexity import perplexity
from secateurs.model.load import LoadedModel
from secateurs.model.slice import apply_widths
from secateurs.structured.base import WidthConfig, count_parameters, method_class, model_groups
from secateurs.structured.select import select_uniform

from records import run_record, save_results

METHODS = ("llm-pruner", "wanda-sp", "flap", "magnitude")


def paired_latency(model: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of one forward pass (batch 1) of ``model`` and of ``dense``, timed alternately
    after one warm-up each, so both medians see the same machine load."""
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for m in (model, dense):
            m(input_ids=ids, use_cache=False)
        for _ in range(repeats):
            for key, m in enumerate((model, dense)):
                start = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                times[key].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def torch_pruning_model(dense: LoadedModel, ratio: float, calib: torch.Tensor) -> torch.nn.Module:
    """Torch-Pruning's MetaPruner with group Taylor importance, MLP channels only, same samples."""
    import torch_pruning as tp

    model = copy.deepcopy(dense.model)
    spec = dense.spec
    ignored = [model.get_submodule(spec.lm_head)]
    for block in spec.blocks_of(model):
        ignored += [block.get_submodule(p) for p in (*spec.attention, spec.mlp[-1])]
    model.requires_grad_(True)
    for sample in calib:
        model(input_ids=sample[None], labels=sample[None], use_cache=False).loss.backward()
    pruner = tp.pruner.MetaPruner(
        model, calib[:1], importance=tp.importance.GroupTaylorImportance(), pruning_ratio=ratio,
        ignored_layers=ignored, root_module_types=[torch.nn.Linear], output_transform=lambda out: out.logits,
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    model.config.intermediate_size = spec.blocks_of(model)[0].get_submodule(spec.mlp[-1]).in_features
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--windows", type=int, default=10, help="WikiText-2 test windows of --seq-len")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib", type=int, default=32, help="samples (128 tokens) for wanda-sp / flap")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="our methods to run (torch-pruning always runs)")
    parser.add_argument("--round-to", default="1", help="comma-separated channel multiples; 1 = no rounding")
    parser.add_argument("--out", default="benchmarks/results/width_pruning.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    dense = secateurs.load_model("smollm2-135m")
    test_ids = tokenize(dense.tokenizer, load_text("wikitext2", "test"))
    timing_ids = test_ids[: args.seq_len][None]
    rows = []

    def measure(name: str, ratio: float, model: torch.nn.Module, seconds: float) -> None:
        ppl = perplexity(model, test_ids, args.seq_len, args.windows).ppl
        pruned_s, dense_s = paired_latency(model, dense.model, timing_ids, args.repeats)
        mlp = dense.spec.blocks_of(model)[0].get_submodule(dense.spec.mlp[-1]).in_features
        row = {"method": name, "ratio": ratio, "params": count_parameters(model), "mlp_width_layer0": mlp,
               "ppl": ppl, "latency_s": pruned_s, "dense_latency_s": dense_s, "prune_seconds": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)

    measure("dense", 0.0, dense.model, 0.0)
    llm_calib = None
    for name in args.methods.split(","):
        cls = method_class(name)
        config = WidthConfig(name, ratios[0], target="channels")
        method = cls(config)
        calib = None
        if cls.needs_calibration:
            n = cls.default_samples if name == "llm-pruner" else args.calib
            calib = calibration_ids(CalibConfig("wikitext2", n, 128, 0), dense.tokenizer)
            if name == "llm-pruner":
                llm_calib = calib
        start = time.perf_counter()
        scored = LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.spec, "smollm2-135m", None)
        groups = model_groups(scored, ("channels",))
        scores = method.scores(scored, groups, calib, torch.device("cpu"))
        score_seconds = time.perf_counter() - start
        for ratio in ratios:
            for round_to in [int(r) for r in args.round_to.split(",")]:
                start = time.perf_counter()
                pruned = LoadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.spec, "smollm2-135m", None)
                keep = select_uniform(scores, ratio, list(range(len(groups))), round_to)
                method.before_slice(pruned, groups, keep)
                apply_widths(pruned.model, pruned.spec, keep)
                label = name if round_to == 1 else f"{name} (round to {round_to})"
                measure(label, ratio, pruned.model, score_seconds + time.perf_counter() - start)
    for ratio in ratios:
        start = time.perf_counter()
        try:
            model = torch_pruning_model(dense, ratio, llm_calib)
        except Exception as exc:  # a peer library's failure is a result to report, not a crash
            rows.append({"method": "torch-pruning", "ratio": ratio, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(rows[-1], flush=True)
            continue
        measure("torch-pruning", ratio, model, time.perf_counter() - start)
    base = rows[0]
    for row in rows:
        if "ppl" in row:
            row["ppl_ratio_vs_dense"] = row["ppl"] / base["ppl"]
            row["latency_ratio_vs_dense"] = row["latency_s"] / row["dense_latency_s"]
            row["param_reduction"] = 1 - row["params"] / base["params"]
    print(f"\n| method | channel ratio | MLP width | params | param reduction | ppl (wt2, {args.windows}×{args.seq_len}) | ppl / dense | latency (ms) | latency / dense (paired) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "ppl" not in row:
            print(f"| {row['method']} | {row['ratio']} | failed: {row['error']} | | | | | | |")
            continue
        print(f"| {row['method']} | {row['ratio']:.2f} | {row['mlp_width_layer0']} | {row['params']:,} | {row['param_reduction']:.1%} | "
              f"{row['ppl']:.2f} | {row['ppl_ratio_vs_dense']:.3f} | {row['latency_s'] * 1e3:.0f} | "
              f"{row['latency_ratio_vs_dense']:.3f} |")
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "args": vars(args),
            "torch": torch.__version__}
    runs = [run_record("dense", "smollm2-135m", [], {"wikitext2": base["ppl"]})] + [
        run_record(f"{row['method']} {row['ratio']:.2f}", "smollm2-135m",
                   [{"stage": "width", "method": row["method"], "achieved": {"param_reduction": row["param_reduction"]},
                     "params": {"before": base["params"], "after": row["params"]}, "widths": []}],
                   {"wikitext2": row["ppl"]})
        for row in rows[1:] if "ppl" in row
    ]
    save_results(Path(args.out), {"meta": meta, "rows": rows}, runs)


if __name__ == "__main__":
    main()
