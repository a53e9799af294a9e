"""The 4:8 GEMV (kernels/cuda/sparse48.cu) against cuBLAS at the seven Llama linear shapes, 1, 2 and 4 tokens.

    python benchmarks/sparse48.py [--out benchmarks/results/sparse48.json]     # GPU

The protocol of ``sparse_kernels.py --part kernels``, through its helpers: every path is a CUDA graph of
at least 24 calls rotating over enough weight copies to overflow L2, median of replays; cuBLAS is
``F.linear`` on the same pruned fp16 weight (random normal, magnitude-pruned to 4:8). Every kernel candidate
``Nm48.cuda_candidates`` offers is first checked against a float64 product, at every shape and token
count, and on odd shapes (rows not a multiple of a block, K tails) in fp16 and bf16, and once under
``torch.compile(fullgraph=True)`` inside a CUDA graph. Bandwidth = the bytes a path must move
(compressed weight + x + y) per second over the device-to-device copy bandwidth of the same run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from secateurs.kernels import Nm48, cuda_ops
from secateurs.sparsity.masks import nm_mask

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "sparse48.json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or cuda_ops.status():
        sys.exit(f"error: the 4:8 kernel benchmark needs the CUDA kernels ({cuda_ops.status()})")
    started = time.time()
    gen = torch.Generator("cuda").manual_seed(0)
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
