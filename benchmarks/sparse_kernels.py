"""Sparse kernels vs dense cuBLAS at Llama-2-7B / Llama-3-70B linear shapes, and end to end.

    python benchmarks/sparse_kernels.py --part kernels     # GPU: kernel level (decode sizes), ratios vs F.linear
    python benchmarks/sparse_kernels.py --part gemm        # GPU: 2:4 prompt paths at 512/2048/8192 tokens vs cuBLAS and cuSPARSELt
    python benchmarks/sparse_kernels.py --part gemm --wgmma  # the same with every wgmma.sp configuration, no decode rows
    python benchmarks/sparse_kernels.py --part e2e         # GPU: Llama-2-7B shape (random fp16), dense vs 2:4 (no copies)
    python benchmarks/sparse_kernels.py --part 70b         # GPU (H200): 2:4 Llama-3-70B shape built straight into the stored format
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.evaluate.speed import SpeedConfig, SpeedResult, measure, printed, ratios
from secateurs.kernels import Bitmap, Sparse24, SparseLinear, cuda_ops, sparsify
from secateurs.kernels.linear import clear_plans, fallback_notes, label, plans, reread_policies, side_stream
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
    stream = side_stream()  # one warm-up stream for every timing: each new stream would keep a cuBLAS workspace
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


KERNEL_TOKENS = {"2:4": (1, 2, 4, 8, 16, 32, 64), "bitmap": (1, 2, 8, 16, 32, 64)}
"""Token counts of the kernels part: 2:4's 32 and 64 (batch-32 decode, where its linears fell to 1.34 TB/s) show the
decode MMA, prompt GEMMs, expand path and wide decode kernel (its one configuration never near the fastest only under
SECATEURS_UNVERIFIED_KERNELS=1) against cuBLAS; the bitmap's 2-64 show its expand path and its tensor-core kernel
(5-64 rows) against cuBLAS (issue 29's 2-16-token goal)."""
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


def table_head(columns: str, device: bool = True) -> float:
    """This run's copy bandwidth, printed (after the GPU's name where ``device``) above a markdown table's header
    row ``columns`` and its separator: every kernel table's bandwidth figures are fractions of it."""
    bandwidth = copy_bandwidth()
    prefix = f"{torch.cuda.get_device_name()}; " if device else ""
    print(f"{prefix}copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s", flush=True)
    print(columns)
    print("|---" * (columns.count("|") - 1) + "|")
    return bandwidth


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
    compiled = compiled_in_graph_error(lambda x: torch.ops.secateurs.sparse24_gemv(x, fmt.values, fmt.meta, 1, 1), x,
                                       x.double() @ weight.double().T)
    worst = max(errors.values())
    print(f"odd shapes, fp16/bf16, m=1..16: {len(errors)} checks, worst relative error {worst:.1e}; "
          f"torch.compile(fullgraph) in a CUDA graph: {compiled}", flush=True)
    return {"odd_shape_errors": errors, "worst": worst, "compiled_in_graph_rel_error": compiled}


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """‖got − reference‖ / ‖reference‖ in float64; infinite where ``got`` holds a NaN or inf (an unwritten output)."""
    error = float((got.double() - reference).norm() / reference.norm())
    return error if math.isfinite(error) else math.inf


def compiled_in_graph_error(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            reference: torch.Tensor) -> float | str:
    """``op`` (a kernel's custom op) under ``torch.compile(fullgraph=True)``, captured in a CUDA graph and replayed:
    its relative error against ``reference``, or the first line of why it could not run (reported, not raised, so
    the script's other checks and timings still run)."""
    try:
        step = torch.compile(lambda x: op(x) * 2, fullgraph=True)
        step(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x)
        graph.replay()
        torch.cuda.synchronize()
        return relative_error(out / 2, reference)
    except Exception as exc:  # noqa: BLE001  (reported as a failure by the caller)
        return f"failed: {str(exc).splitlines()[0][:300]}"


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
    bandwidth = table_head("| format | shape (N×K) | tokens | cuBLAS µs | cuBLAS BW | best kernel | µs | speedup "
                           "| BW (of copy) | byte limit | rel. error |", device=False)
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


PROMPT_TOKENS = (512, 2048, 8192)
DECODE_CHECK_TOKENS = (1, 8, 32)


def _timed_graph(call, flops: float) -> float:
    """Median µs of ``call`` in a CUDA graph of enough repetitions (≥ 5 ms of work at 500 TFLOP/s)."""
    count = max(2, min(24, math.ceil(5e-3 / max(flops / 500e12, 1e-7))))
    return graph_time_us([call] * count)


def gemm_part(shapes: list[tuple[int, int]] | None = None, tokens: tuple[int, ...] = PROMPT_TOKENS,
              decode: bool = True) -> dict:
    """The 2:4 prompt paths on the stored format (the tiled mma.sp GEMM, each tile shape; the expand path)
    against cuBLAS F.linear on the pruned dense weight and cuSPARSELt on it, same run, at prompt sizes on the
    seven Llama shapes; every path checked against float64 first. Weights rotate over copies that overflow
    L2 where one call's work is short; at these sizes the products are compute-bound, so TFLOP/s (dense
    equivalent, 2·M·N·K) is the figure of merit, and the bytes each must move are reported beside it."""
    why = cuda_ops.status()
    if why:
        sys.exit(f"error: {why}")
    gen = torch.Generator("cuda").manual_seed(0)
    bandwidth = table_head("| shape (N×K) | tokens | cuBLAS µs | cuBLAS TFLOP/s | cuSPARSELt µs | cuSPARSELt / cuBLAS "
                           "| best stored-format path | µs | TFLOP/s | vs cuBLAS | vs cuSPARSELt | expand+cuBLAS vs cuBLAS "
                           "| rel. error |", device=False)
    rows = []
    for n, k in shapes or [shape for group in SHAPES.values() for shape in group.values()]:
        base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
        w24 = base * nm_mask(base.abs(), 2, 4)
        del base
        fmt = Sparse24.compress(w24)
        try:
            semi = torch.sparse.to_sparse_semi_structured(w24)
        except Exception as exc:  # noqa: BLE001
            semi, semi_error = None, str(exc).splitlines()[0][:200]
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            reference = x.double() @ w24.double().T
            flops = 2.0 * m * n * k
            row = {"N": n, "K": k, "tokens": m, "candidates": {},
                   "bytes_dense": n * k * 2 + x.nbytes + m * n * 2, "bytes_stored": fmt.nbytes() + x.nbytes + m * n * 2}
            row["cublas_us"] = _timed_graph(lambda x=x, w=w24: F.linear(x, w), flops)
            if semi is not None:
                got = F.linear(x, semi).double()
                row["cusparselt_rel_error"] = float((got - reference).norm() / reference.norm())
                row["cusparselt_us"] = _timed_graph(lambda x=x, s=semi: F.linear(x, s), flops)
            else:
                row["cusparselt_error"] = semi_error
            for name, call in cuda_ops.candidates(fmt, m).items():
                if name.startswith("cuda_mma24"):  # the decode kernel (1-32 rows); the wgmma GEMM's names stay
                    continue
                got = call(x).double()
                error = float((got - reference).norm() / reference.norm())
                us = _timed_graph(lambda call=call, x=x: call(x), flops)
                row["candidates"][name] = {"us": us, "rel_error": error if math.isfinite(error) else None,
                                           "tflops": flops / us / 1e6}
            good = {name: c for name, c in row["candidates"].items() if c["rel_error"] is not None and c["rel_error"] < 2e-3}
            if good:
                best = min(good, key=lambda name: good[name]["us"])
                row.update(best=best, us=good[best]["us"], speedup=row["cublas_us"] / good[best]["us"],
                           vs_cusparselt=row["cusparselt_us"] / good[best]["us"] if "cusparselt_us" in row else None)
            if "expand_cublas" in row["candidates"]:
                row["expand_speedup"] = row["cublas_us"] / row["candidates"]["expand_cublas"]["us"]
            gemms = {k_: c for k_, c in good.items() if k_.startswith("cuda_gemm24")}
            if gemms:
                fastest = min(gemms, key=lambda name: gemms[name]["us"])
                row.update(gemm_best=fastest, gemm_speedup=row["cublas_us"] / gemms[fastest]["us"])
            wgmmas = {k_: c for k_, c in good.items() if k_.startswith("cuda_wgmma24")}
            if wgmmas:  # the Hopper wgmma.sp GEMM (--wgmma): against cuBLAS, cuSPARSELt and the mma.sp GEMM
                fastest = min(wgmmas, key=lambda name: wgmmas[name]["us"])
                row.update(wgmma_best=fastest, wgmma_speedup=row["cublas_us"] / wgmmas[fastest]["us"])
            row["max_rel_error"] = max((c["rel_error"] or math.inf) for c in row["candidates"].values())
            rows.append(row)
            print(_gemm_line(row, flops), flush=True)
            if "wgmma_best" in row:
                us = row["candidates"][row["wgmma_best"]]["us"]
                versus_lt = f", {row['cusparselt_us'] / us:.2f}x cuSPARSELt" if "cusparselt_us" in row else ""
                gemm = f", {row['wgmma_speedup'] / row['gemm_speedup']:.2f}x mma.sp GEMM" if "gemm_speedup" in row else ""
                print(f"  wgmma.sp {row['wgmma_best']}: {us:.1f} µs, {flops / us / 1e6:.0f} TFLOP/s, "
                      f"{row['wgmma_speedup']:.2f}x cuBLAS{versus_lt}{gemm}", flush=True)
            wrong = [name for name, c in row["candidates"].items() if c["rel_error"] is None or c["rel_error"] >= 2e-3]
            if wrong:
                print(f"  wrong (not timed as a result): {', '.join(wrong)}", flush=True)
            del x, reference
        del fmt, semi, w24
        torch.cuda.empty_cache()
        cuda_ops.release_scratch()
    decode = []
    for n, k in (shapes or [shape for group in SHAPES.values() for shape in group.values()]) if decode else ():
        base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
        dense_ws = rotating(lambda i, b=base: b.clone(), max(1, math.ceil(L2_BYTES / base.nbytes)))
        w24 = base * nm_mask(base.abs(), 2, 4)
        fmt = Sparse24.compress(w24)
        fmts = [fmt] + [Sparse24(fmt.values.clone(), fmt.meta.clone(), fmt.shape) for _ in range(math.ceil(L2_BYTES / fmt.nbytes()) - 1)]
        saved = KERNEL_TOKENS["2:4"]
        KERNEL_TOKENS["2:4"] = DECODE_CHECK_TOKENS
        try:
            decode += _gemv_rows("2:4", w24, fmts, dense_ws, bandwidth, gen)
        finally:
            KERNEL_TOKENS["2:4"] = saved
        del fmts, fmt, w24, dense_ws, base
        torch.cuda.empty_cache()
        cuda_ops.release_scratch()
    return {"rows": rows, "decode_rows": decode, "copy_bandwidth_bytes_per_s": bandwidth}


def _gemm_line(row: dict, flops: float) -> str:
    semi = (f"{row['cusparselt_us']:.1f} | {row['cublas_us'] / row['cusparselt_us']:.2f}x" if "cusparselt_us" in row
            else "n/a | n/a")
    if "best" in row:
        vs = f"{row['vs_cusparselt']:.2f}x" if row.get("vs_cusparselt") else "n/a"
        best = (f"{row['best']} | {row['us']:.1f} | {flops / row['us'] / 1e6:.0f} | {row['speedup']:.2f}x | {vs}")
    else:
        best = "none correct | | | | "
    expand = f"{row['expand_speedup']:.2f}x" if "expand_speedup" in row else "n/a"
    return (f"| {row['N']}x{row['K']} | {row['tokens']} | {row['cublas_us']:.1f} | {flops / row['cublas_us'] / 1e6:.0f} | "
            f"{semi} | {best} | {expand} | {row['max_rel_error']:.1e} |")


PATTERNS = {"2:4": lambda w: nm_mask(w.abs(), 2, 4), "4:8": lambda w: nm_mask(w.abs(), 4, 8),
            "8:16": lambda w: nm_mask(w.abs(), 8, 16),
            "70%": lambda w: unstructured_mask(w.abs(), 0.7), "50%": lambda w: unstructured_mask(w.abs(), 0.5)}
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
GOALS = {"2:4": {"decode_speedup": {1: 1.65, 8: 1.5, 32: 1.3}, "prefill_speedup": {2048: 1.15},
                 "ttft_speedup": {2048: 1.1}, "weight_fraction": {"all": 0.60}, "peak_fraction": {"all": 0.65}},
         # issue 29's end-to-end goals (against the fastest dense decode; peak memory below dense for all)
         "70%": {"decode_speedup": {1: 1.8, 8: 1.4}, "peak_fraction": {"all": 0.999}},
         "50%": {"decode_speedup": {1: 1.25}, "peak_fraction": {"all": 0.999}},
         "4:8": {"decode_speedup": {1: 1.45}, "peak_fraction": {"all": 0.999}}}
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


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
def _prefill_peak_mib(model, vocab: int, device: torch.device) -> float:
    """Peak memory of one 2048-token forward alone (with its KV cache), to tell prefill's peak from decode's."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, vocab, (1, 2048), device=device, generator=torch.Generator(device).manual_seed(2))
    model(ids)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


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
               layers: int = 32, batches: tuple[int, ...] = (1, 8),
               checkpoint: Callable[[dict], object] | None = None) -> dict:
    """Dense vs 2:4 vs 70% unstructured on the sparse dispatcher, one model on the device at a time, one run.

    Each pattern starts from the same dense weights (rebuilt with the same seed, or reloaded) and
    prunes every block linear by magnitude. On SmolLM2 the sparse path's logits are checked against
    the dense-stored pruned model's first. ``checkpoint`` gets the rows measured so far after each model,
    so a run cut off by a time limit keeps them (one did: four models measured, none written)."""
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
    resident = {"dense": torch.cuda.memory_allocated(device) / 2**20}  # MiB on the GPU before each model is measured
    results = [measure(model, "dense", device, speed, phase=printed("dense"))]
    prefill_peak = {"dense": _prefill_peak_mib(model, vocab, device)}
    steps = {"dense": {b: linear_step(model, spec, b) for b in speed.decode_batches}}
    print(f"dense measured in {time.time() - started:.0f}s", flush=True)
    correctness, reports, kernel_plans = {}, {}, {}

    def keep() -> None:
        if checkpoint is not None:
            checkpoint({"part": part, "partial": True, "speed_config": vars(speed),
                        "results": [r.to_dict() for r in results], "linear_step": steps,
                        "compressed_weight_fraction": reports, "resident_mib_before_measure": resident,
                        "prefill_2048_peak_mib": prefill_peak, "logit_check": correctness})

    keep()
    for entry in patterns:
        pattern, _, policy = entry.partition("@")  # e.g. "2:4@dense": dense or cuSPARSELt copies allowed
        if policy:
            os.environ["SECATEURS_SPARSE_COPIES"] = policy
        else:  # the default: the stored format only
            os.environ.pop("SECATEURS_SPARSE_COPIES", None)
        reread_policies()  # the dispatcher reads its policies once; this run changes them
        # A fresh model each time, so nothing the previous run left (its graphs, caches, the dense weights)
        # counts in this one's peak.
        del model
        gc.collect()
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # the previous model's streams' cuBLAS workspaces
            torch._C._cuda_clearCublasWorkspaces()  # (no graph of it is alive any more)
        torch.cuda.empty_cache()
        model, spec = build()
        clear_plans()  # each model tunes its own plans, as alone in a user's process: a 70% bitmap model must not
        # replay the plans timed on the 50% model's weights (the bitmap's plan key has no density band)
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
        gc.collect()
        resident[label_] = torch.cuda.memory_allocated(device) / 2**20
        results.append(measure(model, label_, device, speed, phase=printed(label_)))
        prefill_peak[label_] = _prefill_peak_mib(model, vocab, device)
        steps[label_] = {b: linear_step(model, spec, b) for b in speed.decode_batches}
        kernel_plans[label_] = _paths(model)
        print(f"{label_} measured in {time.time() - started:.0f}s", flush=True)
        keep()
    _print_speed(results, steps)
    print("resident before measuring (MiB):", {k: round(v) for k, v in resident.items()},
          "| peak - weights (MiB):", {r.label: round(r.peak_mib - r.weight_mib) for r in results if r.peak_mib},
          "| peak of one 2048-token forward alone (MiB):", {k: round(v) for k, v in prefill_peak.items()}, flush=True)
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
        "resident_mib_before_measure": resident,
        "prefill_2048_peak_mib": prefill_peak,
        "logit_check": correctness,
        "goals": goals if part == "e2e" else {},
        "kernel_plans": kernel_plans,
        "fallback_notes": fallback_notes(),
    }


def random_sparse24(n: int, k: int, device: torch.device, gen: torch.Generator, std: float = 0.02) -> Sparse24:
    """A random 2:4 weight made directly in the stored format (values and positions; no dense matrix ever
    exists): normal values, and for every group of four one of the six pairs of positions, uniformly."""
    values = (torch.randn(n, k // 2, device=device, dtype=torch.float16, generator=gen) * std).contiguous()
    pairs = torch.tensor([a | (b << 2) for a in range(4) for b in range(a + 1, 4)], dtype=torch.uint8, device=device)
    nibbles = pairs[torch.randint(0, 6, (n, k // 4), device=device, generator=gen)]
    meta = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
    return Sparse24(values, meta, (n, k))


def build_sparse_70b(device: torch.device, layers: int, seed: int = 0):
    """The Llama-3-70B shape with every block linear a random 2:4 SparseLinear made on ``device`` layer by layer
    in the stored format, embeddings, head and norms dense fp16: the skeleton is built on the meta device, so
    no dense block weight is ever allocated (the dense model would need 141 GB, this one about 83 GB)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.for_model("llama", **{**LLAMA3_70B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    spec = spec_for(model)
    gen = torch.Generator(device).manual_seed(seed)
    from secateurs.kernels.swap import set_module

    for name, module in spec.named_linears(model).items():  # in layer order: at most one weight in flight
        bias = None if getattr(module, "bias", None) is None else torch.zeros(module.out_features, device=device, dtype=torch.float16)
        set_module(model, name, SparseLinear(random_sparse24(module.out_features, module.in_features, device, gen), bias))
    for _, module in model.named_modules():
        if isinstance(module, SparseLinear):
            continue
        meta_tensors = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t.is_meta]
        if not meta_tensors:
            continue
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            for pname, param in module.named_parameters(recurse=False):
                if "norm" in type(module).__name__.lower() or pname == "weight" and param.dim() == 1:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
    with torch.device(device):  # its inverse frequencies are computed at construction, not loaded
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")
    return model, spec


def llama3_70b_part(layers: int, methods: tuple[str, ...]) -> dict:
    """Decode at batch 1 and prefill of 2048 tokens of a 2:4 Llama-3-70B-shape model on one GPU (an H200: the
    model is about 83 GB), built straight into the stored format. No dense baseline fits the card; the figure
    to compare with is the weight-bandwidth floor: the bytes one decode step must read over this run's copy
    bandwidth (which counts reads and writes, so read bandwidth is taken as the same rate)."""
    device = torch.device("cuda")
    bandwidth = copy_bandwidth()
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    model, spec = build_sparse_70b(device, layers)
    built_s = time.time() - started
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(f"built {layers} layers in {built_s:.0f}s: {weight_bytes / 1e9:.1f} GB of weights "
          f"(peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB while building)", flush=True)
    speed = SpeedConfig(prompt_lengths=(2048,), decode_batches=(1,), new_tokens=32, warmup=1, repeats=3,
                        decode_methods=methods)
    result = measure(model, "2:4 llama-3-70b shape", device, speed, phase=printed("70b"))
    floor = bandwidth / weight_bytes
    decode = result.decode_tokens_per_s[1]
    print(f"decode batch 1: {decode:.1f} tok/s (goal >= 35; weight-bandwidth floor {floor:.1f} tok/s at "
          f"{bandwidth / 1e12:.2f} TB/s, so {decode / floor:.2f} of it); prefill 2048: {result.prefill_ms[2048]:.0f} ms, "
          f"time to first token {result.ttft_ms[2048]:.0f} ms; peak {result.peak_mib / 1024:.1f} GiB", flush=True)
    return {"part": "70b", "layers": layers, "config": {**LLAMA3_70B, "num_hidden_layers": layers},
            "weight_bytes": weight_bytes, "build_seconds": built_s, "copy_bandwidth_bytes_per_s": bandwidth,
            "bandwidth_floor_tokens_per_s": floor, "result": result.to_dict(), "speed_config": vars(speed),
            "goals": {"decode_b1_tokens_per_s": {"goal": 35, "measured": decode, "met": decode >= 35}} if layers == 80 else {},
            "kernel_plans": _paths(model), "fallback_notes": fallback_notes()}


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
    parser.add_argument("--part", choices=("kernels", "gemm", "e2e", "smollm2", "70b"), required=True)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2 part: the shortcut or a path to its .gguf")
    parser.add_argument("--decode-methods", default="cuda-graph,compile", help="e2e/smollm2: decode methods timed")
    parser.add_argument("--patterns", default="2:4", help="e2e/smollm2: pruning patterns, comma-separated; PATTERN@POLICY "
                        "runs it under SECATEURS_SPARSE_COPIES=POLICY (default: none, the stored format only; "
                        "sparse: cuSPARSELt copies allowed; dense: dense or cuSPARSELt copies), e.g. 2:4,2:4@dense,70%%; also 4:8, 8:16, 50%% (issue 29)")
    parser.add_argument("--batches", default="1,8,32", help="e2e/smollm2: decode batch sizes")
    parser.add_argument("--layers-70b", type=int, default=80, help="70b: decoder layers (80 = Llama-3-70B; fewer for a smoke run)")
    parser.add_argument("--layers", type=int, default=32, help="e2e: decoder layers (32 = Llama-2-7B; fewer for a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--wgmma", action="store_true",
                        help="gemm part: time every Hopper wgmma.sp GEMM configuration, those not yet cleared on a "
                             f"GPU too (sets {cuda_ops.UNVERIFIED_ENV}=1 and makes each configuration's first launch "
                             "in a child process first, as gpu_kernel_check.py does); skips the decode rows")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sparse_kernels_<part>.json)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    out = Path(args.out) if args.out else RESULTS / f"sparse_kernels_{args.part}.json"
    unknown = [p for p in args.patterns.split(",") if p and p.partition("@")[0] not in PATTERNS]
    if unknown:  # checked before the dense model's minutes, not after them
        parser.error(f"unknown pattern(s) {', '.join(unknown)}: pick from {', '.join(PATTERNS)}")
    if args.part in ("kernels", "gemm", "70b") and not torch.cuda.is_available():
        sys.exit(f"the {args.part} benchmark needs a CUDA GPU")
    if args.part == "kernels":
        result = kernels_part()
    elif args.part == "gemm" and args.wgmma:
        os.environ[cuda_ops.UNVERIFIED_ENV] = "1"
        cuda_ops.unverified_offered.cache_clear()
        from gpu_kernel_check import first_launches

        first_launches()  # a configuration that faults or multiplies wrongly is withheld from the timing
        result = gemm_part(decode=False)
    elif args.part == "gemm":
        result = gemm_part()
    elif args.part == "70b":
        result = llama3_70b_part(args.layers_70b, tuple(args.decode_methods.split(",")))
    else:
        result = end_to_end(args.part, torch.device(args.device), args.model, tuple(args.decode_methods.split(",")),
                            tuple(p for p in args.patterns.split(",") if p), args.layers,
                            tuple(int(b) for b in args.batches.split(",")),
                            checkpoint=lambda partial: save_results(out, {**partial, "machine": machine(),
                                                                          "seconds": round(time.time() - started, 1)}))
    result["machine"] = machine()
    result["seconds"] = round(time.time() - started, 1)
    save_results(out, result)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
