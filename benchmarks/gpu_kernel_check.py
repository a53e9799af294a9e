"""Compiled kernels against a float64 reference, on the GPU, before any timing.

CI checks the kernels' arithmetic on CPU (Triton's interpreter, emulations of the CUDA data flow); this
script checks the compiled code on a CUDA device:

- ``--part triton``: every Triton launch configuration the tuner may pick, for 2:4 and bitmap weights;
- ``--part cuda``: every CUDA candidate each stored format offers (``--formats``, default all: 2:4's GEMV,
  ``mma.sp`` decode kernel, every tile shape of the ``mma.sp`` prompt GEMM and expand path; 4:8's and 8:16's
  GEMV and expand paths and, at 5-64 rows, their tensor-core kernel (nm_tc.cu) and its ring form at every depth
  (``--only tcr48,tcr816``); the 50% and 70% bitmap's GEMV, expand path and, at
  5-64 rows, its tensor-core kernel (bitmap_tc.cu); the banded layout's GEMV, expand path and, at 5-64 rows,
  tensor-core kernel (banded_tc.cu) at 50/60/70/80% zeros, one weight per density band) at every row bucket from 1 to
  8192 tokens (and
  row counts inside buckets), fp16 and bf16, on the Llama shapes and on shapes that are not multiples of
  the tiles; the output is poisoned with NaN first, so an unwritten element fails; then the dispatcher
  (SparseLinear, tuned) and the ops under ``torch.compile(fullgraph=True)`` inside a CUDA graph.

Inputs are fresh random per case; the error is ‖y − ref‖ / ‖ref‖ with ref in float64.

The Hopper ``wgmma.sp`` GEMM (kernels/wgmma.py; the first in-flight configurations multiplied wrongly on an H100
and were removed; ``m128_n128_s5_f1``, ``m128_n256_s4_f1``, ``m256_n128_s4_f1`` and ``m128_n128_s4_f1`` keep one
group in flight with unrolled metadata registers, ``m128_n128_s4_sk128`` runs 128-input stages; none has yet run) makes its first launches (every tile configuration, fp16 and bf16, whole and split K) in a
child process: a configuration that faults (which would
take the CUDA context, and this check, with it) or multiplies wrongly is reported and withheld from the rest.

    python benchmarks/gpu_kernel_check.py [--part all|cuda|triton] [--formats 2:4,4:8,8:16,bitmap,banded] [--only expand]
    python benchmarks/gpu_kernel_check.py --part cuda --formats 2:4 --only wgmma   # the wgmma GEMM alone
    python benchmarks/gpu_kernel_check.py --part cuda --formats banded --only tcbanded   # banded_tc.cu alone
    # one line per case, exits 1 on any failure
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

os.environ.setdefault("SECATEURS_UNVERIFIED_KERNELS", "1")  # this script is where such kernels are first run

from secateurs.kernels import SEGMENT, Bitmap, Nm48, Nm816, Sparse24, SparseFormat, SparseLinear, cuda_ops
from secateurs.kernels import triton_ops, wgmma
from secateurs.kernels.banded import Banded
from secateurs.kernels.linear import bucket
from secateurs.sparsity.masks import nm_mask, unstructured_mask

SHAPES = ((4096, 4096), (11008, 4096), (576, 1536), (1536, 576))  # bitmap needs K % 128 == 0: not 576
ROWS = (1, 7, 16, 100, 128, 333)
TOLERANCE = 1e-2


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.double() - ref).norm() / ref.norm())


CUDA_SHAPES = ((37, 1088), (200, 576), (576, 1536), (1536, 576), (4096, 4096), (11008, 4096), (4096, 11008),
               (1024, 8192), (37, 1040), (200, 1152))  # 37x1040: 4:8 without whole four-chunk expand units
FORMATS = ("2:4", "4:8", "8:16", "bitmap", "banded")
CUDA_ROWS = (1, 2, 3, 4, 7, 8, 9, 16, 17, 31, 32, 33, 64, 100, 128, 333, 512, 1000, 2048, 8192)
CUDA_TOLERANCE = 5e-3


def _poisoned_call(call, x: torch.Tensor, n: int) -> torch.Tensor:
    """Fill the block the output will most likely reuse with NaN first, so an unwritten element shows."""
    poison = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype, device=x.device)
    del poison
    return call(x)


def stored(kind: str, base: torch.Tensor) -> dict[str, SparseFormat]:
    """``base`` pruned and stored as ``kind`` (the bitmap at 50% and 70%), where the shape allows it."""
    n, k = base.shape
    if kind == "2:4":
        return {"2:4": Sparse24.compress(base * nm_mask(base.abs(), 2, 4))}
    if kind == "4:8":
        return {"4:8": Nm48.compress(base * nm_mask(base.abs(), 4, 8))} if k % 16 == 0 else {}
    if kind == "8:16":
        return {"8:16": Nm816.compress(base * nm_mask(base.abs(), 8, 16))} if k % 16 == 0 else {}
    if kind == "banded":  # one weight per density band
        return {f"banded {int(s * 100)}%": Banded.compress(base * unstructured_mask(base.abs(), s))
                for s in (0.5, 0.6, 0.7, 0.8)} if k % 8 == 0 else {}
    if k % SEGMENT:
        return {}
    return {f"bitmap {int(s * 100)}%": Bitmap.compress(base * unstructured_mask(base.abs(), s)) for s in (0.5, 0.7)}


FIRST_LAUNCH_SHAPE = (576, 1536)  # 4.5 feature tiles of 128: a partial tile
FIRST_LAUNCH_TOKENS = 100  # a partial token tile for every configuration


def first_launch(which: str) -> None:
    """(Child process) the first launches of wgmma configurations (``CONFIG`` or ``all``), fp16 and bf16, whole K
    and K split in 3, each against float64; a line per configuration; exits 0 when every one is right."""
    gen = torch.Generator("cuda").manual_seed(0)
    n, k = FIRST_LAUNCH_SHAPE
    wrong = 0
    for config in wgmma.CONFIGS if which == "all" else (which,):
        errors = []
        for dtype in (torch.float16, torch.bfloat16):
            base = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
            fmt = Sparse24.compress(base * nm_mask(base.abs(), 2, 4))
            x = torch.randn(FIRST_LAUNCH_TOKENS, k, device="cuda", dtype=dtype, generator=gen)
            ref = x.double() @ fmt.to_dense().double().T
            for splits in (1, 3):
                got = _poisoned_call(lambda x, c=config, s=splits, f=fmt: wgmma.sparse24_wgmma(x, f.values, f.meta, c, s),
                                     x, n)
                torch.cuda.synchronize()
                errors.append(relative_error(got, ref))
        ok = all(err <= CUDA_TOLERANCE for err in errors)
        wrong += not ok
        print(f"{config}: {'ok' if ok else 'WRONG'}, rel err fp16 {errors[0]:.1e} (split K {errors[1]:.1e}), "
              f"bf16 {errors[2]:.1e} (split K {errors[3]:.1e})", flush=True)
    sys.exit(1 if wrong else 0)


def _child(which: str) -> tuple[bool, list[str]]:
    """Run :func:`first_launch` in a child process: (all right, its lines or why it died)."""
    try:
        done = subprocess.run([sys.executable, __file__, "--first-launch", which], capture_output=True, text=True,
                              timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return False, ["timed out after 300 s"]
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 and not lines:
        lines = [(done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:200]]
    return done.returncode == 0, lines


def first_launches() -> int:
    """The wgmma configurations' first launches in a child process (a fault there cannot end this check): all in
    one child; if it fails, one child per configuration, and each one that fails (faults or multiplies wrongly, in
    either dtype) is withheld (``wgmma.WITHHELD``) from everything after. On a GPU that is not sm_90 nothing is
    launched (the kernel is not offered there)."""
    if not wgmma.offered(torch.device("cuda")):
        print("wgmma 2:4 GEMM: not offered on this GPU (needs compute capability 9.0)")
        return 0
    ok, lines = _child("all")
    for line in lines:
        print(f"first launch (child process): {line}", flush=True)
    if ok:
        return 0
    failures = 0
    for config in wgmma.CONFIGS:
        ok, lines = _child(config)
        print(f"first launch (child process) cuda_wgmma24_{config}: {'ok' if ok else 'FAIL'} ({'; '.join(lines)})",
              flush=True)
        if not ok:
            failures += 1
            wgmma.WITHHELD.add(config)
    return failures


def selected(name: str, only: str) -> bool:
    """Whether ``--only`` picks a candidate: one of its comma-separated prefixes of the name, with or without the
    ``cuda_`` (``wgmma,expand_pipelined``); an empty ``--only`` picks all."""
    prefixes = only.split(",")
    return name.startswith((*prefixes, *(f"cuda_{p}" for p in prefixes)))


def check_cuda(gen, only: str = "", kinds: tuple[str, ...] = FORMATS) -> int:
    """Every CUDA candidate of each stored format, every bucket, fp16 and bf16, against float64; then the
    dispatcher and compile."""
    why = cuda_ops.status()
    if why:
        print(f"CUDA kernels: {why}")
        return 1
    failures = first_launches() if "2:4" in kinds and selected("cuda_wgmma24", only) else 0
    checks = 0
    worst: dict[str, float] = {}
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in CUDA_SHAPES:
            base = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
            for kind in kinds:
                for label_, fmt in stored(kind, base).items():
                    dense = fmt.to_dense().double()
                    for m in CUDA_ROWS:
                        if m == 8192 and (dtype != torch.float16 or n * k > 4096 * 11008):
                            continue
                        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                        ref = x.double() @ dense.T
                        for name, call in cuda_ops.candidates(fmt, bucket(m)).items():
                            if not selected(name, only):
                                continue
                            err = relative_error(_poisoned_call(call, x, n), ref)
                            checks += 1
                            family = f"{label_} " + (name.split("_r")[0] if "gemv" in name or "mma24" in name else name)
                            worst[family] = max(worst.get(family, 0.0), err)
                            if not err <= CUDA_TOLERANCE:
                                failures += 1
                                print(f"FAIL {label_} {str(dtype)[6:]} {n}x{k} m={m} {name}: rel err {err:.2e}", flush=True)
                    del fmt, dense
                cuda_ops.release_scratch()
            del base
    print(f"CUDA candidates: {checks} checks ({', '.join(kinds)}; fp16/bf16, {len(CUDA_SHAPES)} shapes, "
          f"m = {CUDA_ROWS[0]}..{CUDA_ROWS[-1]}), {failures} failures; worst per kernel: "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())), flush=True)
    # The dispatcher end to end (tuned choice, no copies by default) and the ops inside compiled graphs.
    compiled: list[tuple[SparseFormat, str, int]] = []
    for n, k in ((11008, 4096), (576, 1536)):
        base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
        for kind in kinds:
            for label_, fmt in stored(kind, base).items():
                layer = SparseLinear(fmt)
                dense = layer.dense_weight().double()
                for m in (1, 2, 8, 32, 333, 2048):
                    x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
                    err = relative_error(layer(x), x.double() @ dense.T)
                    failures += not err <= CUDA_TOLERANCE
                    print(f"SparseLinear {label_} {n}x{k} m={m}: rel err {err:.1e}, extra bytes {layer.extra_bytes()}, "
                          f"shared {cuda_ops.scratch_bytes()}", flush=True)
                if n == 576:
                    rows_for = {"cuda_mma24_r1_w8": 8, "cuda_gemv816_r2_s2": 1, "cuda_gemvbd_p32_r1_s1": 1,
                                "cuda_gemvbd_p16_r1_s1": 1, "cuda_tc48_n16_s16": 8,
                                "cuda_tc816_n16_s16": 8, "cuda_tcbitmap_n16_s16": 8,
                                "cuda_tcbanded_n16_s16": 8, "cuda_tcr48_n16_d3_s16": 8,
                                "cuda_tcr816_n16_d4_s16": 8}  # the rest at 512
                    compiled += [(fmt, name, rows_for.get(name, 512)) for name in
                                 ("cuda_gemm24_m128_n128_s4", "cuda_wgmma24_m128_n128_s4",
                                  "cuda_wgmma24_m128_n128_s5_f1", "cuda_wgmma24_m128_n256_s4_f1",
                                  "cuda_wgmma24_m256_n128_s4_f1", "cuda_wgmma24_m128_n128_s4_f1",
                                  "cuda_wgmma24_m128_n128_s4_sk128", "expand_cublas",
                                  "cuda_mma24_r1_w8", "expand_cublas_c1", "expand_cublas_c4", "cuda_gemv816_r2_s2",
                                  "cuda_gemvbd_p32_r1_s1", "cuda_gemvbd_p16_r1_s1", "cuda_tc48_n16_s16",
                                  "cuda_tc816_n16_s16", "cuda_tcbitmap_n16_s16", "cuda_tcbanded_n16_s16",
                                  "cuda_tcr48_n16_d3_s16", "cuda_tcr816_n16_d4_s16")
                                 if name in cuda_ops.candidates(fmt, rows_for.get(name, 512))]
                del layer, dense
    for fmt, name, m in compiled:
        if not selected(name, only):
            continue
        x = torch.randn(m, fmt.shape[1], device="cuda", dtype=torch.float16, generator=gen)
        call = fmt.cuda_candidates(bucket(m))[name]
        try:
            step = torch.compile(lambda x, call=call: call(x) * 2, fullgraph=True)
            step(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(x)
            x.copy_(torch.randn(m, fmt.shape[1], device="cuda", dtype=torch.float16, generator=gen))
            graph.replay()
            torch.cuda.synchronize()
            err = relative_error(out / 2, x.double() @ fmt.to_dense().double().T)
        except Exception as exc:  # noqa: BLE001
            err = float("inf")
            print(f"compile/graph {name}: {str(exc).splitlines()[0][:200]}")
        failures += not err <= CUDA_TOLERANCE
        print(f"torch.compile(fullgraph) in a CUDA graph, {fmt.kind} {name}: rel err {err:.1e}", flush=True)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "cuda", "triton"), default="all")
    parser.add_argument("--only", default="", help="cuda part: only the candidates whose name starts with one of "
                                                   "these comma-separated prefixes (a leading cuda_ may be left out: "
                                                   "--only wgmma,tcbitmap)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="cuda part: the stored formats to check")
    parser.add_argument("--first-launch", default=None, help=argparse.SUPPRESS)  # CONFIG or all: the child process
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.first_launch:
        first_launch(args.first_launch)
    gen = torch.Generator("cuda").manual_seed(0)
    failures = 0
    if args.part in ("all", "cuda"):
        kinds = tuple(args.formats.split(","))
        if not set(kinds) <= set(FORMATS):
            sys.exit(f"--formats: choose among {', '.join(FORMATS)}")
        failures += check_cuda(gen, args.only, kinds)
    if args.part == "cuda":
        print(f"{failures} failures")
        sys.exit(1 if failures else 0)
    if not triton_ops.HAVE_TRITON:
        sys.exit("the Triton part needs triton")
    for n, k in SHAPES:
        base = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen)
        weights = {"2:4": Sparse24.compress(base * nm_mask(base.abs(), 2, 4))}
        if Bitmap.supports(base) is None:
            weights["bitmap"] = Bitmap.compress(base * unstructured_mask(base.abs(), 0.7))
        for kind, fmt in weights.items():
            dense = fmt.to_dense().double()
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
                ref = x.double() @ dense.T
                worst = 0.0
                for config in triton_ops.candidates(fmt.k_blocks, m):
                    err = relative_error(fmt.triton_matmul(x, config), ref)
                    worst = max(worst, err)
                    if err > TOLERANCE:
                        failures += 1
                        print(f"FAIL {kind} {n}x{k} m={m} {config}: rel err {err:.2e}", flush=True)
                module_err = relative_error(SparseLinear(fmt)(x), ref)
                failures += module_err > TOLERANCE
                print(f"{kind:6s} {n:5d}x{k:<5d} m={m:<4d} worst config {worst:.1e}  SparseLinear {module_err:.1e}", flush=True)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
