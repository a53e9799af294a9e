"""Per-linear statistics of calibration inputs, as mergeable accumulators.

Every accumulator is a sum (plus a token count), so statistics gathered on different calibration
shards or ranks combine exactly with :meth:`Accumulator.merge` or an all-reduce of
:meth:`Accumulator.tensors`. Sums are kept in float32 whatever the model dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Accumulator(ABC):
    """A running sum over the calibration tokens that pass through one linear layer."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.in_features = in_features
        self.device = device
        self.n_tokens = 0

    @abstractmethod
    def _add(self, x: torch.Tensor) -> None:
        """Add a float32 batch of inputs shaped (tokens, in_features)."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """The summed tensors (for merging and all-reduce)."""

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self._add(flat)
        self.n_tokens += flat.shape[0]

    def merge(self, other: Accumulator) -> None:
        """Add another accumulator of the same kind (e.g. from another calibration shard)."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.add_(theirs.to(mine.device))
        self.n_tokens += other.n_tokens


class InputSqNorm(Accumulator):
    """Σ over tokens of x_j² per input feature j: ‖X_j‖₂² (Wanda's activation norm)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)

    def _add(self, x: torch.Tensor) -> None:
        self.sum_sq += x.square().sum(dim=0)

    def update(self, x: torch.Tensor) -> None:
        """Half-precision CUDA inputs are reduced in one float32-accumulating pass over the input.

        Casting first would write and re-read two float32 copies of every input (the down projection's
        is tokens × intermediate); the norm kernel reads the half values once and accumulates in float32.
        """
        flat = x.detach().reshape(-1, x.shape[-1])
        if flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16):
            self.sum_sq += torch.linalg.vector_norm(flat, 2, dim=0, dtype=torch.float32).square()
            self.n_tokens += flat.shape[0]
            return
        super().update(x)

    def tensors(self) -> list[torch.Tensor]:
        return [self.sum_sq]

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens."""
        return self.sum_sq.sqrt()


class Hessian(Accumulator):
    """Σ over tokens of x xᵀ: the layer-wise Hessian of the reconstruction error, up to scale.

    :meth:`matrix` returns H = 2 XᵀX / n_tokens (SparseGPT's convention; scale does not change
    OBS updates because damping is relative to the mean diagonal).
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def _add(self, x: torch.Tensor) -> None:
        self.xtx.addmm_(x.t(), x)

    def update(self, x: torch.Tensor) -> None:
        """Half-precision CUDA inputs go straight to a tensor-core product with float32 output.

        The product of two fp16/bf16 numbers is exact in float32 and the accumulation is float32,
        so this is the float32 Hessian, computed several times faster than casting first.
        """
        flat = x.detach().reshape(-1, x.shape[-1])
        if flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16):
            self.xtx.add_(torch.mm(flat.t(), flat, out_dtype=torch.float32))
            self.n_tokens += flat.shape[0]
            return
        super().update(x)

    def tensors(self) -> list[torch.Tensor]:
        return [self.xtx]

    def matrix(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.n_tokens, 1))


class InputMean(Accumulator):
    """Σ over tokens of x per input feature (means, e.g. for bias compensation)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)

    def _add(self, x: torch.Tensor) -> None:
        self.sum += x.sum(dim=0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.sum]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n_tokens, 1)
