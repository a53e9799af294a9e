"""secateurs vs llm-compressor on SmolLM2-135M: Wanda, SparseGPT, magnitude and OWL, side by side.

Both tools prune the same model from the same calibration token windows (seeded windows of the
WikiText-2 training text, ``calibration_ids``) and are scored by the same code on the same
WikiText-2 test windows. Each prune runs in a fresh subprocess on the CPU, so its wall time and
peak resident memory belong to that prune alone (model load included for both tools; the time
covers the pruning call only). llm-compressor runs in its own virtual environment, never a
dependency of secateurs; ``--setup`` creates it (CPU torch first, so no CUDA build is pulled):

    python benchmarks/compare_llmcompressor.py --setup
    SECATEURS_DATA=../shared/data nice -n 10 python benchmarks/compare_llmcompressor.py \\
        --n-samples 64 --seq-len 512 --windows 20

Prints one table (method × pattern × tool → perplexity, wall and CPU seconds, peak MiB, and
our/their ratios)
and writes benchmarks/results/compare_llmcompressor.json. llm-compressor's magnitude modifier
prunes only on optimizer steps (nothing in one-shot), so magnitude is ours alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from records import save_results

RESULTS = Path(__file__).parent / "results"
LLMC_VENV = Path(os.environ.get("LLMC_VENV", Path(__file__).resolve().parents[2] / "llmc-venv"))  # beside the checkout
TORCH_WHEEL_INDEX = "https://download.pytorch.org/whl/cpu"

# (method, pattern, sparsity, allocation, tools[, extra PruneConfig fields]), most important first: the
# JSON is rewritten after every row, so an interrupted run still records what it measured.
BOTH = ("secateurs", "llmcompressor")
RECONSTRUCT = {"reconstruct": {}}  # the measured defaults of sparsity/reconstruct.py
RUNS = [
    ("wanda", "unstructured", 0.5, "uniform", BOTH),
    ("sparsegpt", "unstructured", 0.5, "uniform", BOTH),
    ("wanda", "2:4", None, "uniform", BOTH),
    ("sparsegpt", "2:4", None, "uniform", BOTH),
    ("wanda", "unstructured", 0.7, "uniform", BOTH),
    ("wanda", "unstructured", 0.7, "owl", ("secateurs",)),
    ("sparsegpt", "unstructured", 0.7, "uniform", BOTH),
    ("sparsegpt", "unstructured", 0.7, "owl", ("secateurs",)),
    ("magnitude", "unstructured", 0.5, "uniform", ("secateurs",)),
    ("magnitude", "2:4", None, "uniform", ("secateurs",)),
    ("wanda", "4:8", None, "uniform", BOTH),
    ("sparsegpt", "4:8", None, "uniform", BOTH),
    ("magnitude", "4:8", None, "uniform", ("secateurs",)),
    ("magnitude", "unstructured", 0.7, "uniform", ("secateurs",)),
    ("magnitude", "unstructured", 0.7, "owl", ("secateurs",)),
    # Issue 20's one-shot steps (ours only; --variants new).
    ("sparsegpt", "2:4", None, "uniform", ("secateurs",), RECONSTRUCT),
    ("ria", "2:4", None, "uniform", ("secateurs",), {"permute": True}),
    ("ria", "2:4", None, "uniform", ("secateurs",), {"permute": True, **RECONSTRUCT}),
    ("wanda", "2:4", None, "uniform", ("secateurs",), RECONSTRUCT),
    ("sparsegpt", "unstructured", 0.5, "uniform", ("secateurs",), RECONSTRUCT),
    ("sparsegpt", "unstructured", 0.7, "uniform", ("secateurs",), RECONSTRUCT),
    ("sparsegpt", "unstructured", 0.7, "atp", ("secateurs",), {"allocation_options": {"spread": 0.2}, **RECONSTRUCT}),
]


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over
    fork and exec, so a worker started by a parent holding the model would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process: less swayed than wall time by a crowded machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def variant(extra: dict) -> str:
    """A row's label for the one-shot steps beyond the plain method (issue 20's options), '' for none."""
    parts = []
    if extra.get("permute"):
        parts.append("permute")
    if extra.get("reconstruct") is not None:
        parts.append("reconstruct " + ",".join(f"{k}={v}" for k, v in extra["reconstruct"].items()) if extra["reconstruct"] else "reconstruct")
    if extra.get("allocation_options"):
        parts.append(",".join(f"{k}={v}" for k, v in extra["allocation_options"].items()))
    return " + ".join(parts)


def worker_secateurs(args: argparse.Namespace) -> dict:
    """Prune with secateurs from the same CalibConfig the parent used; save the state dict."""
    import torch

    import secateurs
    from secateurs.engine.sequential import EngineOptions

    torch.set_num_threads(args.threads)
    loaded = secateurs.load_model(args.model)
    sparsity = None if args.sparsity is None else float(args.sparsity)
    config = secateurs.PruneConfig(args.method, sparsity, args.pattern, allocation=args.allocation,
                                   **json.loads(args.extra or "{}"))
    calib = secateurs.CalibConfig("wikitext2", args.n_samples, args.seq_len, args.seed, args.data_dir)
    engine = EngineOptions(device="cpu")
    start, cpu_start = time.perf_counter(), cpu_seconds()
    report = secateurs.prune(loaded, config, calib, engine)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = peak_rss_mb()
    torch.save(loaded.model.state_dict(), args.state_out)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak, "achieved": report.achieved,
            "stages": {k: round(v, 2) for k, v in report.stage_seconds.items()}}


def worker_llmcompressor(args: argparse.Namespace) -> dict:
    """Prune with llm-compressor's oneshot on the parent's token windows; save the state dict."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = torch.load(args.calib_ids)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    sparsity = float(args.sparsity) if args.sparsity is not None else 0.5
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
    recipe = modifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    torch.manual_seed(args.seed)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = peak_rss_mb()
    torch.save(model.state_dict(), args.state_out)
    linears = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    achieved = sum(float((w == 0).float().mean()) for w in linears) / len(linears)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak, "achieved": achieved}


def setup_llmcompressor() -> None:
    """Create the separate virtual environment: CPU torch 2.13 first, then llm-compressor 0.14."""
    subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
    pip = [str(LLMC_VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0", "--extra-index-url", TORCH_WHEEL_INDEX], check=True)
    subprocess.run([*pip, "llmcompressor==0.14.*"], check=True)


def run_worker(python: str, tool: str, run: tuple, args: argparse.Namespace, tmp: Path, calib_path: Path) -> dict:
    method, pattern, sparsity, allocation, _, extra = (*run, {})[:6]
    state = tmp / f"{tool}-{method}-{pattern.replace(':', 'of')}-{sparsity}-{allocation}-{abs(hash(variant(extra)))}.pt"
    command = [python, __file__, "--worker", tool, "--method", method, "--pattern", pattern,
               "--allocation", allocation, "--model", args.model, "--calib-ids", str(calib_path),
               "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
               "--threads", str(args.threads), "--state-out", str(state)]
    if sparsity is not None:
        command += ["--sparsity", str(sparsity)]
    if extra:
        command += ["--extra", json.dumps(extra)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["state"] = str(state)
    return result


def evaluate(loaded, dense_state: dict, state_path: str | None, args: argparse.Namespace) -> float:
    import torch

    from secateurs.api import evaluate_perplexity

    state = dense_state if state_path is None else torch.load(state_path)
    loaded.model.load_state_dict(state)
    result = evaluate_perplexity(loaded, ["wikitext2"], args.seq_len, args.windows, args.data_dir, "cpu")
    if state_path is not None:
        os.unlink(state_path)
    return result["wikitext2"].ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="Create the llm-compressor venv and exit.")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=20, help="WikiText-2 test windows of --seq-len tokens.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("SECATEURS_DATA"))
    parser.add_argument("--only", default="", help="Comma-separated methods to run (default: all).")
    parser.add_argument("--patterns", default="", help="Comma-separated patterns to run, e.g. 2:4,4:8 (default: all).")
    parser.add_argument("--sparsities", default="", help="Comma-separated sparsities of unstructured rows to run, e.g. 0.7 (default: all).")
    parser.add_argument("--tools", default="secateurs,llmcompressor", help="Comma-separated tools to run.")
    parser.add_argument("--skip-dense", action="store_true", help="Do not re-measure the dense model (another run's file has it).")
    parser.add_argument("--variants", default="", help="Comma-separated row labels to run: plain (no extra step), "
                        "new (every row with one), or a label such as 'permute + reconstruct' (default: all).")
    parser.add_argument("--results", type=Path, default=RESULTS / "compare_llmcompressor.json",
                        help="JSON table to write (a filtered run adds to it).")
    parser.add_argument("--table", action="store_true", help="Print the table of the saved JSON and exit.")
    parser.add_argument("--merge", nargs="*", type=Path, default=[],
                        help="With --table: add these runs' rows (same calibration and windows) to --results first.")
    parser.add_argument("--worker", choices=["secateurs", "llmcompressor"], help=argparse.SUPPRESS)
    for name in ("--method", "--pattern", "--allocation", "--model", "--calib-ids", "--state-out", "--sparsity", "--extra"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        setup_llmcompressor()
        return
    if args.table:
        record = json.loads(args.results.read_text())
        for path in args.merge:
            other = json.loads(path.read_text())
            if (other["calibration"], other["evaluation"]) != (record["calibration"], record["evaluation"]):
                sys.exit(f"{path} used other calibration or evaluation settings than {args.results}")
            record["rows"] += other["rows"]
            record.setdefault("merged_from", []).append(path.name)
        if args.merge:
            save_results(args.results, record)
        print_table(record)
        return
    if args.worker:
        work = worker_secateurs if args.worker == "secateurs" else worker_llmcompressor
        print(json.dumps(work(args)))
        return
    compare(args)


def compare(args: argparse.Namespace) -> None:
    import torch

    import secateurs
    from secateurs.data.calib import CalibConfig, calibration_ids
    from secateurs.model.sources import _shortcut_folder

    llmc_python = LLMC_VENV / "bin" / "python"
    if not llmc_python.exists():
        sys.exit(f"llm-compressor venv not found at {LLMC_VENV}: run with --setup first")
    args.model = str(_shortcut_folder("smollm2-135m"))
    loaded = secateurs.load_model(args.model)
    calib = CalibConfig("wikitext2", args.n_samples, args.seq_len, args.seed, args.data_dir)
    ids = calibration_ids(calib, loaded.tokenizer)
    dense_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    wanted = set(filter(None, args.only.split(",")))
    patterns = set(filter(None, args.patterns.split(",")))
    sparsities = {float(v) for v in filter(None, args.sparsities.split(","))}
    tools = set(filter(None, args.tools.split(",")))
    variants = set(filter(None, args.variants.split(",")))
    out = args.results
    # A filtered run adds to (and replaces matching rows of) the saved table instead of starting over.
    filtered = wanted or patterns or sparsities or variants or tools != set(BOTH)
    kept = json.loads(out.read_text())["rows"] if filtered and out.is_file() else []
    record = {
        "model": "smollm2-135m",
        "calibration": {"source": "wikitext2 (validation text)", "n_samples": args.n_samples,
                        "seq_len": args.seq_len, "seed": args.seed},
        "evaluation": {"dataset": "wikitext2 test", "seq_len": args.seq_len, "windows": args.windows},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "cores": os.cpu_count(), "torch": torch.__version__},
        "rows": list(kept),
    }

    def save(row: dict) -> None:
        same = ("method", "pattern", "sparsity", "allocation", "tool", "variant")
        others = [r for r in kept if any(r.get(k, "") != row[k] for k in same)]
        kept[:] = others + [row]
        record["rows"] = list(kept)
        save_results(out, record)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="secateurs-llmc-") as tmp_name:
        tmp = Path(tmp_name)
        calib_path = tmp / "calib_ids.pt"
        torch.save(ids, calib_path)
        if not args.skip_dense:
            record["dense_ppl"] = evaluate(loaded, dense_state, None, args)
            print(f"dense: wikitext2 ppl {record['dense_ppl']:.3f}", flush=True)
        for run in RUNS:
            if (wanted and run[0] not in wanted) or (patterns and run[1] not in patterns):
                continue
            if sparsities and run[2] is not None and run[2] not in sparsities:
                continue
            label = variant((*run, {})[5])
            if variants and not ({label or "plain", "new" if label else "plain"} & variants):
                continue
            for tool in (t for t in run[4] if t in tools):
                python = sys.executable if tool == "secateurs" else str(llmc_python)
                result = run_worker(python, tool, run, args, tmp, calib_path)
                if "error" not in result:
                    result["ppl"] = evaluate(loaded, dense_state, result.pop("state"), args)
                row = {"method": run[0], "pattern": run[1], "sparsity": run[2], "allocation": run[3],
                       "tool": tool, "variant": variant((*run, {})[5]), **result}
                save(row)
                print(json.dumps(row), flush=True)
    print_table(record)
    print(f"wrote {out}")


def print_table(record: dict) -> None:
    """Markdown table: one line per (method, pattern, allocation), both tools side by side."""
    keyed: dict[tuple, dict[str, dict]] = {}
    for row in record["rows"]:
        label = row["pattern"] if row["sparsity"] is None else f"{row['sparsity']:.0%} {row['pattern']}"
        keyed.setdefault((row["method"], label, row["allocation"], row.get("variant", "")), {})[row["tool"]] = row

    def cell(row: dict | None, key: str, fmt: str) -> str:
        if row is None or key not in row and "error" not in row:
            return "—"
        return "error" if "error" in row else format(row[key], fmt)

    def ratio(ours: dict | None, theirs: dict | None, key: str) -> str:
        if not ours or not theirs or key not in ours or key not in theirs:
            return "—"
        return f"{ours[key] / theirs[key]:.2f}"

    calib, evaluation = record["calibration"], record["evaluation"]
    print(f"\nSmolLM2-135M, WikiText-2 test perplexity over {evaluation['windows']} × {evaluation['seq_len']} tokens "
          f"(dense {record.get('dense_ppl', float('nan')):.3f}); calibration {calib['n_samples']} × {calib['seq_len']} tokens; "
          f"time = the pruning call on {record['machine']['threads']} CPU threads\n")
    print("| method | sparsity | allocation | ppl secateurs | ppl llmc | ppl ratio | wall s secateurs | wall s llmc "
          "| wall ratio | CPU s secateurs | CPU s llmc | CPU ratio | peak MiB secateurs | peak MiB llmc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (method, label, allocation, steps), tools in keyed.items():
        ours, theirs = tools.get("secateurs"), tools.get("llmcompressor")
        print(f"| {method}{' + ' + steps if steps else ''} | {label} | {allocation} | {cell(ours, 'ppl', '.3f')} | {cell(theirs, 'ppl', '.3f')} "
              f"| {ratio(ours, theirs, 'ppl')} | {cell(ours, 'seconds', '.1f')} | {cell(theirs, 'seconds', '.1f')} "
              f"| {ratio(ours, theirs, 'seconds')} | {cell(ours, 'cpu_seconds', '.0f')} "
              f"| {cell(theirs, 'cpu_seconds', '.0f')} | {ratio(ours, theirs, 'cpu_seconds')} "
              f"| {cell(ours, 'peak_rss_mb', '.0f')} "
              f"| {cell(theirs, 'peak_rss_mb', '.0f')} |")


if __name__ == "__main__":
    main()
