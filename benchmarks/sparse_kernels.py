"""Sparse kernels vs dense cuBLAS at Llama-2-7B / Llama-3-70B linear shapes, and end to end.

    python benchmarks/sparse_kernels.py --part kernels     # GPU: kernel level, ratios vs F.linear
    python benchmarks/sparse_kernels.py --part e2e         # GPU: Llama-2-7B shape (random fp16), 2:4
    python benchmarks/sparse_kernels.py --part smollm2     # SmolLM2-135M real weights, 2:4 (GPU or CPU)

Kernel timings: every path is captured in a CUDA graph of REPEAT calls that rotate over enough
weight copies to overflow the 50 MB L2, replayed and timed with CUDA events; the median of several
replays is reported per call. Weights are random fp16 (normal), pruned by magnitude to 2:4 or to 70%
unstructured. Results go to benchmarks/results/sparse_kernels_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.evaluate.speed import SpeedConfig, SpeedResult, measure, ratios
from secateurs.kernels import Bitmap, Sparse24, SparseLinear, sparsify
from secateurs.kernels.linear import plans
from secateurs.kernels.swap import block_linears
from secateurs.model.arch import spec_for
from secateurs.model.linear import weight_matrix
from secateurs.model.load import load_model
from secateurs.sparsity.masks import nm_mask, unstructured_mask

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "llama2-7b": {"qkvo": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)},
    "llama3-70b": {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192), "down": (8192, 28672)},
}
TOKENS = (1, 16, 128, 2048)
REPEAT = 20
L2_BYTES = 256 * 2**20


def graph_time_us(calls: list) -> float:
    """Median per-call time of a CUDA graph that runs ``calls`` in turn (falls back to plain events)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        run = graph.replay
    except Exception:  # some library paths refuse capture; time them eagerly instead
        torch.cuda.synchronize()

        def run() -> None:
            for call in calls:
                call()
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times[2:])


def rotating(make, copies: int) -> list:
    return [make(i) for i in range(copies)]


def kernels_part() -> dict:
    rows = []
    gen = torch.Generator("cuda").manual_seed(0)
    for model, shapes in SHAPES.items():
        for label, (n, k) in shapes.items():
            dense_bytes = n * k * 2
            copies = max(1, math.ceil(L2_BYTES / dense_bytes))
            base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
            w24 = base * nm_mask(base.abs(), 2, 4)
            w70 = base * unstructured_mask(base.abs(), 0.7)
            dense_ws = rotating(lambda i: base.clone(), copies)
            lin24 = rotating(lambda i: SparseLinear(Sparse24.compress(w24)), copies)
            lin70 = rotating(lambda i: SparseLinear(Bitmap.compress(w70)), copies)
            try:
                semi = rotating(lambda i: torch.sparse.to_sparse_semi_structured(w24), copies)
            except Exception as exc:  # cuSPARSELt missing or the shape refused
                semi, semi_error = None, str(exc).splitlines()[0]
            for m in TOKENS:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
                row = {"model": model, "linear": label, "N": n, "K": k, "tokens": m}
                row["dense_us"] = graph_time_us([lambda w=w: F.linear(x, w) for w in dense_ws])
                if semi is not None:
                    try:
                        row["cusparselt_24_us"] = graph_time_us([lambda s=s: F.linear(x, s) for s in semi])
                    except Exception as exc:
                        row["cusparselt_24_error"] = str(exc).splitlines()[0]
                else:
                    row["cusparselt_24_error"] = semi_error
                for name, mods, kind in (("ours_24", lin24, "2:4"), ("ours_u70", lin70, "bitmap")):
                    mods[0](x)
                    row[f"{name}_us"] = graph_time_us([lambda mod=mod: mod(x) for mod in mods])
                    key = (kind, n, k, 1 << max(m - 1, 0).bit_length(), x.dtype, x.device)
                    path, config = plans().get(key, ("?", None))
                    row[f"{name}_path"] = path if config is None else f"triton {config.block_m}x{config.block_n}x{config.block_k}/s{config.split_k}"
                for col in ("cusparselt_24", "ours_24", "ours_u70"):
                    if f"{col}_us" in row:
                        row[f"{col}_speedup"] = row["dense_us"] / row[f"{col}_us"]
                rows.append(row)
                print(_kernel_line(row), flush=True)
            del dense_ws, lin24, lin70, semi
            torch.cuda.empty_cache()
    return {"rows": rows, "bytes_vs_dense": {"2:4": 0.5625, "bitmap_70": 0.3 + 1 / 16 + 2 / 128}}


def _kernel_line(row: dict) -> str:
    def cell(col: str) -> str:
        return f"{row[col + '_speedup']:.2f}x" if col + "_speedup" in row else "n/a"

    return (f"| {row['model']} {row['linear']} {row['N']}x{row['K']} | {row['tokens']} | {row['dense_us']:.1f} | "
            f"{cell('cusparselt_24')} | {cell('ours_24')} ({row.get('ours_24_path', '')}) | "
            f"{cell('ours_u70')} ({row.get('ours_u70_path', '')}) |")


def _prune_24(model, spec) -> None:
    """Magnitude 2:4 on every block linear, in place (random weights: the mask choice does not matter for speed)."""
    for module in block_linears(model, spec).values():
        w = weight_matrix(module)
        w.mul_(nm_mask(w.abs(), 2, 4))


def _print_speed(results: list[SpeedResult]) -> None:
    first = results[0]
    print("| metric | " + " | ".join(r.label for r in results) + " | " + " | ".join(f"{r.label}/{first.label}" for r in results[1:]) + " |")
    print("|---" * (2 * len(results)) + "|")
    for length in first.prefill_ms:
        print(f"| prefill {length} tok (ms) | " + " | ".join(f"{r.prefill_ms[length]:.1f}" for r in results) + " | "
              + " | ".join(f"{first.prefill_ms[length] / r.prefill_ms[length]:.2f}x" for r in results[1:]) + " |")
    for length in first.ttft_ms:
        print(f"| TTFT {length} tok (ms) | " + " | ".join(f"{r.ttft_ms[length]:.1f}" for r in results) + " | "
              + " | ".join(f"{first.ttft_ms[length] / r.ttft_ms[length]:.2f}x" for r in results[1:]) + " |")
    for batch in first.decode_tokens_per_s:
        print(f"| decode batch {batch} (tok/s) | " + " | ".join(f"{r.decode_tokens_per_s[batch]:.1f}" for r in results) + " | "
              + " | ".join(f"{r.decode_tokens_per_s[batch] / first.decode_tokens_per_s[batch]:.2f}x" for r in results[1:]) + " |")
    print("| weights (MiB) | " + " | ".join(f"{r.weight_mib:.0f}" for r in results) + " | "
          + " | ".join(f"{r.weight_mib / first.weight_mib:.2f}x" for r in results[1:]) + " |")
    if first.peak_mib:
        print("| peak memory (MiB) | " + " | ".join(f"{r.peak_mib:.0f}" for r in results) + " | "
              + " | ".join(f"{r.peak_mib / first.peak_mib:.2f}x" for r in results[1:]) + " |")
    print("decode mode:", ", ".join(f"{r.label}: {r.decode_mode}" for r in results))


def end_to_end(part: str, device: torch.device) -> dict:
    """Dense vs 2:4-pruned (stored dense) vs 2:4 on sparse kernels, one model on the device at a time."""
    if part == "e2e":
        if device.type != "cuda":
            sys.exit("the Llama-2-7B-shape run needs a CUDA GPU (13 GiB of fp16 weights)")
        config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                      max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
        spec = spec_for(model)
        speed = SpeedConfig(prompt_lengths=(128, 2048, 4096), decode_batches=(1, 16), new_tokens=64, repeats=5)
        results = [measure(model, "dense", device, speed)]
        _prune_24(model, spec)
    else:
        loaded = load_model("smollm2-135m", "float16" if device.type == "cuda" else "float32")
        model, spec = loaded.model, loaded.spec
        if device.type == "cuda":
            speed = SpeedConfig(prompt_lengths=(128, 512, 2048), decode_batches=(1, 16), new_tokens=64, repeats=5)
        else:
            # Kept small: the shared CPU machine this ran on had 2 cores for ~6 people.
            speed = SpeedConfig(prompt_lengths=(128, 256), decode_batches=(1, 4), new_tokens=8, warmup=1, repeats=3)
        results = [measure(model, "dense", device, speed)]
        _prune_24(model, spec)
        results.append(measure(model, "pruned 2:4 (dense storage)", device, speed))
    with torch.no_grad():
        report = sparsify(model, spec)
    results.append(measure(model, "2:4 sparse kernels", device, speed))
    _print_speed(results)
    first = results[0]
    return {
        "part": part,
        "speed_config": vars(speed),
        "results": [r.to_dict() for r in results],
        "ratios": {r.label: ratios(first, r) for r in results[1:]},
        "compressed_weight_fraction": report.sparse_bytes / report.dense_bytes,
        "kernel_plans": {str(k): [path, str(cfg)] for k, (path, cfg) in plans().items()},
    }


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = "missing"
        info["cusparselt"] = getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.version()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("kernels", "e2e", "smollm2"), required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sparse_kernels_<part>.json)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    if args.part == "kernels":
        if not torch.cuda.is_available():
            sys.exit("the kernel benchmark needs a CUDA GPU")
        print("| shape | tokens | dense µs | cuSPARSELt 2:4 | ours 2:4 (path) | ours 70% unstructured (path) |")
        print("|---|---|---|---|---|---|")
        result = kernels_part()
    else:
        result = end_to_end(args.part, torch.device(args.device))
    result["machine"] = machine()
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out) if args.out else RESULTS / f"sparse_kernels_{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
