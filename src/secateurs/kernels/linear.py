"""``SparseLinear``: a drop-in for a pruned ``nn.Linear`` that keeps only the compressed weight.

On each call it picks the fastest correct way to multiply for this many activation rows:
our Triton kernel, cuSPARSELt through ``torch.sparse`` (2:4 only, wins on long prompts), or
expanding the weight and calling dense ``F.linear`` (the fallback where both kernels lose). The
choice is timed once per (format, shape, power-of-two row bucket, dtype, device) with CUDA events
and cached, so no shape runs slower than the measured alternatives. Without CUDA or without Triton
it takes the pure-PyTorch reference path: slower, never wrong.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

import torch
from torch import nn

from . import triton_ops
from .formats import SparseFormat, from_tensors, reference_matmul

_PLANS: dict[tuple, tuple[str, triton_ops.Config | None]] = {}


def tuning_enabled() -> bool:
    """Timing candidates costs a few seconds per new shape; SECATEURS_KERNEL_TUNE=0 turns it off."""
    return os.environ.get("SECATEURS_KERNEL_TUNE", "1") != "0"


def clear_plans() -> None:
    _PLANS.clear()


def plans() -> dict[tuple, tuple[str, triton_ops.Config | None]]:
    """The cached choices, for reports: key -> (path, Triton config or None)."""
    return dict(_PLANS)


def bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held only in a compressed format (its tensors are buffers, so
    they move with ``.to()`` and are saved in the state dict under ``<name>.values`` etc.)."""

    def __init__(self, fmt: SparseFormat, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind = fmt.kind
        self.out_features, self.in_features = fmt.shape
        for name, tensor in fmt.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._semi: tuple[torch.device, torch.dtype, torch.Tensor] | None = None

    @classmethod
    def from_module(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt_cls) -> SparseLinear:
        return cls(fmt_cls.compress(weight.detach()), bias)

    def format(self) -> SparseFormat:
        names = ("values", "meta") if self.kind == "2:4" else ("values", "bits", "offsets")
        return from_tensors(self.kind, {n: getattr(self, n) for n in names}, (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.kind}"

    def dense_weight(self) -> torch.Tensor:
        return self.format().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        fmt = self.format()
        if not (x2.is_cuda and triton_ops.HAVE_TRITON) or x2.dtype != fmt.values.dtype or x2.shape[0] == 0:
            y = reference_matmul(x2, fmt)
        else:
            y = self._dispatch(x2.contiguous(), fmt)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _dispatch(self, x: torch.Tensor, fmt: SparseFormat) -> torch.Tensor:
        m = x.shape[0]
        key = (self.kind, self.out_features, self.in_features, bucket(m), x.dtype, x.device)
        plan = _PLANS.get(key)
        if plan is None:
            if tuning_enabled() and not torch.cuda.is_current_stream_capturing():
                plan = self._tune(x, fmt, bucket(m))
                _PLANS[key] = plan
            else:
                plan = ("triton", triton_ops.default_config(self.kind, m))
        path, config = plan
        if path == "triton":
            return triton_ops.run(x, fmt, config)
        if path == "cusparselt":
            return nn.functional.linear(x, self._semi_structured(x))
        return reference_matmul(x, fmt)

    def _semi_structured(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in torch's 2:4 semi-structured (cuSPARSELt) layout, built on first use."""
        if self._semi is None or self._semi[0] != x.device or self._semi[1] != x.dtype:
            dense = self.dense_weight().to(device=x.device, dtype=x.dtype)
            self._semi = (x.device, x.dtype, torch.sparse.to_sparse_semi_structured(dense))
        return self._semi[2]

    def _tune(self, x: torch.Tensor, fmt: SparseFormat, rows: int) -> tuple[str, triton_ops.Config | None]:
        """Time every candidate on ``rows`` random activation rows; keep the fastest that is correct."""
        probe = torch.randn(rows, self.in_features, device=x.device, dtype=x.dtype,
                            generator=torch.Generator(x.device).manual_seed(0))
        expected = reference_matmul(probe, fmt).float()
        scale = expected.abs().max().clamp_min(1e-3)
        options: list[tuple[tuple[str, triton_ops.Config | None], Callable[[], torch.Tensor]]] = [
            (("dense", None), lambda: reference_matmul(probe, fmt))
        ]
        for config in triton_ops.candidates(self.kind, rows):
            options.append((("triton", config), lambda c=config: triton_ops.run(probe, fmt, c)))
        if self.kind == "2:4" and rows >= 64:
            try:
                self._semi_structured(probe)
                options.append((("cusparselt", None), lambda: nn.functional.linear(probe, self._semi[2])))
            except (RuntimeError, NotImplementedError):
                self._semi = None
        best, best_ms = ("dense", None), float("inf")
        for plan, call in options:
            try:
                got = call().float()
            except Exception:  # a config the compiler or the device refuses is simply not a candidate
                continue
            if not torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * float(scale)):
                continue
            ms = _median_ms(call)
            if ms < best_ms:
                best, best_ms = plan, ms
        if best[0] != "cusparselt":
            self._semi = None
        return best


def _median_ms(call: Callable[[], torch.Tensor], repeats: int = 20) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
