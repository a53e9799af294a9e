"""The N:M GEMVs (4:8: kernels/cuda/sparse48.cu, 8:16: kernels/cuda/sparse816.cu) against cuBLAS at the seven
Llama linear shapes, 1, 2 and 4 tokens; and the prompt paths of the 4:8, 8:16 and bitmap formats (expand into the
shared scratch, then cuBLAS) at 2-8192 tokens.

    python benchmarks/sparse48.py [--formats 4:8,8:16] [--out benchmarks/results/sparse48.json]      # GPU: the GEMVs
    python benchmarks/sparse48.py --part prompt [--formats 4:8,8:16,bitmap]                          # GPU: prompts
    python benchmarks/sparse48.py --formats 8:16 --shapes 3                                          # the first 3 shapes
    python benchmarks/sparse48.py --part tc --shapes 3                 # GPU: tensor-core kernels, old and ring, 8-64 tokens

``--formats`` picks the formats (default: all of the part's); results go to ``sparse48[_prompt].json`` for 4:8
alone, else a name with the formats in it (``sparse48_4-8_8-16.json``).

The protocol of ``sparse_kernels.py --part kernels``, through its helpers: every path is a CUDA graph of
at least 24 calls rotating over enough weight copies to overflow L2, median of replays; cuBLAS is
``F.linear`` on the same pruned fp16 weight (random normal, magnitude-pruned to the pattern). Every kernel
candidate the format's ``cuda_candidates`` offers is first checked against a float64 product, at every shape and token
count, and on odd shapes (rows not a multiple of a block, K tails) in fp16 and bf16, and once under
``torch.compile(fullgraph=True)`` inside a CUDA graph. Bandwidth = the bytes a path must move
(compressed weight + x + y) per second over the device-to-device copy bandwidth of the same run.

``--part prompt``: per shape, the 4:8 and 8:16 weights (8-8192 tokens) and the 50% and 70% bitmap (2-8192 tokens) against
cuBLAS ``F.linear`` on the same pruned dense weight, every candidate their ``cuda_candidates`` offer (the expand
paths; for 4:8 and 8:16 at 8-64 tokens also the tensor-core kernel of ``nm_tc.cu``, at each of its token tiles)
checked against float64 first; each path a CUDA graph rotating over weight copies that overflow L2, of
enough calls for about 5 ms. Beside it, the expansion alone (stored bytes read + dense bytes written, as a
fraction of the copy bandwidth), the figure that bounds the path: cuBLAS time + expansion time.

``--part tc``: per shape, the 4:8 and 8:16 weights at 8, 16, 32 and 64 tokens: cuBLAS ``F.linear`` against every
tensor-core candidate, nm_tc.cu's kernel (``cuda_tc48_...``) and its ring form (``cuda_tcr48_...``: every depth,
the one offered only under the opt-in too, which this script sets), each checked against float64 first and timed as
the prompt part times its paths; per row the best of each family, its speed against cuBLAS and its stored bytes
(+ x + y) over the copy bandwidth.
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

from secateurs.kernels import Bitmap, Nm48, Nm816, SparseFormat, cuda_ops
from secateurs.kernels.nm import NmFormat
from secateurs.sparsity.masks import nm_mask, unstructured_mask

from records import save_results
from sparse_kernels import (L2_BYTES, RESULTS, SHAPES, compiled_in_graph_error, graph_time_us, machine,
                            relative_error, rotating, table_head)

TOKENS = (1, 2, 4)
CALLS = 24  # calls per graph replay, rotating over the copies
GOOD = 2e-3  # relative error against float64 under which a candidate counts as correct


NM = {"4:8": Nm48, "8:16": Nm816}  # the GEMV part's formats


def _wnm(cls: type[NmFormat], n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    base = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
    return base * nm_mask(base.abs(), cls.kept, cls.group)


def _time(calls: list) -> float:
    return graph_time_us(calls * math.ceil(CALLS / len(calls)))


def shape_rows(cls: type[NmFormat], n: int, k: int, bandwidth: float, gen: torch.Generator) -> list[dict]:
    """cuBLAS on the dense weight against every candidate of the format, per token count; the fastest correct one wins."""
    weight = _wnm(cls, n, k, torch.float16, gen)
    fmt = cls.compress(weight)
    dense_ws = rotating(lambda i: weight.clone(), max(1, math.ceil(L2_BYTES / weight.nbytes)))
    fmts = [fmt] + rotating(lambda i: fmt.clone(), math.ceil(L2_BYTES / fmt.nbytes()) - 1)
    rows = []
    for m in TOKENS:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
        reference = x.double() @ weight.double().T
        dense_us = _time([lambda w=w, x=x: F.linear(x, w) for w in dense_ws])
        dense_bytes = weight.nbytes + x.nbytes + m * n * 2
        sparse_bytes = fmt.nbytes() + x.nbytes + m * n * 2
        row = {"format": cls.kind, "N": n, "K": k, "tokens": m, "dense_us": dense_us, "dense_bw_fraction": dense_bytes / (dense_us * 1e-6) / bandwidth,
               "byte_limit": dense_bytes / sparse_bytes, "candidates": {}}
        for name, call in fmt.cuda_candidates(m).items():
            paths = [f.cuda_candidates(m)[name] for f in fmts]
            row["candidates"][name] = {"rel_error": relative_error(call(x), reference),
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
        print(f"| {cls.kind} | {n}×{k} | {m} | {dense_us:.1f} | {row['dense_bw_fraction']:.2f} | {best} | {row['byte_limit']:.2f}× "
              f"| {row['max_rel_error']:.1e} |", flush=True)
    return rows


def checks(cls: type[NmFormat], gen: torch.Generator) -> dict:
    """Every candidate against float64 on odd shapes, fp16 and bf16, m = 1..4; and the GEMV op compiled whole
    (fullgraph) and replayed in a CUDA graph."""
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in ((37, 1040), (37, 1088), (576, 1536), (1536, 576), (3, 8192)):
            weight = _wnm(cls, n, k, dtype, gen)
            fmt = cls.compress(weight)
            for m in (1, 2, 3, 4):
                x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                reference = x.double() @ weight.double().T
                for name, call in fmt.cuda_candidates(m).items():
                    errors[f"{str(dtype)[6:]} {n}x{k} m={m} {name}"] = relative_error(call(x), reference)
    weight = _wnm(cls, 256, 512, torch.float16, gen)
    fmt = cls.compress(weight)
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16, generator=gen)
    compiled = compiled_in_graph_error(lambda x: fmt._gemv(x, 1, 1), x, x.double() @ weight.double().T)  # its GEMV op
    worst = max(errors.values())
    print(f"{cls.kind}: odd shapes, fp16/bf16, m=1..4: {len(errors)} checks, worst relative error {worst:.1e}; "
          f"torch.compile(fullgraph) in a CUDA graph: {compiled}", flush=True)
    return {"odd_shape_errors": errors, "worst": worst, "compiled_in_graph_rel_error": compiled}


PROMPT_TOKENS = {"4:8": (8, 16, 32, 64, 128, 512, 2048, 8192), "8:16": (8, 16, 32, 64, 128, 512, 2048, 8192),
                 "bitmap 50%": (2, 8, 32, 128, 512, 2048, 8192), "bitmap 70%": (2, 8, 32, 128, 512, 2048, 8192)}


def _prompt_formats(base: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, SparseFormat]]:
    """The pruned dense weight and its stored format, per prompt-path format of ``kinds``."""
    out = {}
    for kind in kinds:
        if kind in NM:
            wnm = base * nm_mask(base.abs(), NM[kind].kept, NM[kind].group)
            out[kind] = (wnm, NM[kind].compress(wnm))
    for sparsity in (0.5, 0.7) if "bitmap" in kinds else ():
        wu = base * unstructured_mask(base.abs(), sparsity)
        out[f"bitmap {int(sparsity * 100)}%"] = (wu, Bitmap.compress(wu))
    return out


def _expand_only(fmt: SparseFormat, scratch: torch.Tensor) -> list:
    """The expansion kernels alone, into ``scratch``: name -> call (an N:M format's chunk-per-thread variants, the bitmap's)."""
    if isinstance(fmt, NmFormat):
        return [(f"{fmt.gemv_name.replace('gemv', 'expand')}_c{c}", lambda c=c: fmt._expand(scratch, c))
                for c in fmt.expand_chunks if c == 1 or fmt._wide_positions()]
    return [("expandbm", lambda: cuda_ops.bitmap_expand(fmt.values, fmt.bits, fmt.offsets, scratch))]


def _rotated_us(calls: list, seconds_each: float) -> float:
    """Median µs per call of a graph rotating over ``calls`` (weight copies), about 5 ms of work per replay."""
    count = max(len(calls), min(CALLS, math.ceil(5e-3 / max(seconds_each, 1e-7))))
    return graph_time_us([calls[i % len(calls)] for i in range(count)])


def prompt_rows(n: int, k: int, bandwidth: float, gen: torch.Generator, kinds: tuple[str, ...]) -> list[dict]:
    """cuBLAS on each pruned dense weight against every prompt candidate of its stored format, per token count."""
    base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
    rows = []
    for label, (weight, fmt) in _prompt_formats(base, kinds).items():
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
                row["candidates"][name] = {"rel_error": relative_error(call(x), reference),
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


TC_TOKENS = (8, 16, 32, 64)
"""Token counts of ``--part tc``: decode batches 8-64, where the tensor-core kernels run (row buckets 8-64)."""


def tc_rows(n: int, k: int, bandwidth: float, gen: torch.Generator, kinds: tuple[str, ...]) -> list[dict]:
    """cuBLAS on each pruned dense weight against every tensor-core candidate of its stored format (nm_tc.cu's
    ``cuda_tc<kind>_...`` and the ring kernels ``cuda_tcr<kind>_...`` at every depth), each checked against float64
    first, at 8-64 tokens: the old kernel against the ring one at the decode batches where the 4:8 block linears
    read 1.22 TB/s. Bandwidth = stored bytes + x + y per second over the copy bandwidth."""
    base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
    rows = []
    for label, (weight, fmt) in _prompt_formats(base, kinds).items():
        dense_ws = [weight] + rotating(lambda i, w=weight: w.clone(), math.ceil(L2_BYTES / weight.nbytes) - 1)
        fmts = [fmt] + rotating(lambda i, f=fmt: f.clone(), math.ceil(L2_BYTES / fmt.nbytes()) - 1)
        for m in TC_TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            reference = x.double() @ weight.double().T
            moved = fmt.nbytes() + x.nbytes + m * n * 2
            seconds = moved / bandwidth
            row = {"format": label, "N": n, "K": k, "tokens": m, "stored_bytes": fmt.nbytes(),
                   "byte_limit": (weight.nbytes + x.nbytes + m * n * 2) / moved,
                   "cublas_us": _rotated_us([lambda w=w, x=x: F.linear(x, w) for w in dense_ws], seconds),
                   "candidates": {}}
            for name, call in fmt.cuda_candidates(m).items():
                if not name.startswith("cuda_tc"):
                    continue
                paths = [f.cuda_candidates(m)[name] for f in fmts]
                us = _rotated_us([lambda p=p, x=x: p(x) for p in paths], seconds)
                row["candidates"][name] = {"rel_error": relative_error(call(x), reference), "us": us,
                                           "speedup": row["cublas_us"] / us,
                                           "bw_fraction": moved / (us * 1e-6) / bandwidth}
            row["max_rel_error"] = max((c["rel_error"] for c in row["candidates"].values()), default=math.nan)
            cells = []
            for family in (f"cuda_{fmt.tc_name}_", f"cuda_{fmt.tc_ring_name}_"):
                good = {nm: c for nm, c in row["candidates"].items() if nm.startswith(family) and c["rel_error"] < GOOD}
                best = min(good, key=lambda nm: good[nm]["us"], default=None)
                row[f"best_{family[5:-1]}"] = best
                cells.append(f"{good[best]['us']:.1f} | **{good[best]['speedup']:.2f}×** | "
                             f"{good[best]['bw_fraction']:.2f} | {best}" if best else "— | none correct | — | —")
            rows.append(row)
            print(f"| {label} | {n}×{k} | {m} | {row['cublas_us']:.1f} | {' | '.join(cells)} | {row['byte_limit']:.2f}× "
                  f"| {row['max_rel_error']:.1e} |", flush=True)
            del x, reference
        del dense_ws, fmts
        torch.cuda.empty_cache()
    return rows


# --part tc and --part prompt: each table's header row and the rows of one shape (N, K), on one measured bandwidth
TABLES = {
    "tc": ("| format | shape (N×K) | tokens | cuBLAS µs | tc µs | vs cuBLAS | BW (of copy) | tc kernel | ring µs "
           "| vs cuBLAS | BW (of copy) | ring kernel | byte limit | max rel. error |", tc_rows),
    "prompt": ("| format | shape (N×K) | tokens | cuBLAS µs | best µs | vs cuBLAS | path "
               "| expansion alone (of copy BW) | max rel. error |", prompt_rows),
}


def _out(part: str, kinds: tuple[str, ...], given: Path | None) -> Path:
    """``sparse48[_prompt|_tc].json`` for 4:8 alone (the recorded runs), else the formats in the name."""
    if given:
        return given
    suffix = "" if kinds == ("4:8",) else "_" + "_".join(kind.replace(":", "-") for kind in kinds)
    return RESULTS / f"sparse48{'' if part == 'gemv' else '_' + part}{suffix}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("gemv", "prompt", "tc"), default="gemv")
    parser.add_argument("--formats", default=None, help="comma-separated: 4:8, 8:16 (and bitmap for --part prompt); "
                                                         "default all of the part's")
    parser.add_argument("--shapes", type=int, default=None, help="only the first SHAPES Llama shapes (a shorter run)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/sparse48[_prompt][_formats].json")
    args = parser.parse_args()
    known = (*NM, "bitmap") if args.part == "prompt" else tuple(NM)  # tc: the N:M tensor-core kernels
    kinds = tuple(args.formats.split(",")) if args.formats else known
    if not set(kinds) <= set(known):
        sys.exit(f"error: --formats for --part {args.part}: choose among {', '.join(known)}")
    if not torch.cuda.is_available() or cuda_ops.status():
        sys.exit(f"error: the N:M kernel benchmark needs the CUDA kernels ({cuda_ops.status()})")
    started = time.time()
    gen = torch.Generator("cuda").manual_seed(0)
    shapes = [shape for group in SHAPES.values() for shape in group.values()][: args.shapes]
    out = _out(args.part, kinds, args.out)
    if args.part in TABLES:
        columns, part_rows = TABLES[args.part]
        bandwidth = table_head(columns)
        rows = []
        for n, k in shapes:
            rows += part_rows(n, k, bandwidth, gen, kinds)
        save_results(out, {"rows": rows, "copy_bandwidth_bytes_per_s": bandwidth, "machine": machine(),
                           "seconds": round(time.time() - started, 1)})
        print(f"saved {out}")
        return
    checked = {kind: checks(NM[kind], gen) for kind in kinds}
    bandwidth = table_head("| format | shape (N×K) | tokens | cuBLAS µs | cuBLAS BW | µs | speedup | BW (of copy) | kernel "
                           "| byte limit | max rel. error |")
    rows = []
    for n, k in shapes:
        for kind in kinds:
            rows += shape_rows(NM[kind], n, k, bandwidth, gen)
            torch.cuda.empty_cache()
    save_results(out, {"rows": rows, "copy_bandwidth_bytes_per_s": bandwidth,
                       "checks": checked if kinds != ("4:8",) else checked["4:8"],
                       "machine": machine(), "seconds": round(time.time() - started, 1)})
    print(f"saved {out}")


if __name__ == "__main__":
    main()
