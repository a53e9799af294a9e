"""Projection compensation with and without selection of λ on unseen calibration batches, on layer sets already chosen.

    SECATEURS_DATA=/work/shared/data python benchmarks/compensation_selection.py \
        --cases "angular (Gromov):9,block-influence (ShortGPT):3,gradmap:3"

Reads the removed layers of each (criterion, count) from benchmarks/results/layer_pruning.json (so
it needs that run first), uses the same calibration (16 × 256 WikiText-2 tokens, batches of 4) and
evaluation windows, and prints WikiText-2 perplexity: plain removal, compensation fitted on every
batch with the fixed α (``select=false``, what layer_pruning.json records), and with the default
selection (λ scored by cross-validated next-token loss on the calibration batches, nothing folded
when no λ beats leaving the layer alone). Writes benchmarks/results/compensation_selection.json.
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

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="angular (Gromov):9,block-influence (ShortGPT):3,gradmap:3")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--windows", type=int, default=10)
    args = parser.parse_args()
    recorded = json.loads((RESULTS / "layer_pruning.json").read_text())["rows"]
    loaded = load_model("smollm2-135m")
    model, spec = loaded.model, loaded.spec
    ids = calibration_ids(CalibConfig("wikitext2", args.n_samples, args.seq_len, 0), loaded.tokenizer, model)
    batches = list(ids.split(args.batch_size))
    test_ids = tokenize(loaded.tokenizer, load_text("wikitext2", "test"))

    def ppl(m) -> float:
        return perplexity(m, test_ids, 512, args.windows, torch.device("cpu"), 2).ppl

    rows = []
    for case in args.cases.split(","):
        label, count = case.rsplit(":", 1)
        removed = next(r["removed"] for r in recorded if r["method"] == label and r["remove"] == int(count))
        with layers_removed(model, spec, removed):
            row = {"method": label, "remove": int(count), "removed": removed, "ppl": ppl(model)}
        for name, select in (("fixed_alpha", False), ("held_out_selection", True)):
            work = copy.deepcopy(model)
            info = compensate(work, spec, removed, batches, CompensationOptions(select=select))
            with layers_removed(work, spec, removed):
                row[name] = {"ppl": ppl(work), "alpha": info["alpha"], "layer": info["layer"],
                             "held_out_loss": info["held_out_loss"]}
            del work
        rows.append(row)
        print(json.dumps(row), flush=True)
        (RESULTS / "compensation_selection.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| criterion | removed | ppl | + compensation, fixed α | + compensation, selected λ (chosen α) |")
    print("|---|---|---|---|---|")
    for r in rows:
        chosen = r["held_out_selection"]
        alpha = "not folded" if chosen["alpha"] is None else f"α={chosen['alpha']:g}"
        print(f"| {r['method']} | {r['remove']} | {r['ppl']:.2f} | {r['fixed_alpha']['ppl']:.2f} | {chosen['ppl']:.2f} ({alpha}) |")


if __name__ == "__main__":
    main()
