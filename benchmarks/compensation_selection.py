"""Projection compensation under each way of deciding what to fold, on layer sets already chosen.

    SECATEURS_DATA=../shared/data python benchmarks/compensation_selection.py \\
        --from benchmarks/results/layer_pruning_cpu_token_gate.json --cases gradmap:6 \\
        --n-samples 16 --seq-len 256 --batch-size 4 --windows 10 --out compensation_rules_cpu.json

Reads the removed layers of each (criterion, count) from a ``layer_pruning.py`` results file, uses
the calibration and evaluation windows of that run (pass the same sizes), and prints WikiText-2
perplexity: plain removal, then compensation with each variant: ``fixed`` (α = 0.01 fitted on every
batch, ``select=false``), ``mean`` (λ by 4-fold cross-validated next-token loss, folded when its
mean held-out loss beats leaving the layer alone) and ``every_fold`` (the default: folded only when
it beats leaving the layer alone on every fold). Writes the rows to benchmarks/results/--out.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from secateurs.data.calib import CalibConfig, calibration_ids, tokenize
from secateurs.data.sources import load_text
from secateurs.depth.compensation import CompensationOptions, compensate
from secateurs.evaluate.perplexity import perplexity
from secateurs.model.drop_layers import layers_removed
from secateurs.model.load import load_model

from records import save_results

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"fixed": CompensationOptions(select=False), "mean": CompensationOptions(accept="mean"),
            "every_fold": CompensationOptions(accept="every_fold")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, default=RESULTS / "layer_pruning.json")
    parser.add_argument("--cases", default="gradmap:6", help="Comma-separated criterion:count, as labelled in --from.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="compensation_rules.json")
    args = parser.parse_args()
    recorded = json.loads(args.source.read_text())["rows"]
    device = torch.device(args.device)
    loaded = load_model("smollm2-135m")
    model, spec = loaded.model.to(device), loaded.spec
    ids = calibration_ids(CalibConfig("wikitext2", args.n_samples, args.seq_len, 0), loaded.tokenizer, model)
    batches = [b.to(device) for b in ids.split(args.batch_size)]
    test_ids = tokenize(loaded.tokenizer, load_text("wikitext2", "test"))

    def ppl(m) -> float:
        return perplexity(m, test_ids, 512, args.windows, device, 2).ppl

    rows = []
    for case in args.cases.split(","):
        label, count = case.rsplit(":", 1)
        removed = next(r["removed"] for r in recorded if r["method"] == label and r["remove"] == int(count))
        with layers_removed(model, spec, removed):
            row = {"method": label, "remove": int(count), "removed": removed, "ppl": ppl(model)}
        for name in args.variants.split(","):
            work = copy.deepcopy(model)
            info = compensate(work, spec, removed, batches, VARIANTS[name])
            with layers_removed(work, spec, removed):
                row[name] = {"ppl": ppl(work), "alpha": info["alpha"], "layer": info["layer"],
                             "held_out_loss": info["held_out_loss"], "per_fold": info["held_out_loss_per_fold"]}
            del work
        rows.append(row)
        print(json.dumps(row), flush=True)
        save_results(RESULTS / args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    names = args.variants.split(",")
    print("\n| criterion | removed | ppl | " + " | ".join(f"+ compensation, {n}" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r[n]['ppl']:.2f} ({'not folded' if r[n]['alpha'] is None else 'α=' + format(r[n]['alpha'], 'g')})"
                 for n in names]
        print(f"| {r['method']} | {r['remove']} | {r['ppl']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
