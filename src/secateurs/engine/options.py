"""Where the block engine runs, :class:`EngineOptions`: light (no torch), since the stages derive their
``--device`` / ``--batch-size`` / ``--offload-activations`` flags from its fields
(:mod:`secateurs.schema`) and ``--help`` must not import torch. The engine itself is
:mod:`secateurs.engine.sequential`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..schema import option

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EngineOptions:
    """Where the work runs. ``device='auto'`` picks CUDA when present. Input only: what a run spent
    comes back from :func:`~secateurs.engine.sequential.run_blocks` (``BlockTimes``), and streaming or
    multi-process runs pass their ``EngineHooks`` to it as an argument."""

    device: str = option("auto", "auto (CUDA if present), cpu, cuda, cuda:N.")
    batch_size: int = option(1, "Sequences per forward pass.")
    offload_activations: bool = option(False, "Keep calibration activations in host memory between blocks.")

    def torch_device(self) -> torch.device:
        from ..device import resolve_device

        return resolve_device(self.device)
