"""The 4:8 GEMV (kernels/cuda/sparse48.cu) against cuBLAS at the seven Llama linear shapes, 1, 2 and 4 tokens;
and the prompt paths of the 4:8 and bitmap formats (expand into the shared scratch, then cuBLAS) at 2-8192 tokens.

    python benchmarks/sparse48.py [--out benchmarks/results/sparse48.json]                       # GPU: the GEMV
    python benchmarks/sparse48.py --part prompt [--out benchmarks/results/sparse48_prompt.json]  # GPU: prompts

The protocol of ``sparse_kernels.py --part kernels``, through its helpers: every path is a CUDA graph of
at least 24 calls rotating over enough weight copies to overflow L2, median of replays; cuBLAS is
``F.linear`` on the same pruned fp16 weight (random normal, magnitude-pruned to 4:8). Every kernel candidate
``Nm48.cuda_candidates`` offers is first checked against a float64 product, at every shape and token
count, and on odd shapes (rows not a multiple of a block, K tails) in fp16 and bf16, and once under
``torch.compile(fullgraph=True)`` inside a CUDA graph. Bandwidth = the bytes a path must move
(compressed weight + x + y) per second over the device-to-device copy bandwidth of the same run.

``--part prompt``: per shape, the 4:8 weight (8-8192 tokens) and the 50% and 70% bitmap (2-8192 tokens) against
cuBLAS ``F.linear`` on the same pruned dense weight, every candidate their ``cuda_candidates`` offer (the expand
paths) checked against float64 first; each path a CUDA graph rotating over weight copies that overflow L2, of
enough calls for about 5 ms. Beside it, the expansion alone (stored bytes read + dense bytes written, as a
fraction of the copy bandwidth), the figure that bounds the path: cuBLAS time + expansion time.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("SECATEURS_UNVERIFIED_KERNELS", "1")  # this script is where such kernels are first run

from secateurs.kernels import Bitmap, Nm48, SparseFormat, cuda_ops, nm48
from secateurs.sparsity.masks import nm_mask, unstructured_mask

from records import save_results
from sparse_kernels import L2_BYTES, RESULTS, SHAPES, copy_bandwidth, graph_time_us, machine, rotating

TOKENS = (1, 2, 4)
CALLS = 24  # calls per graph replay, rotating over the copies
GOOD = 2e-3  # relative error against float64 under which a candidate counts as correct


def _w48(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    base = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
    return base * nm_mask(base.abs(), 4, 8)


def _time(calls: list) -> float:
    return graph_time_us(calls * math.ceil(CALLS / len(calls)))


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    error = float((got.double() - reference).norm() / reference.norm())
    return error if math.isfinite(error) else math.inf


def shape_rows(n: int, k: int, bandwidth: float, gen: torch.Generator) -> list[dict]:
    """cuBLAS on the dense weight against every 4:8 candidate, per token count; the fastest correct one wins."""
    weight = _w48(n, k, torch.float16, gen)
    fmt = Nm48.compress(weight)
    dense_ws = rotating(lambda i: weight.clone(), max(1, math.ceil(L2_BYTES / weight.nbytes)))
    fmts = [fmt] + rotating(lambda i: fmt.clone(), math.ceil(L2_BYTES / fmt.nbytes()) - 1)
    rows = []
    for m in TOKENS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
        reference = x.double() @ weight.double().T
        dense_us = _time([lambda w=w, x=x: F.linear(x, w) for w in dense_ws])
        dense_bytes = weight.nbytes + x.nbytes + m * n * 2
        sparse_bytes = fmt.nbytes() + x.nbytes + m * n * 2
        row = {"N": n, "K": k, "tokens": m, "dense_us": dense_us, "dense_bw_fraction": dense_bytes / (dense_us * 1e-6) / bandwidth,
               "byte_limit": dense_bytes / sparse_bytes, "candidates": {}}
        for name, call in fmt.cuda_candidates(m).items():
            paths = [f.cuda_candidates(m)[name] for f in fmts]
            row["candidates"][name] = {"rel_error": _relative_error(call(x), reference),
                                       "us": _time([lambda p=p, x=x: p(x) for p in paths])}
        row["max_rel_error"] = max(c["rel_error"] for c in row["candidates"].values())
        good = {name: c for name, c in row["candidates"].items() if c["rel_error"] < GOOD}
        if good:
            best = min(good, key=lambda name: good[name]["us"])
            row.update(best=best, us=good[best]["us"], speedup=dense_us / good[best]["us"],
                       bw_fraction=sparse_bytes / (good[best]["us"] * 1e-6) / bandwidth)
        rows.append(row)
        best = (f"{row['us']:.1f} | **{row['speedup']:.2f}×** | {row['bw_fraction']:.2f} | {row['best']}"
                if "best" in row else "— | no correct kernel | — | —")
        print(f"| {n}×{k} | {m} | {dense_us:.1f} | {row['dense_bw_fraction']:.2f} | {best} | {row['byte_limit']:.2f}× "
              f"| {row['max_rel_error']:.1e} |", flush=True)
    return rows


def checks(gen: torch.Generator) -> dict:
    """Every candidate against float64 on odd shapes, fp16 and bf16, m = 1..4; and the op compiled whole
    (fullgraph) and replayed in a CUDA graph."""
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in ((37, 1040), (37, 1088), (576, 1536), (1536, 576), (3, 8192)):
            weight = _w48(n, k, dtype, gen)
            fmt = Nm48.compress(weight)
            for m in (1, 2, 3, 4):
                x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                reference = x.double() @ weight.double().T
                for name, call in fmt.cuda_candidates(m).items():
                    errors[f"{str(dtype)[6:]} {n}x{k} m={m} {name}"] = _relative_error(call(x), reference)
    weight = _w48(256, 512, torch.float16, gen)
    fmt = Nm48.compress(weight)
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16, generator=gen)
    reference = x.double() @ weight.double().T
    try:
        step = torch.compile(lambda x: torch.ops.secateurs.nm48_gemv(x, fmt.values, fmt.meta, fmt.high, 1, 1) * 2,
                             fullgraph=True)
        step(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x)
        graph.replay()
        torch.cuda.synchronize()
        compiled: float | str = _relative_error(out / 2, reference)
    except Exception as exc:  # noqa: BLE001  (reported, not raised: the timing table still runs)
        compiled = f"failed: {str(exc).splitlines()[0][:300]}"
    worst = max(errors.values())
    print(f"odd shapes, fp16/bf16, m=1..4: {len(errors)} checks, worst relative error {worst:.1e}; "
          f"torch.compile(fullgraph) in a CUDA graph: {compiled}", flush=True)
    return {"odd_shape_errors": errors, "worst": worst, "compiled_in_graph_rel_error": compiled}


PROMPT_TOKENS = {"4:8": (8, 32, 128, 512, 2048, 8192), "bitmap 50%": (2, 8, 32, 128, 512, 2048, 8192),
                 "bitmap 70%": (2, 8, 32, 128, 512, 2048, 8192)}


def _prompt_formats(base: torch.Tensor) -> dict[str, tuple[torch.Tensor, SparseFormat]]:
    """The pruned dense weight and its stored format, per prompt-path format."""
    w48 = base * nm_mask(base.abs(), 4, 8)
    out = {"4:8": (w48, Nm48.compress(w48))}
    for sparsity in (0.5, 0.7):
        wu = base * unstructured_mask(base.abs(), sparsity)
        out[f"bitmap {int(sparsity * 100)}%"] = (wu, Bitmap.compress(wu))
    return out


def _expand_only(fmt: SparseFormat, scratch: torch.Tensor) -> list:
    """The expansion kernels alone, into ``scratch``: name -> call (the 4:8 chunk-per-thread variants, the bitmap's)."""
    if isinstance(fmt, Nm48):
        return [(f"expand48_c{c}", lambda c=c: nm48.nm48_expand(fmt.values, fmt.meta, fmt.high, scratch, c))
                for c in nm48.EXPAND_CHUNKS if c == 1 or fmt._wide_positions()]
    return [("expandbm", lambda: cuda_ops.bitmap_expand(fmt.values, fmt.bits, fmt.offsets, scratch))]


def _rotated_us(calls: list, seconds_each: float) -> float:
    """Median µs per call of a graph rotating over ``calls`` (weight copies), about 5 ms of work per replay."""
    count = max(len(calls), min(CALLS, math.ceil(5e-3 / max(seconds_each, 1e-7))))
    return graph_time_us([calls[i % len(calls)] for i in range(count)])


def prompt_rows(n: int, k: int, bandwidth: float, gen: torch.Generator) -> list[dict]:
    """cuBLAS on each pruned dense weight against every prompt candidate of its stored format, per token count."""
    base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
    rows = []
    for label, (weight, fmt) in _prompt_formats(base).items():
        dense_ws = [weight] + rotating(lambda i, w=weight: w.clone(), math.ceil(L2_BYTES / weight.nbytes) - 1)
        fmts = [fmt] + rotating(lambda i, f=fmt: f.clone(), math.ceil(L2_BYTES / fmt.nbytes()) - 1)
        scratch = cuda_ops.scratch(weight.device, weight.dtype, n * k)
        moved = fmt.nbytes() + weight.nbytes  # an expansion reads the stored weight and writes the dense one
        expand = {}
        for name, _ in _expand_only(fmt, scratch):
            us = _rotated_us([call for f in fmts for nm, call in _expand_only(f, scratch) if nm == name], moved / bandwidth)
            expand[name] = {"us": us, "bw_fraction": moved / (us * 1e-6) / bandwidth}
        for m in PROMPT_TOKENS[label]:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            reference = x.double() @ weight.double().T
            seconds = 2.0 * m * n * k / 500e12
            row = {"format": label, "N": n, "K": k, "tokens": m, "stored_bytes": fmt.nbytes(), "expand_only": expand,
                   "cublas_us": _rotated_us([lambda w=w, x=x: F.linear(x, w) for w in dense_ws], seconds),
                   "candidates": {}}
            for name, call in fmt.cuda_candidates(m).items():
                paths = [f.cuda_candidates(m)[name] for f in fmts]
                row["candidates"][name] = {"rel_error": _relative_error(call(x), reference),
                                           "us": _rotated_us([lambda p=p, x=x: p(x) for p in paths], seconds)}
            good = {name: c for name, c in row["candidates"].items() if c["rel_error"] < GOOD}
            row["max_rel_error"] = max((c["rel_error"] for c in row["candidates"].values()), default=math.nan)
            if good:
                best = min(good, key=lambda name: good[name]["us"])
                row.update(best=best, us=good[best]["us"], speedup=row["cublas_us"] / good[best]["us"])
            rows.append(row)
            cells = (f"{row['us']:.1f} | **{row['speedup']:.2f}×** | {row['best']}" if "best" in row
                     else "— | no correct candidate | —")
            alone = ", ".join(f"{nm} {e['us']:.1f} µs ({e['bw_fraction']:.2f})" for nm, e in expand.items())
            print(f"| {label} | {n}×{k} | {m} | {row['cublas_us']:.1f} | {cells} | {alone} | {row['max_rel_error']:.1e} |",
                  flush=True)
            del x, reference
        del dense_ws, fmts, scratch
        cuda_ops.release_scratch()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("gemv", "prompt"), default="gemv")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/sparse48[_prompt].json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or cuda_ops.status():
        sys.exit(f"error: the 4:8 kernel benchmark needs the CUDA kernels ({cuda_ops.status()})")
    started = time.time()
    gen = torch.Generator("cuda").manual_seed(0)
    if args.part == "prompt":
        out = args.out or RESULTS / "sparse48_prompt.json"
        bandwidth = copy_bandwidth()
        print(f"{torch.cuda.get_device_name()}; copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s", flush=True)
        print("| format | shape (N×K) | tokens | cuBLAS µs | best µs | vs cuBLAS | path | expansion alone (of copy BW) "
              "| max rel. error |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = []
        for n, k in [shape for shapes in SHAPES.values() for shape in shapes.values()]:
            rows += prompt_rows(n, k, bandwidth, gen)
        save_results(out, {"rows": rows, "copy_bandwidth_bytes_per_s": bandwidth, "machine": machine(),
                           "seconds": round(time.time() - started, 1)})
        print(f"saved {out}")
        return
    args.out = args.out or RESULTS / "sparse48.json"
    checked = checks(gen)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s", flush=True)
    print("| shape (N×K) | tokens | cuBLAS µs | cuBLAS BW | 4:8 µs | speedup | BW (of copy) | kernel | byte limit | max rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n, k in [shape for shapes in SHAPES.values() for shape in shapes.values()]:
        rows += shape_rows(n, k, bandwidth, gen)
        torch.cuda.empty_cache()
    save_results(args.out, {"rows": rows, "copy_bandwidth_bytes_per_s": bandwidth, "checks": checked,
                            "machine": machine(), "seconds": round(time.time() - started, 1)})
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
