"""Issue 31: recovery by distillation from the dense model against recovery on the LM loss, one table.

For each pruning recipe the pruned model is recovered twice from the same pruned weights, once on the
language-modelling loss and once on logit KD from the dense model (Minitron's defaults: KL alone,
temperature 1; the teacher runs beside the student, its logits computed on the fly):

* ``a``: SparseGPT 2:4 + block reconstruction, then LoRA that keeps the 2:4 masks (lr ``--lora-lr``);
* ``b``: LLM-Pruner 20% width (heads + channels, Taylor), then full fine-tuning (lr ``--full-lr``);
* ``c``: GradMAP removing 6 of 30 layers, then full fine-tuning;
* ``d``: LLM-Shearing: L0 masks learned toward ``--shear-target`` (the shape of benchmarks/shearing.py),
  sliced, then continued pretraining (full fine-tuning, as shearing's second phase);
* ``e``: LLM-Pruner (global ranking) cut to the sheared model's block-parameter fraction, then full
  fine-tuning on the LM loss only: the same-shape baseline shearing lost to by 15% (shearing.md).

Every recovery reads the same ``--tokens`` of the same training windows (seeded windows of WikiText-2
"train", locally its validation file, repeated ``--epochs`` times at most), and measures the same
held-out curve (the first ``--eval-windows`` windows of the WikiText-2 test split, every
``--eval-every`` steps). Each model is then measured on the WikiText-2 and PTB test splits
(perplexity), KL(dense ‖ model) and top-1 agreement with the dense model (first ``--agree-windows``
WikiText-2 test windows), and optionally zero-shot accuracy (lm-eval, ``--zeroshot-limit``). The
dense model's row comes first. Each row is written to ``--results`` as soon as it finishes, so a
run cut off keeps what it measured; ``--table`` prints the table of a results file.

    SECATEURS_DATA=../shared/data python benchmarks/distill_tables.py --model MODEL.gguf --device cuda

On an H100 one 2M-token recovery takes about 80 s (LoRA: 26k tokens/s), so the whole matrix (nine
recoveries, shearing's mask learning, fourteen measurements) takes about 15 minutes in one process:
split it over calls with ``--cases a,b`` then ``--cases c,d,e --keep``, or run the cases side by side
with ``--jobs N`` (one child process per case, at most N at once, on the same GPU: a 135M model leaves
an H100 mostly idle, launch-bound). Side by side, each row's tokens/s is measured while sharing the
GPU (``concurrent_jobs`` in its row says with how many); the recovery-cost goal (tokens/s with and
without the teacher) is read from a ``--jobs 1`` run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from records import save_results

RESULTS = Path(__file__).parent / "results" / "distill_tables.json"
CASES = {
    "a": "SparseGPT 2:4 + reconstruction, LoRA keeping masks",
    "b": "LLM-Pruner 20% width, full fine-tune",
    "c": "GradMAP -6 layers, full fine-tune",
    "d": "LLM-Shearing, continued pretraining",
    "e": "LLM-Pruner to the sheared size, full fine-tune",
}


def fresh(base):
    """A copy of the dense model (on the CPU) to prune: every row starts from the same weights."""
    from secateurs.model.load import LoadedModel

    return LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.spec, base.source, base.local_path)


LOSSES = ("lm", "kd", "kd+lm")
"""The recovery losses a case can be trained on: the language-modelling loss, logit KD alone (Minitron), and
``--alpha`` · KD + (1 − ``--alpha``) · LM, the mix for where KD alone lost to the LM loss on the training text's
own corpus (the H100 run: WikiText-2 for three of four recipes, while KD won PTB in all four)."""


def recover_config(args, loss: str):
    """The recovery settings every row shares; only the loss differs between a row's recoveries."""
    from secateurs.recover.config import RecoverConfig
    from secateurs.training.config import DistillConfig

    distill = {"lm": DistillConfig(), "kd": DistillConfig(loss="kl", temperature=args.temperature),
               "kd+lm": DistillConfig(loss="kl+lm", temperature=args.temperature, alpha=args.alpha)}[loss]

    return RecoverConfig(
        lr=args.lora_lr, batch_size=args.batch_size, seq_len=args.seq_len, data="wikitext2", seed=args.seed,
        precision="auto", gradient_checkpointing=False, tokens=args.tokens, epochs=args.epochs,
        eval_data="wikitext2", eval_every=args.eval_every, eval_windows=args.eval_windows,
        distill=distill,
    )


def run_lora(loaded, teacher, args, device, loss: str):
    """Masked LoRA (the recover stage), merged: the pruned zeros stay zero."""
    from secateurs.recover.lora import recover_lora

    report = recover_lora(loaded, recover_config(args, loss), device, teacher=None if loss == "lm" else teacher)
    if not report.zeros_kept:
        raise SystemExit("LoRA recovery lost the 2:4 zeros")
    return report.log, {"zeros_kept": report.zeros_kept, "sparsity_after": report.sparsity_after}


def run_full(loaded, teacher, args, device, loss: str):
    """Every weight trained by the one training loop, on the same windows and held-out set as LoRA's
    (``prepare``), with the full-model schedule of shearing's phases (warm-up, cosine decay)."""
    from secateurs.recover.lora import prepare
    from secateurs.structured.shearing.dynamic_batch import TrainSettings
    from secateurs.training.loop import SeededWindows, train

    config, ids, objective, held_out = prepare(loaded, recover_config(args, loss), device,
                                               teacher=None if loss == "lm" else teacher)
    settings = TrainSettings(steps=config.steps, lr=args.full_lr, batch_size=config.batch_size, seq_len=config.seq_len,
                             bf16=device.type == "cuda", seed=args.seed)
    batches = SeededWindows(ids, config.batch_size, config.seq_len, config.seed, config.data)
    log = train(loaded.model, dict(loaded.model.named_parameters()), batches, settings.plan(None), device,
                description=loss, distill=objective, held_out=held_out)
    return log, {}


class Measure:
    """What every row is measured on: the dense teacher (on the device), the agreement windows."""

    def __init__(self, teacher, args, device) -> None:
        from secateurs.data.calib import tokenize
        from secateurs.data.sources import load_text

        self.teacher, self.args, self.device = teacher, args, device
        ids = tokenize(teacher.tokenizer, load_text("wikitext2", "test"))
        need = args.agree_windows * args.eval_seq_len
        self.windows = ids[:need].reshape(args.agree_windows, args.eval_seq_len)
        self.curve_windows = ids[: args.eval_windows * args.seq_len].reshape(args.eval_windows, args.seq_len)

    def held_out_loss(self, loaded) -> float:
        """Mean loss on the recoveries' held-out windows, under the same autocast: where their curves aim."""
        from secateurs.evaluate.loss import mean_loss

        cast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        loaded.model.to(self.device)
        return mean_loss(loaded.model, self.curve_windows.split(1), self.device, cast)

    def __call__(self, loaded) -> dict:
        from secateurs.api import evaluate_perplexity
        from secateurs.evaluate.agreement import agreement

        args = self.args
        found = evaluate_perplexity(loaded, ["wikitext2", "ptb"], args.eval_seq_len, args.ppl_windows,
                                    device=str(self.device), batch_size=args.eval_batch)
        home = next(loaded.model.parameters()).device
        loaded.model.to(self.device)
        try:
            agree = agreement(loaded.model, self.teacher.model, self.windows, self.device, args.eval_batch)
        finally:
            loaded.model.to(home)
        result = {"wikitext2_ppl": found["wikitext2"].ppl, "ptb_ppl": found["ptb"].ppl, "kl": agree.kl,
                  "top1": agree.top1}
        if args.zeroshot_limit is not None:
            from secateurs.evaluate.zeroshot import zero_shot

            limit = None if args.zeroshot_limit == 0 else args.zeroshot_limit
            try:
                scores = zero_shot(loaded, limit=limit, device=str(self.device), batch_size=args.eval_batch)
            except Exception as error:  # lm-eval's own failure must not cost the row its perplexities
                result["zeroshot_error"] = f"{type(error).__name__}: {error}"
                print(f"zero-shot failed: {result['zeroshot_error']}", flush=True)
            else:
                result["zeroshot_mean"] = scores.mean_acc
                result["zeroshot"] = scores.to_dict()
        return result


class Table:
    """The results file: settings, machine, one row per (case, loss), rewritten after every row."""

    def __init__(self, args) -> None:
        self.path = args.results
        previous = json.loads(self.path.read_text()) if self.path.is_file() and args.keep else {}
        self.rows = {(r["case"], r["loss"]): r for r in previous.get("rows", [])}
        card = torch.cuda.get_device_name() if args.device_obj.type == "cuda" else f"CPU ({platform.machine()})"
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    if k not in ("device_obj", "table")}
        self.payload = {"settings": settings, "card": card, "torch": torch.__version__}

    def add(self, row: dict) -> None:
        self.rows[(row["case"], row["loss"])] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_results(self.path, {**self.payload, "rows": list(self.rows.values())})
        print(f"ROW {json.dumps({k: v for k, v in row.items() if k not in ('held_out', 'detail', 'zeroshot')})}",
              flush=True)


def recovered_row(case: str, loss: str, log, measured: dict, pruned: dict, extra: dict) -> dict:
    """One recovery's row: its measurements, cost and held-out curve ([tokens seen, loss] pairs); ``pruned``
    repeats the pruned model's row so each recovery reads alone."""
    return {"case": case, "recipe": CASES[case], "loss": loss, **measured, "tokens": log.tokens, "steps": log.steps,
            "recover_seconds": round(log.seconds, 2), "tokens_per_s": round(log.tokens / log.seconds, 1),
            "precision": log.precision, "final_train_loss": log.to_dict()["final_loss"], "held_out": log.held_out,
            "pruned": pruned, **extra}


def run_case(case: str, base, teacher, measure: Measure, table: Table, args, device) -> None:
    """Prune a fresh copy once, measure it (its own row, saved before any training), then recover it on
    each loss from the same pruned weights."""
    from secateurs.api import PruneConfig, prune, prune_layers, shear, width
    from secateurs.data.calib import CalibConfig
    from secateurs.depth.prune import LayerConfig
    from secateurs.engine.sequential import EngineOptions
    from secateurs.sparsity.config import parse_reconstruct
    from secateurs.structured.base import WidthConfig, count_parameters
    from secateurs.structured.shearing import (
        ShearConfig,
        ShearTarget,
        non_embedding_params,
        plan_for,
    )

    engine = EngineOptions(device=str(device))
    calib = CalibConfig("wikitext2", args.calib_samples, args.calib_seq_len, args.seed)
    loaded = fresh(base)
    clock = time.perf_counter()
    detail: dict = {}
    if case == "a":
        report = prune(loaded, PruneConfig("sparsegpt", None, "2:4", reconstruct=parse_reconstruct(args.reconstruct)),
                       calib, engine)
        detail = {"achieved_sparsity": report.achieved, "notes": report.notes,
                  "blocks_reconstructed": sum(o["step"] > 0 for o in report.reconstruction.values())}
    elif case == "b":
        report = width(loaded, WidthConfig("llm-pruner", 0.2, target="both"), CalibConfig("wikitext2", 10, 128, args.seed),
                       engine)
        detail = {"param_reduction": report.reduction}
    elif case == "c":
        report = prune_layers(loaded, LayerConfig("gradmap", remove=6), calib, engine)
        detail = {"removed_layers": report.removed}
    elif case == "d":
        config = ShearConfig(ShearTarget.parse(args.shear_target), datasets=["wikitext2"], steps=args.shear_steps,
                             batch_size=args.shear_batch, seq_len=args.seq_len, bf16=device.type == "cuda",
                             eval_windows=2, seed=args.seed)
        report = shear(loaded, config, engine)
        detail = {"mask_tokens": report.prune_log.tokens, "mask_seconds": round(report.prune_log.seconds, 1),
                  "shape": report.plan.target}
    elif case == "e":
        plan = plan_for(loaded, ShearTarget.parse(args.shear_target))
        ratio = 1 - plan.target_params / plan.source_params
        report = width(loaded, WidthConfig("llm-pruner", ratio=ratio, target="both", mode="global"), calib, engine)
        detail = {"ratio": ratio}
    else:
        raise SystemExit(f"unknown case {case!r}; use any of {', '.join(CASES)}")
    pruned = {"seconds": round(time.perf_counter() - clock, 1), "params": count_parameters(loaded.model),
              "block_params": non_embedding_params(loaded), **detail, **measure(loaded)}
    table.add({"case": case, "recipe": CASES[case], "loss": "none (pruned)", **pruned, "tokens": 0})
    state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    recover = run_lora if case == "a" else run_full
    losses = ["lm"] if case == "e" else args.losses  # e is the LM-loss baseline of "shearing + KD <= LLM-Pruner + LM"
    for loss in losses:
        if loss != losses[0]:
            loaded.model.load_state_dict(state)
        log, extra = recover(loaded, teacher, args, device, loss)
        table.add(recovered_row(case, loss, log, measure(loaded), pruned, extra))


def print_table(path: Path) -> None:
    """The markdown table of a results file, with each row's ratio to the dense model."""
    data = json.loads(path.read_text())
    rows = data["rows"]
    dense = next((r for r in rows if r["case"] == "dense"), None)
    print(f"card: {data['card']}")
    print("| recipe | loss | WikiText-2 ppl | ÷ dense | PTB ppl | KL vs dense | top-1 | zero-shot | tokens | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['wikitext2_ppl'] / dense['wikitext2_ppl']:.2f}" if dense else "-"
        score = r.get("zeroshot_mean", r.get("zeroshot_mean_limit500"))  # the GPU table's came from a 500-document run
        zs = f"{score:.4f}" if score is not None else "-"
        speed = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        print(f"| {r.get('recipe', r['case'])} | {r['loss']} | {r['wikitext2_ppl']:.2f} | {ratio} | {r['ptb_ppl']:.2f} | "
              f"{r['kl']:.4f} | {r['top1']:.4f} | {zs} | {r.get('tokens', 0):,} | {speed} |")


def main() -> None:
    # No abbreviations: --jobs hands the children this command line less --jobs/--cases/--results/--keep
    # (_without), which an abbreviated spelling (--job, --case) would slip past.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", default="smollm2-135m", help="A .gguf file, folder or shortcut.")
    parser.add_argument("--cases", default="a,b,c,d,e", help=f"Comma-separated, run in this order: {', '.join(CASES)}.")
    parser.add_argument("--tokens", default="2M", help="Training tokens of every recovery.")
    parser.add_argument("--epochs", type=float, default=8.0,
                        help="Passes over the training text the budget may take (WikiText-2 train is ~0.27M tokens here).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's lr (benchmarks/recovery.py's).")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="Full fine-tuning's lr (shearing's phases').")
    parser.add_argument("--temperature", type=float, default=1.0, help="KD temperature (Minitron: 1).")
    parser.add_argument("--losses", default="lm,kd", help=f"Recovery losses per case, in order: {', '.join(LOSSES)}.")
    parser.add_argument("--alpha", type=float, default=0.5, help="kd+lm: the KD term's weight (the LM loss gets 1 - alpha).")
    parser.add_argument("--eval-every", type=int, default=49, help="Steps between held-out losses.")
    parser.add_argument("--eval-windows", type=int, default=16, help="Held-out windows of --seq-len (WikiText-2 test).")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=None, help="Perplexity windows per corpus (default: all).")
    parser.add_argument("--agree-windows", type=int, default=64, help="WikiText-2 test windows for KL / top-1.")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--zeroshot-limit", type=int, default=None,
                        help="Zero-shot documents per task (0: full splits; default: no zero-shot, it needs lm-eval).")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--reconstruct", default="on", help="Case a's --reconstruct (on, or steps=N,lr=X).")
    parser.add_argument("--shear-target", default="layers=24,hidden=528,heads=6,kv_heads=2,intermediate=1344")
    parser.add_argument("--shear-steps", type=int, default=250, help="Mask-learning steps (shearing.md's GPU run: 250).")
    parser.add_argument("--shear-batch", type=int, default=8, help="Mask-learning batch (shearing.md's GPU run: 8).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="Merge into the rows already in --results.")
    parser.add_argument("--table", type=Path, metavar="JSON", help="Print the table of a results file instead.")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Run the cases side by side, one child process per case, at most this many at once.")
    parser.add_argument("--no-dense", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: the parent measures it
    args = parser.parse_args()
    if args.table:
        print_table(args.table)
        return
    if args.jobs < 1:
        raise SystemExit("--jobs needs at least 1")
    args.losses = args.losses.split(",")
    unknown = [loss for loss in args.losses if loss not in LOSSES]
    if unknown:
        raise SystemExit(f"unknown --losses {unknown[0]!r}; use any of {', '.join(LOSSES)}")
    from secateurs.device import resolve_device
    from secateurs.model.load import load_model
    from secateurs.training.config import parse_tokens

    args.tokens = parse_tokens(args.tokens)
    device = args.device_obj = resolve_device(args.device)
    torch.manual_seed(args.seed)
    base = load_model(args.model)
    teacher = fresh(base)
    teacher.model.to(device).eval().requires_grad_(False)
    measure = Measure(teacher, args, device)
    table = Table(args)
    if not args.no_dense:
        table.add({"case": "dense", "recipe": "dense", "loss": "-", **measure(teacher), "tokens": 0,
                   "params": sum(p.numel() for p in teacher.model.parameters()),
                   "held_out_loss": measure.held_out_loss(teacher)})
    cases = args.cases.split(",")
    if args.jobs > 1 and len(cases) > 1:
        del base, teacher, measure  # the children load their own; the parent only merges their rows
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the teacher's blocks back to the GPU the children share
        side_by_side(cases, table, args)
    else:
        for case in cases:
            start = time.perf_counter()
            run_case(case, base, teacher, measure, table, args, device)
            print(f"case {case}: {time.perf_counter() - start:.1f} s", flush=True)
    if not args.no_dense:
        print_table(args.results)


def side_by_side(cases: list[str], table: Table, args) -> None:
    """Each case in a child process of this script (same settings, its own results file), at most
    ``args.jobs`` at once; each child's lines are echoed with its case as prefix, and its rows merged into
    ``table`` (marked with how many ran at once) as it ends, a failed child's too (its file holds every row
    it finished, as a cut-off run keeps what it measured). A child that fails is reported and the rest go on."""
    passed = _without(sys.argv[1:], valued=("--jobs", "--cases", "--results"), flags=("--keep",))
    concurrent = min(args.jobs, len(cases))
    lock = threading.Lock()  # rows arrive from several threads; the results file is rewritten per row
    with tempfile.TemporaryDirectory(prefix="distill-jobs-") as folder:
        def run(index: int, case: str) -> bool:
            """Run one case's child; True if it ended well."""
            out = Path(folder) / f"{index}-{case}.json"
            child = subprocess.Popen(
                [sys.executable, __file__, *passed, "--cases", case, "--results", str(out), "--no-dense"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in child.stdout:
                print(f"[{case}] {line}", end="", flush=True)
            code = child.wait()
            if not out.is_file():
                return False
            with lock:
                for row in json.loads(out.read_text())["rows"]:
                    table.add({**row, "concurrent_jobs": concurrent})
            return code == 0

        with ThreadPoolExecutor(max_workers=concurrent) as pool:
            futures = [(case, pool.submit(run, index, case)) for index, case in enumerate(cases)]
        failed = []
        for case, future in futures:
            try:
                ok = future.result()
            except Exception as exc:  # noqa: BLE001 - a child whose rows could not be read: reported with the rest
                print(f"[{case}] {type(exc).__name__}: {exc}", flush=True)
                ok = False
            if not ok:
                failed.append(case)
    if failed:
        print(f"cases that failed: {', '.join(failed)} (their lines above say why; rows they finished are kept)",
              flush=True)


def _without(argv: list[str], valued: tuple[str, ...], flags: tuple[str, ...]) -> list[str]:
    """``argv`` less the options ``valued`` (``--x V`` or ``--x=V``) and the bare ``flags``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in valued:
            skip = "=" not in arg
        elif name not in flags:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
