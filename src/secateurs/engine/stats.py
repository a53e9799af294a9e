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

    def _add_half(self, x: torch.Tensor) -> bool:
        """Add a half-precision CUDA batch straight from its fp16/bf16 values, accumulating in float32.

        Returns False when this kind has no such path; the batch is then cast to float32 first.
        """
        return False

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        if not (flat.is_cuda and flat.dtype in (torch.float16, torch.bfloat16) and self._add_half(flat)):
            self._add(flat.to(torch.float32))
        self.n_tokens += flat.shape[0]

    def white(self) -> None:
        """Replace the sums by those of one white input (unit variance, uncorrelated features), under
        which Wanda and SparseGPT score by plain weight magnitude (RIA by its relative importance
        alone): the fallback for an expert the router sent too few calibration tokens
        (:mod:`secateurs.sparsity.experts`)."""
        raise NotImplementedError(f"{type(self).__name__} has no white-input statistics")

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

    def _add_half(self, x: torch.Tensor) -> bool:
        """One float32-accumulating norm pass over the half values: casting first would write and
        re-read two float32 copies of every input (the down projection's is tokens × intermediate)."""
        self.sum_sq += torch.linalg.vector_norm(x, 2, dim=0, dtype=torch.float32).square()
        return True

    def tensors(self) -> list[torch.Tensor]:
        return [self.sum_sq]

    def white(self) -> None:
        self.sum_sq.fill_(1.0)
        self.n_tokens = 1

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

    def _add_half(self, x: torch.Tensor) -> bool:
        """A tensor-core product with float32 output: the product of two fp16/bf16 numbers is exact in
        float32 and the accumulation is float32, so this is the float32 Hessian, several times faster."""
        self.xtx.add_(torch.mm(x.t(), x, out_dtype=torch.float32))
        return True

    def tensors(self) -> list[torch.Tensor]:
        return [self.xtx]

    def white(self) -> None:
        self.xtx = torch.eye(self.in_features, dtype=torch.float32, device=self.xtx.device)
        self.n_tokens = 1

    def matrix(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.n_tokens, 1))

    def release_matrix(self) -> torch.Tensor:
        """:meth:`matrix` computed in place, for a caller that consumes it: the accumulator gives up
        its sums, so a 28,672-wide Hessian costs one in×in buffer instead of two."""
        xtx, self.xtx = self.xtx, torch.empty(0, device=self.xtx.device)
        return xtx.mul_(2.0 / max(self.n_tokens, 1))


class InputMean(Accumulator):
    """Σ over tokens of x per input feature (means, e.g. for bias compensation)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)

    def _add(self, x: torch.Tensor) -> None:
        self.sum += x.sum(dim=0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.sum]

    def white(self) -> None:
        self.sum.zero_()
        self.n_tokens = 1

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n_tokens, 1)
