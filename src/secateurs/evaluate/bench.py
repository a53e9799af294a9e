"""``secateurs bench``: MODEL as stored, and on sparse kernels, beside a dense baseline, in one run.

The timing protocol is ``speed.py``'s; this module is the comparison around it: it loads each model
in turn (one on the accelerator at a time), swaps eligible linears for sparse kernels, and says
which kernel paths ran, so a ratio is always against the fastest dense path a user has.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from ..errors import UsageError
from .speed import SpeedConfig, SpeedResult, measure, ratios


def _move_away(model: torch.nn.Module, device: torch.device) -> None:
    """Free the accelerator for the next model: one model on the device at a time."""
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare(
    model: str,
    baseline: str | None,
    sparse: bool,
    min_sparsity: float,
    device: torch.device,
    dtype: str,
    config: SpeedConfig,
) -> dict:
    """Measure the baseline, MODEL as stored and MODEL on sparse kernels, one after another, same protocol.

    A model without sparse layers is still measured dense, with a note instead of a sparse column;
    on CPU (or without Triton) sparse layers run the exact reference path, and a note says so.
    """
    from ..kernels import HAVE_TRITON, sparse_layers, sparsify
    from ..kernels.linear import fallback_notes
    from ..model.load import load_model

    config.check()
    dtype = ("float16" if device.type == "cuda" else "float32") if dtype == "auto" else dtype
    results: list[SpeedResult] = []
    notes: list[str] = []
    swapped = None
    if baseline is not None:
        loaded = load_model(baseline, dtype)
        results.append(measure(loaded.model, "baseline", device, config, loaded.local_path))
        _move_away(loaded.model, device)
        del loaded
    loaded = load_model(model, dtype)
    if sparse_layers(loaded.model):
        results.append(measure(loaded.model, "sparse", device, config, loaded.local_path))
    else:
        results.append(measure(loaded.model, "pruned" if baseline else "model", device, config, loaded.local_path))
        if sparse:
            _move_away(loaded.model, device)
            try:
                swapped = sparsify(loaded.model, loaded.spec, min_sparsity)
            except UsageError as exc:
                notes.append(f"no sparse run: {exc}")
            else:
                results.append(measure(loaded.model, "sparse", device, config))
    if any(r.label == "sparse" for r in results):
        if device.type != "cuda":
            notes.append("on CPU sparse layers run the exact PyTorch reference (expand, then dense matmul): no speedup expected")
        elif not HAVE_TRITON:
            notes.append("triton is not installed: sparse layers run the PyTorch reference path (pip install triton)")
        notes.extend(n for n in fallback_notes() if n not in notes and "no CUDA device" not in n)
        sparse_run = next(r for r in results if r.label == "sparse")
        if sparse_run.extra_mib:
            notes.append(f"sparse layers keep {sparse_run.extra_mib:.0f} MiB at run time beside their stored weights "
                         "(the 2:4 expand path's one shared scratch buffer, and dense/cuSPARSELt copies only under "
                         "SECATEURS_SPARSE_COPIES=sparse or dense); counted in peak memory")
    first = results[0]
    return {
        "device": str(device),
        "dtype": dtype,
        "config": asdict(config),
        "results": [r.to_dict() for r in results],
        "ratios": {r.label: ratios(first, r) for r in results[1:]},
        "notes": notes,
        "sparsify": None if swapped is None else swapped.stage_record().to_dict(),
    }
