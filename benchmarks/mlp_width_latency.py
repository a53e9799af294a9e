"""CPU latency of one SmolLM2-135M MLP (gate, up, down; hidden 576) at the widths width pruning leaves.

Why: a width-pruned model is only worth having if it is faster, and matrix kernels run odd widths
less efficiently than multiples of 8 or 16. This isolates that effect from the rest of the model
(``secateurs width --round-to`` is the remedy). Each width is timed over 30 forward passes of 512
tokens, median of 5 runs, interleaved over widths so machine load falls on all of them alike.

    python benchmarks/mlp_width_latency.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from records import save_results

WIDTHS = (1536, 1382, 1376, 1384, 1275, 1280, 1229, 1216, 1232, 1075, 1072, 1088, 1014, 1008, 753, 752)


def mlp(hidden: int, width: int) -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear]:
    return (torch.nn.Linear(hidden, width, bias=False), torch.nn.Linear(hidden, width, bias=False),
            torch.nn.Linear(width, hidden, bias=False))


def run(layers, x: torch.Tensor, passes: int) -> float:
    gate, up, down = layers
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(passes):
            down(torch.nn.functional.silu(gate(x)) * up(x))
    return (time.perf_counter() - start) / passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mlp_width_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden)
    models = {w: mlp(args.hidden, w) for w in WIDTHS}
    for layers in models.values():
        run(layers, x, 2)
    times: dict[int, list[float]] = {w: [] for w in WIDTHS}
    for _ in range(args.repeats):
        for w, layers in models.items():
            times[w].append(run(layers, x, args.passes))
    dense = statistics.median(times[WIDTHS[0]])
    rows = [{"width": w, "ms": statistics.median(t) * 1e3, "vs_full": statistics.median(t) / dense,
             "flops_vs_full": w / WIDTHS[0], "multiple_of_16": w % 16 == 0} for w, t in times.items()]
    print("| MLP width | multiple of 16 | ms per MLP (512 tokens) | ÷ 1536 | width ÷ 1536 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {'yes' if r['multiple_of_16'] else 'no'} | {r['ms']:.2f} | {r['vs_full']:.3f} | {r['flops_vs_full']:.3f} |")
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
            "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_results(args.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
