"""Sparse kernels vs dense cuBLAS at Llama-2-7B / Llama-3-70B linear shapes, and end to end.

    python benchmarks/sparse_kernels.py --part kernels     # GPU: kernel level, ratios vs F.linear
    python benchmarks/sparse_kernels.py --part e2e         # GPU: Llama-2-7B shape (random fp16), 2:4 and 70%
    python benchmarks/sparse_kernels.py --part smollm2 [--model path/to.gguf]   # GPU: SmolLM2-135M real weights

Kernel timings: every path is captured in a CUDA graph of REPEAT calls that rotate over enough
weight copies to overflow the 50 MB L2, replayed and timed with CUDA events; the median of several
replays is reported per call. Weights are random fp16 (normal), pruned by magnitude to 2:4 or to 70%
unstructured. Results go to benchmarks/results/sparse_kernels_<part>.json.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.evaluate.speed import SpeedConfig, SpeedResult, measure, ratios
from secateurs.kernels import Bitmap, Sparse24, SparseLinear, cuda_ops, sparsify
from secateurs.kernels.linear import fallback_notes, label, plans, reread_policies
from secateurs.model.arch import spec_for
from secateurs.model.linear import weight_matrix
from secateurs.model.load import load_model
from secateurs.sparsity.masks import nm_mask, unstructured_mask

from records import save_results

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


KERNEL_TOKENS = {"2:4": (1, 2, 4, 8, 16), "bitmap": (1,)}
BITMAP_SPARSITIES = (0.5, 0.7)


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 2 GiB device-to-device copy: the roofline of this run."""
    src = torch.empty(2**30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**31 / statistics.median(times)


def _cycle(calls: list, length: int = 24) -> list:
    """At least ``length`` calls rotating over the weight copies, so one graph replay is long enough to time."""
    return [calls[i % len(calls)] for i in range(max(length, len(calls)))]


def _gemv_rows(kind: str, weight: torch.Tensor, fmts: list, dense_ws: list, bandwidth: float, gen) -> list[dict]:
    """cuBLAS on the dense weight against every CUDA kernel candidate on the compressed one, per token count."""
    n, k = weight.shape
    rows = []
    for m in KERNEL_TOKENS["2:4" if kind == "2:4" else "bitmap"]:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
        reference = x.double() @ weight.double().T
        dense_us = graph_time_us(_cycle([lambda w=w, x=x: F.linear(x, w) for w in dense_ws]))
        dense_bytes = n * k * 2 + x.nbytes + m * n * 2
        sparse_bytes = fmts[0].nbytes() + x.nbytes + m * n * 2
        row = {"kind": kind, "N": n, "K": k, "tokens": m, "dense_us": dense_us,
               "dense_bw_fraction": dense_bytes / (dense_us * 1e-6) / bandwidth,
               "byte_limit": dense_bytes / sparse_bytes, "candidates": {}}
        for name in cuda_ops.candidates(fmts[0], m):
            got = cuda_ops.candidates(fmts[0], m)[name](x).double()
            error = float((got - reference).norm() / reference.norm())
            paths = [cuda_ops.candidates(f, m)[name] for f in fmts]
            us = graph_time_us(_cycle([lambda p=p, x=x: p(x) for p in paths]))
            row["candidates"][name] = {"us": us, "rel_error": error if math.isfinite(error) else None}
        good = {name: c for name, c in row["candidates"].items() if c["rel_error"] is not None and c["rel_error"] < 2e-3}
        row["max_rel_error"] = max(math.inf if c["rel_error"] is None else c["rel_error"] for c in row["candidates"].values()) if row["candidates"] else None
        if good:
            best = min(good, key=lambda name: good[name]["us"])
            row.update(best=best, us=good[best]["us"], speedup=dense_us / good[best]["us"],
                       bw_fraction=sparse_bytes / (good[best]["us"] * 1e-6) / bandwidth)
        rows.append(row)
        print(_kernel_line(row), flush=True)
    return rows


def _extra_checks(gen) -> dict:
    """Every candidate against float64 on odd shapes (rows not a multiple of the block, K tails), m = 1..16,
    fp16 and bf16; and one op under torch.compile(fullgraph=True) inside a CUDA graph (no graph break)."""
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in ((37, 1040), (37, 1088), (576, 1536), (1536, 576), (3, 8192)):
            base = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
            for kind, weight in (("2:4", base * nm_mask(base.abs(), 2, 4)), ("bitmap", base * unstructured_mask(base.abs(), 0.6))):
                if kind == "bitmap" and k % 128:
                    continue
                fmt = Sparse24.compress(weight) if kind == "2:4" else Bitmap.compress(weight)
                for m in (1, 2, 3, 4, 7, 8, 9, 16):
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                    reference = x.double() @ weight.double().T
                    for name, call in cuda_ops.candidates(fmt, m).items():
                        got = call(x).double()
                        errors[f"{kind} {str(dtype)[6:]} {n}x{k} m={m} {name}"] = float((got - reference).norm() / reference.norm())
    base = torch.randn(256, 512, device="cuda", dtype=torch.float16, generator=gen)
    weight = base * nm_mask(base.abs(), 2, 4)
    fmt = Sparse24.compress(weight)
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16, generator=gen)
    try:
        step = torch.compile(lambda x: torch.ops.secateurs.sparse24_gemv(x, fmt.values, fmt.meta, 1, 1) * 2, fullgraph=True)
        step(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x)
        graph.replay()
        torch.cuda.synchronize()
        compiled = float(((out.double() - 2 * (x.double() @ weight.double().T)).norm() / (x.double() @ weight.double().T).norm()))
    except Exception as exc:
        compiled = f"failed: {str(exc).splitlines()[0][:300]}"
    worst = max(errors.values())
    print(f"odd shapes, fp16/bf16, m=1..16: {len(errors)} checks, worst relative error {worst:.1e}; "
          f"torch.compile(fullgraph) in a CUDA graph: {compiled}", flush=True)
    return {"odd_shape_errors": errors, "worst": worst, "compiled_in_graph_rel_error": compiled}


def kernels_part() -> dict:
    """The CUDA GEMVs (kernels/cuda_ops.py) against cuBLAS F.linear at the seven Llama shapes.

    Each path is a CUDA graph of calls rotating over enough weight copies to overflow L2 (median of
    replays); every candidate is checked against a float64 product first. Bandwidth fractions are the
    bytes a path must read (compressed weight, x) and write (y) per second over this run's copy bandwidth."""
    why = cuda_ops.status()
    if why:
        sys.exit(f"error: {why}")
    gen = torch.Generator("cuda").manual_seed(0)
    checks = _extra_checks(gen)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s", flush=True)
    print("| format | shape (N×K) | tokens | cuBLAS µs | cuBLAS BW | best kernel | µs | speedup | BW (of copy) | byte limit | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n, k in [shape for shapes in SHAPES.values() for shape in shapes.values()]:
        base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
        dense_ws = rotating(lambda i, b=base: b.clone(), max(1, math.ceil(L2_BYTES / base.nbytes)))
        w24 = base * nm_mask(base.abs(), 2, 4)
        fmt = Sparse24.compress(w24)
        fmts = [fmt] + [Sparse24(fmt.values.clone(), fmt.meta.clone(), fmt.shape) for _ in range(math.ceil(L2_BYTES / fmt.nbytes()) - 1)]
        rows += _gemv_rows("2:4", w24, fmts, dense_ws, bandwidth, gen)
        del fmts, fmt, w24
        for sparsity in BITMAP_SPARSITIES:
            wu = base * unstructured_mask(base.abs(), sparsity)
            fmt = Bitmap.compress(wu)
            fmts = [fmt] + [Bitmap(fmt.values.clone(), fmt.bits.clone(), fmt.offsets.clone(), fmt.shape)
                            for _ in range(math.ceil(L2_BYTES / fmt.nbytes()) - 1)]
            rows += _gemv_rows(f"bitmap {sparsity:.0%}", wu, fmts, dense_ws, bandwidth, gen)
            del fmts, fmt, wu
        del dense_ws, base
        torch.cuda.empty_cache()
    return {"rows": rows, "copy_bandwidth_bytes_per_s": bandwidth, "checks": checks}


def _kernel_line(row: dict) -> str:
    best = (f"{row['best']} | {row['us']:.1f} | {row['speedup']:.2f}x | {row['bw_fraction']:.2f}" if "best" in row
            else f"{'none correct' if row['candidates'] else 'no kernel offered'} | | | ")
    error = f"{row['max_rel_error']:.1e}" if row.get("max_rel_error") is not None else "n/a"
    return (f"| {row['kind']} | {row['N']}x{row['K']} | {row['tokens']} | {row['dense_us']:.1f} | {row['dense_bw_fraction']:.2f} | "
            f"{best} | {row['byte_limit']:.2f}x | {error} |")


PATTERNS = {"2:4": lambda w: nm_mask(w.abs(), 2, 4), "70%": lambda w: unstructured_mask(w.abs(), 0.7)}
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
GOALS = {"2:4": {"decode_speedup": {1: 1.4, 8: 1.25}, "prefill_speedup": {2048: 1.1}, "weight_fraction": {"all": 0.5625},
                 "peak_fraction": {"all": 1.0}},
         "70%": {"decode_speedup": {1: 1.8}}}


def _prune(model, spec, pattern: str) -> None:
    """Magnitude pruning of every block linear to ``pattern``, in place, on the model's device."""
    with torch.no_grad():
        for module in spec.named_linears(model).values():
            w = weight_matrix(module)
            w.mul_(PATTERNS[pattern](w))


def _llama2_7b(device: torch.device, layers: int):
    """The Llama-2-7B shape with random fp16 weights, allocated and initialised on ``device`` (never on the CPU)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**LLAMA2_7B, "num_hidden_layers": layers})
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()


@torch.inference_mode()
def linear_step(model, spec, batch: int) -> dict:
    """One decode step's block linears alone, as a CUDA graph at ``batch`` rows: time and bytes read per second.

    Set against the whole step's time this splits a decode step into matmul time, which sparse
    kernels shrink, and everything else (attention, norms, launches), which they do not."""
    linears = list(spec.named_linears(model).values())
    inputs = {}
    calls = []
    stored = 0
    for module in linears:
        k = module.in_features
        x = inputs.setdefault(k, torch.randn(batch, k, device="cuda", dtype=torch.float16))
        calls.append(lambda module=module, x=x: module(x))
        stored += (module.format().nbytes() if isinstance(module, SparseLinear) else weight_matrix(module).nbytes)
    ms = graph_time_us(calls) * len(calls) / 1000
    return {"ms": ms, "weight_bytes": stored, "tb_per_s": stored / (ms / 1000) / 1e12}


def _paths(model) -> dict:
    """Which path each (format, shape, token bucket) took: the dispatcher's cached plans."""
    return {f"{k[0]} {k[1]}x{k[2]} rows<={k[3]} copies={k[-1]}": label(v) for k, v in plans().items()}


def _print_speed(results: list[SpeedResult], steps: dict) -> None:
    first = results[0]
    print("| metric | " + " | ".join(r.label for r in results) + " | " + " | ".join(f"{r.label} / {first.label}" for r in results[1:]) + " |")
    print("|---" * (2 * len(results)) + "|")

    def row(name: str, values: list[float], ratios_: list[float], fmt: str = "{:.1f}") -> None:
        print(f"| {name} | " + " | ".join(fmt.format(v) for v in values) + " | " + " | ".join(f"{v:.2f}x" for v in ratios_) + " |")

    for length in first.prefill_ms:
        row(f"prefill {length} tok (ms)", [r.prefill_ms[length] for r in results], [first.prefill_ms[length] / r.prefill_ms[length] for r in results[1:]])
        row(f"time to first token {length} tok (ms)", [r.ttft_ms[length] for r in results], [first.ttft_ms[length] / r.ttft_ms[length] for r in results[1:]])
    for batch in first.decode_tokens_per_s:
        row(f"decode batch {batch} (tok/s)", [r.decode_tokens_per_s[batch] for r in results],
            [r.decode_tokens_per_s[batch] / first.decode_tokens_per_s[batch] for r in results[1:]])
        if all(r.label in steps and batch in steps[r.label] for r in results):
            lin = [steps[r.label][batch]["ms"] for r in results]
            row(f"  linears of one step, batch {batch} (ms)", lin, [lin[0] / v for v in lin[1:]], "{:.2f}")
            rest = [1000 * batch / r.decode_tokens_per_s[batch] - v for r, v in zip(results, lin)]
            row(f"  rest of the step, batch {batch} (ms)", rest, [rest[0] / v for v in rest[1:]], "{:.2f}")
    row("weights stored (MiB)", [r.weight_mib for r in results], [r.weight_mib / first.weight_mib for r in results[1:]], "{:.0f}")
    row("run-time copies (MiB)", [r.extra_mib for r in results], [r.extra_mib / first.weight_mib for r in results[1:]], "{:.0f}")
    if first.peak_mib:
        row("peak memory (MiB)", [r.peak_mib for r in results], [r.peak_mib / first.peak_mib for r in results[1:]], "{:.0f}")
    print("decode method:", "; ".join(f"{r.label}: {r.decode_mode} {r.decode_by_method}" for r in results), flush=True)


@torch.inference_mode()
def _logit_check(model, reference: dict, shapes, vocab: int) -> dict:
    """Sparse-path logits against the dense-stored pruned model's, per input shape: relative error and top-1 agreement."""
    out = {}
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).cuda()
        got = model(ids, use_cache=False).logits.float()
        ref = reference[(batch, length)]
        out[f"{batch}x{length}"] = {"rel_error": float((got - ref).norm() / ref.norm()),
                                    "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
    return out


@torch.inference_mode()
def _logits(model, shapes, vocab: int) -> dict:
    return {(b, n): model(torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(1)).cuda(),
                          use_cache=False).logits.float() for b, n in shapes}


def end_to_end(part: str, device: torch.device, source: str, methods: tuple[str, ...], patterns: tuple[str, ...],
               layers: int = 32, batches: tuple[int, ...] = (1, 8)) -> dict:
    """Dense vs 2:4 vs 70% unstructured on the sparse dispatcher, one model on the device at a time, one run.

    Each pattern starts from the same dense weights (rebuilt with the same seed, or reloaded) and
    prunes every block linear by magnitude. On SmolLM2 the sparse path's logits are checked against
    the dense-stored pruned model's first."""
    if device.type != "cuda":
        sys.exit("the end-to-end run needs a CUDA GPU")
    speed = SpeedConfig(prompt_lengths=(2048,), decode_batches=batches, new_tokens=64, warmup=2, repeats=5,
                        decode_methods=methods)
    check_shapes = ((1, 1), (8, 1), (1, 128), (1, 2048))

    def build():
        if part == "e2e":
            model = _llama2_7b(device, layers)
            return model, spec_for(model)
        loaded = load_model(source, "float16")
        return loaded.model.to(device), loaded.spec

    model, spec = build()
    vocab = model.config.vocab_size
    started = time.time()
    results = [measure(model, "dense", device, speed)]
    steps = {"dense": {b: linear_step(model, spec, b) for b in speed.decode_batches}}
    print(f"dense measured in {time.time() - started:.0f}s", flush=True)
    correctness, reports = {}, {}
    for entry in patterns:
        pattern, _, policy = entry.partition("@")  # e.g. "2:4@sparse": only cuSPARSELt copies allowed
        os.environ["SECATEURS_SPARSE_COPIES"] = policy or "dense"
        reread_policies()  # the dispatcher reads its policies once; this run changes them
        if results[-1].label != "dense":
            del model
            gc.collect()
            torch.cuda.empty_cache()
            model, spec = build()
        _prune(model, spec, pattern)
        if part == "smollm2":
            reference = _logits(model, check_shapes, vocab)
        report = sparsify(model, spec)
        reports[entry] = report.sparse_bytes / report.dense_bytes
        if part == "smollm2":
            correctness[entry] = _logit_check(model, reference, check_shapes, vocab)
            print(f"{entry} logits vs dense-stored pruned model:", correctness[entry], flush=True)
            del reference
        started = time.time()
        label_ = f"{pattern} sparse" + (f" ({policy} copies)" if policy else "")
        results.append(measure(model, label_, device, speed))
        steps[label_] = {b: linear_step(model, spec, b) for b in speed.decode_batches}
        print(f"{label_} measured in {time.time() - started:.0f}s", flush=True)
    _print_speed(results, steps)
    first = results[0]
    ratio = {r.label: ratios(first, r) for r in results[1:]}
    os.environ.pop("SECATEURS_SPARSE_COPIES", None)
    reread_policies()
    goals = {}
    for name, got in ratio.items():
        for metric, points in GOALS.get(name.split(" ")[0], {}).items():
            for point, target in points.items():
                value = got.get(metric, {}).get(point)
                better = value is not None and (value <= target if "fraction" in metric else value >= target)
                goals[f"{name}: {metric} {point}"] = {"goal": target, "measured": value, "met": better}
    for name, goal in goals.items():
        print(f"goal {name}: {goal['measured']} vs {goal['goal']} -> {'met' if goal['met'] else 'MISSED'}")
    return {
        "part": part,
        "source": source if part == "smollm2" else f"llama-2-7b shape ({layers} layers), random fp16 (seed 0) built on the GPU",
        "speed_config": vars(speed),
        "results": [r.to_dict() for r in results],
        "ratios": ratio,
        "linear_step": steps,
        "compressed_weight_fraction": reports,
        "logit_check": correctness,
        "goals": goals if part == "e2e" else {},
        "kernel_plans": _paths(model),
        "fallback_notes": fallback_notes(),
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
    parser.add_argument("--model", default="smollm2-135m", help="smollm2 part: the shortcut or a path to its .gguf")
    parser.add_argument("--decode-methods", default="cuda-graph,compile", help="e2e/smollm2: decode methods timed")
    parser.add_argument("--patterns", default="2:4,70%", help="e2e/smollm2: pruning patterns, comma-separated")
    parser.add_argument("--batches", default="1,8", help="e2e/smollm2: decode batch sizes")
    parser.add_argument("--layers", type=int, default=32, help="e2e: decoder layers (32 = Llama-2-7B; fewer for a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sparse_kernels_<part>.json)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    if args.part == "kernels":
        if not torch.cuda.is_available():
            sys.exit("the kernel benchmark needs a CUDA GPU")
        result = kernels_part()
    else:
        result = end_to_end(args.part, torch.device(args.device), args.model, tuple(args.decode_methods.split(",")),
                            tuple(p for p in args.patterns.split(",") if p), args.layers,
                            tuple(int(b) for b in args.batches.split(",")))
    result["machine"] = machine()
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out) if args.out else RESULTS / f"sparse_kernels_{args.part}.json"
    save_results(out, result)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
