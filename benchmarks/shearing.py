"""LLM-Shearing vs LLM-Pruner vs GradMAP layer removal at the same size and the same training tokens.

    SECATEURS_DATA=../shared/data OMP_NUM_THREADS=1 nice -n 10 python benchmarks/shearing.py \
        --model smollm2-135m --target layers=24,hidden=528,heads=6,kv_heads=2,intermediate=1344 \
        --prune-steps 16 --continue-steps 16 --batch-size 2 --seq-len 256 --windows 8

Arms (each starts from a fresh load of the model):

* ``shear``: L0 masks learned for ``--prune-steps`` toward the target, sliced, then
  ``--continue-steps`` of continued pretraining (dynamic batch loading over ``--data``);
* ``llm-pruner``: LLM-Pruner (Taylor, global ranking of heads and channels) cut to the sheared
  model's block-parameter fraction, then ``prune + continue`` steps of the same training loop;
* ``gradmap``: GradMAP removes whole layers down to the closest layer count, then the same steps.

Every arm is trained with the same loop, data domains, batch and sequence length, so all three see
the same number of training tokens; perplexity is WikiText-2 test, first ``--windows`` windows,
before and after training, and as a ratio to the dense model. ``--arms`` runs a subset (results are
saved per arm under benchmarks/results/shearing/ and the table is built from all saved arms).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from secateurs.api import evaluate_perplexity, shear, width
from secateurs.data.calib import CalibConfig
from secateurs.depth.prune import LayerConfig, prune_layers
from secateurs.engine.sequential import EngineOptions
from secateurs.model.load import load_model
from secateurs.structured.shearing.dynamic_batch import Domains, TrainSettings, held_out_losses, pretrain
from secateurs.structured.base import WidthConfig
from secateurs.structured.shearing import ShearConfig, ShearTarget, non_embedding_params, plan_for

from records import save_results

RESULTS = Path(__file__).parent / "results" / "shearing"


def _ppl(loaded, args) -> float:
    result = evaluate_perplexity(loaded, ["wikitext2"], args.eval_seq_len, args.windows, device=args.device)["wikitext2"]
    return result.ppl


def _train_baseline(loaded, args, device, domains: Domains) -> dict:
    """The same loop and tokens as shearing's two phases together, the same dense reference losses."""
    settings = TrainSettings(steps=args.prune_steps + args.continue_steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, update_every=args.update_every, seed=args.seed)
    return pretrain(loaded.model, domains, settings, device, description="train").to_dict()


def run_arm(arm: str, args) -> dict:
    device = EngineOptions(device=args.device).torch_device()
    loaded = load_model(args.model)
    before = non_embedding_params(loaded)
    target = ShearTarget.parse(args.target)
    plan = plan_for(loaded, target)
    row: dict = {"arm": arm, "params_before": before}
    clock = time.perf_counter()
    if arm == "dense":
        row.update(params_after=before, ppl_pruned=_ppl(loaded, args), ppl_trained=None, tokens=0)
        return row
    if arm == "shear":
        config = ShearConfig(target, datasets=args.data, steps=args.prune_steps, continue_steps=0,
                             batch_size=args.batch_size, seq_len=args.seq_len, update_every=args.update_every,
                             eval_windows=args.eval_windows, seed=args.seed)
        report = shear(loaded, config, EngineOptions(device=args.device))
        row["prune_phase"] = report.prune_log.to_dict()
        row["ppl_pruned"] = _ppl(loaded, args)
        domains = Domains.load(args.data, loaded.tokenizer, args.seq_len, args.eval_windows)
        domains.weights = torch.tensor(report.prune_log.domain_weights[-1], dtype=torch.float64)
        if domains.dynamic:
            domains.reference = torch.tensor(report.reference_loss, dtype=torch.float64)
        settings = TrainSettings(steps=args.continue_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                 update_every=args.update_every, seed=args.seed + 1)
        row["train"] = pretrain(loaded.model, domains, settings, device, description="continue").to_dict()
        row["shape"] = report.plan.target
    else:
        fraction = plan.target_params / plan.source_params
        calib = CalibConfig("wikitext2", args.calib_samples, args.seq_len, args.seed)
        domains = Domains.load(args.data, loaded.tokenizer, args.seq_len, args.eval_windows)
        if domains.dynamic:  # as in shearing: the source (dense) model's held-out losses
            domains.reference = held_out_losses(loaded.model, domains, device)
        if arm == "llm-pruner":
            width(loaded, WidthConfig("llm-pruner", ratio=1 - fraction, target="both", mode="global"), calib,
                  EngineOptions(device=args.device))
        elif arm == "gradmap":
            layers = loaded.spec.num_layers(loaded.model.config)
            remove = layers - round(layers * fraction)
            prune_layers(loaded, LayerConfig("gradmap", remove, options={"one_shot": True}), calib,
                         EngineOptions(device=args.device))
        else:
            raise SystemExit(f"unknown arm {arm}")
        row["ppl_pruned"] = _ppl(loaded, args)
        row["train"] = _train_baseline(loaded, args, device, domains)
    row["ppl_trained"] = _ppl(loaded, args)
    row["params_after"] = non_embedding_params(loaded)
    row["tokens"] = (args.prune_steps + args.continue_steps) * args.batch_size * args.seq_len
    row["seconds"] = round(time.perf_counter() - clock, 1)
    return row


def table(rows: dict[str, dict]) -> str:
    dense = rows.get("dense", {}).get("ppl_pruned")
    lines = ["| arm | block params kept | tokens | ppl after pruning | ppl after training | ratio to dense | wall s |",
             "|---|---|---|---|---|---|---|"]
    for arm in ("dense", "shear", "llm-pruner", "gradmap"):
        row = rows.get(arm)
        if row is None:
            continue
        trained = row.get("ppl_trained")
        final = trained if trained is not None else row["ppl_pruned"]
        ratio = f"{final / dense:.2f}" if dense else "-"
        lines.append(
            f"| {arm} | {row['params_after'] / row['params_before']:.1%} | {row['tokens']:,} | {row['ppl_pruned']:.2f} | "
            f"{'-' if trained is None else f'{trained:.2f}'} | {ratio} | {row.get('seconds', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target", default="layers=24,hidden=528,heads=6,kv_heads=2,intermediate=1344")
    parser.add_argument("--arms", default="dense,shear,llm-pruner,gradmap")
    parser.add_argument("--data", default="wikitext2,ptb")
    parser.add_argument("--prune-steps", type=int, default=16)
    parser.add_argument("--continue-steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--update-every", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-only", action="store_true", help="Only print the table of saved arms.")
    args = parser.parse_args()
    args.data = [d for d in args.data.split(",") if d]
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for arm in args.arms.split(","):
            row = run_arm(arm, args)
            row["settings"] = {k: v for k, v in vars(args).items() if k not in ("arms", "table_only")}
            row["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(),
                              "device": str(EngineOptions(device=args.device).torch_device())}
            save_results(RESULTS / f"{arm}.json", row)
            print(f"{arm}: {json.dumps({k: v for k, v in row.items() if k.startswith('ppl')})}", flush=True)
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    print(table(rows))


if __name__ == "__main__":
    main()
