"""Where the block engine runs, :class:`EngineOptions`: light (no torch), since the stages derive their
``--device`` / ``--batch-size`` / ``--offload-activations`` flags from its fields
(:mod:`secateurs.schema`) and ``--help`` must not import torch. The engine itself is
:mod:`secateurs.engine.sequential`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..schema import option

if TYPE_CHECKING:
    import torch


@dataclass
class EngineOptions:
    """Where the work runs. ``device='auto'`` picks CUDA when present."""

    device: str = option("auto", "auto (CUDA if present), cpu, cuda, cuda:N.")
    batch_size: int = option(1, "Sequences per forward pass.")
    offload_activations: bool = option(False, "Keep calibration activations in host memory between blocks.")
    # Seconds per engine stage (capture, statistics, solve, propagate, transfer), summed over
    # blocks and runs; CUDA is synchronised at each stage boundary so the split is honest.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Streaming and multi-process runs plug in here (an engine.sequential.EngineHooks, not named here
    # so that this light module imports nothing of the engine); None is the plain in-memory loop.
    hooks: Any = None

    def torch_device(self) -> torch.device:
        from ..device import resolve_device

        return resolve_device(self.device)
