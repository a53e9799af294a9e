"""Dense SmolLM2-135M perplexity and the cost of magnitude pruning it, on this machine.

Prints a table and writes benchmarks/results/foundation.json. Perplexity follows the papers'
protocol (non-overlapping windows of --seq-len tokens over the joined test split; --limit-windows
keeps the first N). Pruning time and peak memory are measured in a fresh subprocess so the peak
resident memory belongs to the prune alone (load + magnitude 50% + nothing else).

    SECATEURS_DATA=../shared/data python benchmarks/foundation.py --seq-len 512 --limit-windows 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import secateurs

from records import save_results

RESULTS = Path(__file__).parent / "results"

PRUNE_ONLY = """
import json, sys, time, torch
import secateurs
from secateurs.record import peak_memory_mb
start = time.perf_counter()
loaded = secateurs.load_model("smollm2-135m")
loaded_at = time.perf_counter()
report = secateurs.prune(loaded, secateurs.PruneConfig("magnitude", 0.5, sys.argv[1]), None,
                         secateurs.EngineOptions(device="cpu"))
print(json.dumps({"load_s": loaded_at - start, "prune_s": report.seconds,
                  "achieved": report.achieved, "peak_rss_mb": peak_memory_mb(torch.device("cpu"))}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--limit-windows", type=int, default=40)
    parser.add_argument("--datasets", default="wikitext2,ptb,c4")
    args = parser.parse_args()

    loaded = secateurs.load_model("smollm2-135m")
    rows = {}
    for name in args.datasets.split(","):
        start = time.perf_counter()
        result = secateurs.evaluate_perplexity(loaded, [name], args.seq_len, args.limit_windows, device="cpu")[name]
        rows[name] = (
            {"error": result}
            if isinstance(result, str)
            else {**result.to_dict(), "seconds": round(time.perf_counter() - start, 1)}
        )
    prune_runs = {}
    for pattern in ("unstructured", "2:4"):
        done = subprocess.run([sys.executable, "-c", PRUNE_ONLY, pattern], capture_output=True, text=True,
                              check=True, env={**os.environ, "SECATEURS_PROGRESS": "0"})
        prune_runs[pattern] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"SmolLM2-135M dense perplexity (seq_len {args.seq_len}, first {args.limit_windows} windows)")
    for name, row in rows.items():
        print(f"  {name:10s} " + (f"{row['ppl']:.3f} ({row['windows']} windows, {row['seconds']} s)"
                                   if "ppl" in row else f"unavailable: {row['error']}"))
    print("magnitude 50% on CPU (fresh process: load + prune)")
    for pattern, run in prune_runs.items():
        print(f"  {pattern:12s} prune {run['prune_s']:.1f} s, load {run['load_s']:.1f} s, "
              f"peak RSS {run['peak_rss_mb']:.0f} MiB, sparsity {run['achieved']:.4f}")
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "args": vars(args),
        "dense_perplexity": rows,
        "magnitude_prune": prune_runs,
    }
    save_results(RESULTS / "foundation.json", payload)


if __name__ == "__main__":
    main()
