"""The banded unstructured kernels (kernels/cuda/banded.cu, banded_tc.cu) against cuBLAS and the bitmap's, per band.

    python benchmarks/banded.py [--out benchmarks/results/banded.json]     # GPU, about 5-5.5 minutes on an H100 (estimated)
    python benchmarks/banded.py --quick                                      # one shape: a smoke run
    python benchmarks/banded.py --storage [--model PATH.gguf]                # CPU: bytes on a real model's masks
    python benchmarks/banded.py --sass [--arch sm_90]                        # CPU + nvcc: instructions per value

First, every candidate ``Banded.cuda_candidates`` offers (the GEMV at 1-4 rows, the expand path from 2, the
tensor-core kernel at 5-64 rows, every split-K choice) is checked against a float64 product on odd shapes (rows not a
multiple of a block, widths that end in a partial segment or are not multiples of 16, a 3-row weight with a long K),
fp16 and bf16, 50/60/70/80% zeros, m = 1..4, 8, 9, 17, 33 and 64 (every token tile of the tensor-core kernel, full and
partial), the output block NaN-poisoned first; and the GEMV op and the tensor-core op (split K, added by its second
kernel) once each under ``torch.compile(fullgraph=True)`` inside a CUDA graph. Any failure stops the script (exit 1)
before any timing.

Then, per band (50%, 60%, 70%, 80% zeros, magnitude-pruned random normal fp16 weights) and per Llama-2-7B /
Llama-3-70B linear shape (``sparse_kernels.SHAPES``), at 1, 2 and 4 tokens: cuBLAS ``F.linear`` on the same pruned
dense weight, the bitmap's best candidate (its GEMV at 1 token, its expand path from 2) and every banded candidate;
and on the Llama-2-7B shapes only (:data:`TC_SHAPES`, to keep the run near 5 minutes) at 8, 16, 32 and 64 tokens:
cuBLAS, the bitmap's best tensor-core candidate and every banded candidate (its expand path and its tensor-core kernel
at each split); each a CUDA graph of calls rotating over weight copies that overflow L2, median of replays (the
protocol of ``sparse_kernels.py --part kernels``, through its helpers); each candidate checked against float64 where
it is timed.
Reported: the ratios vs cuBLAS and vs the bitmap, bytes per weight of both layouts, the entries stored per non-zero
(padding and fillers), and the bytes the fastest correct banded path must move (stored weight + x + y) per second as
a fraction of this run's copy bandwidth. Results go to benchmarks/results/banded.json (records.py).

``--storage`` (CPU, no kernel runs): the bytes per weight of the banded layout and of the bitmap, and the entries
stored per non-zero (fillers, padding), over every prunable linear of a real model (the bitmap's bytes by its formula
where its 128-input segments do not divide the width), pruned by magnitude and by Wanda (32 WikiText-2 calibration
sequences of 128 tokens; SECATEURS_DATA names the local data) at each band's sparsity; to
benchmarks/results/banded_storage.json.

``--sass`` (nvcc, no GPU): SASS instructions per stored entry in each banded GEMV's main loop (two pieces of P
entries per lane) and, for comparison, per non-zero in the one-row bitmap GEMV's bit loop (the loop holding its FMA);
and per scattered entry of the tensor-core kernels: banded_tc.cu's round loop (one grain of 8 entries per lane, its
load, decode, scatter and ballots: the loop that holds 8 of its 16-bit shared stores) against bitmap_tc.cu's slot
chain (the instructions between a unit's first and last of its 16 value stores, over 15 slots).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("SECATEURS_UNVERIFIED_KERNELS", "1")  # this script is where the banded kernels are first run

from secateurs.kernels import Bitmap, cuda_ops
from secateurs.kernels.banded import Banded, band_of
from secateurs.sparsity.masks import unstructured_mask

from records import save_results
from sparse_kernels import (L2_BYTES, RESULTS, SHAPES, compiled_in_graph_error, graph_time_us, machine,
                            relative_error, rotating, table_head)

SPARSITIES = (0.5, 0.6, 0.7, 0.8)
TOKENS = (1, 2, 4)
TC_TOKENS = (8, 16, 32, 64)  # the tensor-core kernel's row buckets
TC_SHAPES = tuple(SHAPES["llama2-7b"].values())  # where they are timed (the 70B shapes would add about 3 minutes)
CHECK_TOKENS = (1, 2, 3, 4, 8, 9, 17, 33, 64)
CALLS = 24  # calls per graph replay, rotating over the copies
# Relative error against float64 under which a candidate counts as correct: bf16's 8-bit significand rounds the output
# alone by up to 2^-9, and on the first GPU run (H100) cuBLAS on the expanded bf16 weight reached 2.4e-3 on these
# shapes, so bf16 gets gpu_kernel_check.py's 5e-3; fp16 keeps 2e-3.
GOOD = {torch.float16: 2e-3, torch.bfloat16: 5e-3}
CHECK_SHAPES = ((37, 1040), (37, 1088), (200, 4168), (576, 1536), (1536, 576), (3, 8192), (1024, 8192))


def _pruned(n: int, k: int, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    base = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
    return base * unstructured_mask(base.abs(), sparsity)


def _poisoned(call, x: torch.Tensor, n: int) -> torch.Tensor:
    """Fill the block the output will most likely reuse with NaN first, so an unwritten element shows."""
    poison = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype, device=x.device)
    del poison
    return call(x)


def checks(gen: torch.Generator) -> dict:
    """Every banded candidate against float64 on odd shapes, both dtypes, every band, m = :data:`CHECK_TOKENS`; and
    the GEMV and tensor-core ops compiled whole and replayed in a CUDA graph. Returns the errors and the failures."""
    errors: dict[str, float] = {}
    failures: list[str] = []
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in CHECK_SHAPES:
            for sparsity in SPARSITIES:
                weight = _pruned(n, k, sparsity, dtype, gen)
                fmt = Banded.compress(weight)
                dense = weight.double()
                for m in CHECK_TOKENS:
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                    reference = x.double() @ dense.T
                    for name, call in fmt.cuda_candidates(m).items():
                        case = f"{str(dtype)[6:]} {n}x{k} {sparsity:.0%} m={m} {name}"
                        errors[case] = relative_error(_poisoned(call, x, n), reference)
                        if not errors[case] < GOOD[dtype]:
                            failures.append(case)
                cuda_ops.release_scratch()
    weight = _pruned(256, 4096, 0.7, torch.float16, gen)
    fmt = Banded.compress(weight)
    ops = {  # each custom op under torch.compile in a CUDA graph, at a size it serves: result key, label, tokens, op
        "compiled_in_graph_rel_error": ("", 1, lambda x: torch.ops.secateurs.banded_gemv(
            x, fmt.values, fmt.deltas, fmt.starts, fmt.offsets, 1, 1)),
        "compiled_in_graph_tc_rel_error": (" (tensor-core op)", 9, lambda x: torch.ops.secateurs.banded_tc(
            x, fmt.values, fmt.deltas, fmt.starts, fmt.offsets, 16, 2)),
    }
    compiled = {}
    for key, (what, m, op) in ops.items():
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16, generator=gen)
        compiled[key] = compiled_in_graph_error(op, x, x.double() @ weight.double().T)
        if not isinstance(compiled[key], float) or not compiled[key] < GOOD[torch.float16]:
            failures.append(f"torch.compile in a CUDA graph{what}: {compiled[key]}")
    worst = max(errors.values(), default=math.nan)
    print(f"checks: {len(errors)} candidate x case products against float64 (fp16/bf16, {len(CHECK_SHAPES)} odd shapes, "
          f"{', '.join(f'{s:.0%}' for s in SPARSITIES)} zeros, m = {', '.join(map(str, CHECK_TOKENS))}), worst "
          f"relative error {worst:.1e}; torch.compile(fullgraph) in a CUDA graph: GEMV "
          f"{compiled['compiled_in_graph_rel_error']}, tensor-core {compiled['compiled_in_graph_tc_rel_error']}; "
          f"{len(failures)} failures", flush=True)
    for failure in failures[:40]:
        print(f"FAIL {failure}: {errors.get(failure, '')}", flush=True)
    return {"errors": errors, "worst": worst, **compiled, "failures": failures}


def _time(calls: list) -> float:
    return graph_time_us(calls * math.ceil(CALLS / len(calls)))


def _candidates_us(fmt, fmts: list, m: int, x: torch.Tensor, reference: torch.Tensor, prefix: str = "") -> dict[str, dict]:
    """Every CUDA candidate of ``fmt`` at ``m`` rows (whose name starts with ``prefix``): its error against float64
    and its time over the copies."""
    out = {}
    for name, call in cuda_ops.candidates(fmt, m).items():
        if not name.startswith(prefix):
            continue
        paths = [cuda_ops.candidates(f, m)[name] for f in fmts]
        out[name] = {"rel_error": relative_error(call(x), reference),
                     "us": _time([lambda p=p, x=x: p(x) for p in paths])}
    return out


def _best(candidates: dict[str, dict]) -> tuple[str, float] | None:
    good = {name: c for name, c in candidates.items() if c["rel_error"] < GOOD[torch.float16]}  # the timing runs fp16
    if not good:
        return None
    name = min(good, key=lambda nm: good[nm]["us"])
    return name, good[name]["us"]


def shape_rows(n: int, k: int, bandwidth: float, gen: torch.Generator) -> list[dict]:
    """Per band: cuBLAS on the pruned dense weight, the bitmap's and the banded layout's candidates, per token count
    (1, 2, 4; and 8-64 on :data:`TC_SHAPES`, where the bitmap is timed by its tensor-core kernel alone)."""
    rows = []
    tokens = TOKENS + (TC_TOKENS if (n, k) in TC_SHAPES else ())
    xs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen) for m in tokens}
    for sparsity in SPARSITIES:
        weight = _pruned(n, k, sparsity, torch.float16, gen)
        dense_ws = [weight] + rotating(lambda i, w=weight: w.clone(), math.ceil(L2_BYTES / weight.nbytes) - 1)
        cublas = {m: _time([lambda w=w, x=xs[m]: F.linear(x, w) for w in dense_ws]) for m in tokens}
        del dense_ws
        fmt, bitmap = Banded.compress(weight), Bitmap.compress(weight)
        nonzeros = int((weight != 0).sum())
        band = band_of(1.0 - nonzeros / weight.numel())
        fmts = [fmt] + rotating(lambda i, f=fmt: f.clone(), math.ceil(L2_BYTES / fmt.nbytes()) - 1)
        bitmaps = [bitmap] + rotating(lambda i, b=bitmap: b.clone(), math.ceil(L2_BYTES / bitmap.nbytes()) - 1)
        for m in tokens:
            x = xs[m]
            reference = x.double() @ weight.double().T
            moved = fmt.nbytes() + x.nbytes + m * n * 2
            dense_bytes = n * k * 2 + x.nbytes + m * n * 2
            row = {"N": n, "K": k, "sparsity": sparsity, "band": band.name if band else None, "tokens": m,
                   "cublas_us": cublas[m], "bytes_per_weight": fmt.nbytes() / weight.numel(),
                   "bitmap_bytes_per_weight": bitmap.nbytes() / weight.numel(),
                   "entries_per_nonzero": fmt.entries() / max(nonzeros, 1), "byte_limit": dense_bytes / moved,
                   "banded": _candidates_us(fmt, fmts, m, x, reference),
                   "bitmap": _candidates_us(bitmap, bitmaps, m, x, reference,
                                            "cuda_tcbitmap" if m in TC_TOKENS else "")}
            best, best_bitmap = _best(row["banded"]), _best(row["bitmap"])
            best_tc = _best({name: c for name, c in row["banded"].items() if name.startswith("cuda_tcbanded")})
            if best_tc:
                row.update(tc_best=best_tc[0], tc_us=best_tc[1], tc_speedup=cublas[m] / best_tc[1])
            if "expand_cublas" in row["banded"]:
                row["expand_us"] = row["banded"]["expand_cublas"]["us"]
            if best:
                row.update(best=best[0], us=best[1], speedup=cublas[m] / best[1],
                           bw_fraction=moved / (best[1] * 1e-6) / bandwidth)
            if best_bitmap:
                row.update(bitmap_best=best_bitmap[0], bitmap_us=best_bitmap[1], bitmap_speedup=cublas[m] / best_bitmap[1])
            if best and best_bitmap:
                row["vs_bitmap"] = best_bitmap[1] / best[1]
            row["max_rel_error"] = max((c["rel_error"] for c in row["banded"].values()), default=math.nan)
            rows.append(row)
            print(_line(row), flush=True)
        del fmts, bitmaps, fmt, bitmap, weight
        cuda_ops.release_scratch()
        torch.cuda.empty_cache()
    return rows


def _line(row: dict) -> str:
    banded = (f"{row['us']:.1f} | **{row['speedup']:.2f}×** | {row['bw_fraction']:.2f} | {row['best']}" if "best" in row
              else "— | no correct kernel | — | —")
    bitmap = f"{row['bitmap_us']:.1f} ({row['bitmap_speedup']:.2f}×)" if "bitmap_us" in row else "—"
    versus = f"{row['vs_bitmap']:.2f}×" if "vs_bitmap" in row else "—"
    paths = (f"{row['tc_us']:.1f} ({row['tc_speedup']:.2f}×)" if "tc_us" in row else "—") + " / " + \
        (f"{row['expand_us']:.1f}" if "expand_us" in row else "—")
    return (f"| {row['sparsity']:.0%} | {row['N']}×{row['K']} | {row['tokens']} | {row['cublas_us']:.1f} | {banded} | "
            f"{paths} | {bitmap} | {versus} | {row['bytes_per_weight']:.3f} / {row['bitmap_bytes_per_weight']:.3f} | "
            f"{row['entries_per_nonzero']:.3f} | {row['byte_limit']:.2f}× | {row['max_rel_error']:.1e} |")


def _bitmap_bytes(weight: torch.Tensor) -> int:
    """The bitmap's fp16 bytes for ``weight``: values, one bit per weight, an int32 offset per 128 inputs (by its
    formula, so a width the bitmap refuses, not a multiple of 128, still compares)."""
    rows, cols = weight.shape
    return 2 * int((weight != 0).sum()) + rows * (-(-cols // 32)) * 4 + rows * (-(-cols // 128)) * 4


def storage(model: str, calib_samples: int = 32) -> dict:
    """Bytes per weight (fp16) of the banded layout and the bitmap over a real model's pruned linears."""
    import copy

    from secateurs.api import PruneConfig, prunable_linears, prune
    from secateurs.data.calib import CalibConfig
    from secateurs.engine.options import EngineOptions
    from secateurs.model.linear import weight_matrix
    from secateurs.model.load import load_model

    loaded = load_model(model)
    rows = []
    print("| method | zeros | banded B/weight | bitmap B/weight | ratio | entries per non-zero | fillers | padding | "
          "layers held |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in ("magnitude", "wanda"):
        for sparsity in SPARSITIES:
            pruned = copy.copy(loaded)
            pruned.model = copy.deepcopy(loaded.model)
            calib = CalibConfig("wikitext2", calib_samples, 128) if method == "wanda" else None
            prune(pruned, PruneConfig(method, sparsity), calib, EngineOptions(device="cpu"))
            total = {"weights": 0, "banded": 0, "bitmap": 0, "entries": 0, "nonzeros": 0, "fillers": 0, "padding": 0}
            held = layers = 0
            for module in prunable_linears(pruned).values():
                weight = weight_matrix(module).detach().half()
                layers += 1
                if Banded.fits(weight) is not None:
                    continue
                held += 1
                fmt = Banded.compress(weight)
                for key, value in fmt.overhead().items():
                    total[key] += value
                total["weights"] += weight.numel()
                total["banded"] += fmt.nbytes()
                total["bitmap"] += _bitmap_bytes(weight)
            row = {"method": method, "sparsity": sparsity, "layers": layers, "layers_held": held, **total,
                   "banded_bytes_per_weight": total["banded"] / max(total["weights"], 1),
                   "bitmap_bytes_per_weight": total["bitmap"] / max(total["weights"], 1),
                   "entries_per_nonzero": total["entries"] / max(total["nonzeros"], 1)}
            rows.append(row)
            print(f"| {method} | {sparsity:.0%} | {row['banded_bytes_per_weight']:.3f} | {row['bitmap_bytes_per_weight']:.3f} | "
                  f"{row['banded_bytes_per_weight'] / row['bitmap_bytes_per_weight']:.3f} | {row['entries_per_nonzero']:.3f} | "
                  f"{total['fillers'] / max(total['nonzeros'], 1):.2%} | {total['padding'] / max(total['nonzeros'], 1):.2%} | "
                  f"{held}/{layers} |", flush=True)
            del pruned
    return {"model": model, "calibration": f"wikitext2, {calib_samples} x 128 tokens (wanda)", "rows": rows}


def _loop(body: list[tuple[int, str]]) -> int:
    """Instructions of the innermost loop holding the most FMAs (a backward branch's span)."""
    best = (0, 0)
    for address, text in body:
        branch = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            span = [t for a, t in body if int(branch.group(1), 16) <= a <= address]
            fmas = sum(t.split()[0 if not t.startswith("@") else 1].startswith("FFMA") for t in span)
            if fmas > best[0] or (fmas == best[0] and len(span) < best[1]):
                best = (fmas, len(span))
    return best[1]


def sass(arch: str) -> list[dict]:
    """Main-loop SASS per stored entry of every banded GEMV, and per non-zero of the bitmap GEMV's bit loop."""
    import subprocess
    import tempfile

    from sass_count import cuobjdump, functions

    from secateurs.kernels import banded

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for source, pattern, entries in ((banded.SOURCE, r"gemvbd_(f16|bf16)_t(\d+)_p(\d+)_r(\d+)", lambda m: 2 * int(m.group(3))),
                                         (cuda_ops.SOURCE, r"gemvbm_(f16|bf16)_t(\d+)_r1", lambda m: 1)):
            cubin = Path(folder) / f"{source.stem}.cubin"
            subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "-o", str(cubin), str(source)], check=True)
            text = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
            for name, body in sorted(functions(text).items()):
                match = re.fullmatch(pattern, name)
                if match:
                    loop = _loop(body)
                    rows.append({"kernel": name, "loop": loop, "entries": entries(match),
                                 "per_entry": loop / entries(match)})
    print(f"| kernel ({arch}) | main-loop instructions | stored entries per lane | per stored entry |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['kernel']} | {row['loop']} | {row['entries']} | {row['per_entry']:.2f} |")
    tc = tc_sass(arch)
    print(f"| tensor-core kernel ({arch}) | instructions | what they span | per scattered entry |")
    print("|---|---|---|---|")
    for row in tc:
        print(f"| {row['kernel']} | {row['instructions']} | {row['span']} | {row['per_entry']:.2f} |")
    return rows + tc


def _stores(body: list[tuple[int, str]]) -> list[int]:
    """Positions of the 16-bit shared stores (the scatter's) in a kernel's instruction list."""
    return [i for i, (_, text) in enumerate(body) if re.search(r"\bSTS\.U16\b", text)]


def tc_sass(arch: str) -> list[dict]:
    """SASS per scattered entry of the tensor-core kernels at 16 tokens: banded_tc.cu's round loop (the backward
    branch whose span holds 8 of its stores: a lane's grain loaded, decoded, scattered, its quad's ballots) over 8
    entries, against bitmap_tc.cu's slot chain (a unit's first to last of 16 value stores, over 15 slots; its
    popcounts and window shift come before it, so the chain alone undercounts the bitmap's unit). The banded
    scatter's stores are interleaved with its decode, so only the whole round is counted there."""
    import subprocess
    import tempfile

    from sass_count import cuobjdump, functions

    from secateurs.kernels import banded, bitmap

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for source in (banded.TC_SOURCE, bitmap.TC_SOURCE):
            cubin = Path(folder) / f"{source.stem}.cubin"
            subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "-o", str(cubin), str(source)], check=True)
            text = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
            for name, body in sorted(functions(text).items()):
                stores = _stores(body)
                if re.fullmatch(r"tcbd_f16_p\d+_n16", name):
                    spans = []
                    for end, (address, text_) in enumerate(body):
                        branch = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text_)
                        if branch and int(branch.group(1), 16) < address:
                            start = next(i for i, (a, _) in enumerate(body) if a >= int(branch.group(1), 16))
                            if sum(start <= i <= end for i in stores) == 8:
                                spans.append(end - start + 1)
                    rows.append({"kernel": name, "instructions": min(spans), "span": "round loop, 8 entries",
                                 "per_entry": min(spans) / 8})
                elif name == "tcbm_f16_n16":
                    chain = stores[15] - stores[0]
                    rows.append({"kernel": name, "instructions": chain, "span": "slot chain, 15 slots",
                                 "per_entry": chain / 15})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "banded.json")
    parser.add_argument("--quick", action="store_true", help="only the first shape (a smoke run)")
    parser.add_argument("--storage", action="store_true", help="CPU: bytes per weight on a real model's masks")
    parser.add_argument("--model", default="smollm2-135m", help="--storage: the model (the shortcut, a folder or a .gguf)")
    parser.add_argument("--sass", action="store_true", help="nvcc, no GPU: SASS instructions per stored entry")
    parser.add_argument("--arch", default="sm_90", help="--sass: the architecture")
    args = parser.parse_args()
    if args.sass:
        sass(args.arch)
        return
    if args.storage:
        started = time.time()
        out = args.out if args.out != RESULTS / "banded.json" else RESULTS / "banded_storage.json"
        result = storage(args.model)
        save_results(out, {**result, "machine": machine(), "seconds": round(time.time() - started, 1)})
        print(f"saved {out}")
        return
    if not torch.cuda.is_available() or cuda_ops.status():
        sys.exit(f"error: the banded kernel benchmark needs the CUDA kernels ({cuda_ops.status()})")
    started = time.time()
    gen = torch.Generator("cuda").manual_seed(0)
    checked = checks(gen)
    if checked["failures"]:
        save_results(args.out, {"checks": checked, "machine": machine(), "seconds": round(time.time() - started, 1)})
        sys.exit(f"error: {len(checked['failures'])} banded products disagree with float64; no timing (saved {args.out})")
    bandwidth = table_head("| zeros | shape (N×K) | tokens | cuBLAS µs | banded µs | vs cuBLAS | BW (of copy) | kernel "
                           "| banded tensor-core µs (vs cuBLAS) / expand µs "
                           "| bitmap µs (vs cuBLAS; 8-64 tokens: its tensor-core kernel) | banded vs bitmap "
                           "| bytes/weight banded / bitmap | entries per non-zero | byte limit | max rel. error |")
    shapes = [shape for group in SHAPES.values() for shape in group.values()]
    rows = []
    for n, k in shapes[:1] if args.quick else shapes:
        rows += shape_rows(n, k, bandwidth, gen)
    save_results(args.out, {"rows": rows, "copy_bandwidth_bytes_per_s": bandwidth, "checks": checked,
                            "machine": machine(), "seconds": round(time.time() - started, 1)})
    print(f"saved {args.out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
