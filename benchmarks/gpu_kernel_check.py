"""Compiled (not interpreted) Triton kernels against a float64 reference, on the GPU, before any timing.

CI checks the kernels with ``TRITON_INTERPRET=1`` on CPU; this script checks the compiled code on a
CUDA device: every launch configuration the tuner may pick, for 2:4 and bitmap weights, at decode,
mid and prefill row counts and at shapes that are and are not multiples of the tiles (SmolLM2's 576 /
1536). Inputs are fresh random fp16 per case; the error is ‖y − ref‖ / ‖ref‖ with ref in float64.

    python benchmarks/gpu_kernel_check.py        # prints one line per case, exits 1 on any failure
"""

from __future__ import annotations

import sys

import torch

from secateurs.kernels import Bitmap, Sparse24, SparseLinear
from secateurs.kernels import triton_ops
from secateurs.sparsity.masks import nm_mask, unstructured_mask

SHAPES = ((4096, 4096), (11008, 4096), (576, 1536), (1536, 576))  # bitmap needs K % 128 == 0: not 576
ROWS = (1, 7, 16, 100, 128, 333)
TOLERANCE = 1e-2


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.double() - ref).norm() / ref.norm())


def main() -> None:
    if not (torch.cuda.is_available() and triton_ops.HAVE_TRITON):
        sys.exit("needs a CUDA GPU and triton")
    gen = torch.Generator("cuda").manual_seed(0)
    failures = 0
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
