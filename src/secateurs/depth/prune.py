"""The layer-pruning verb: score layers, optionally compensate, drop them physically.

``prune_layers(loaded, LayerConfig("gradmap", remove=6, compensate=True), calib)`` edits
``loaded.model`` in place (the CLI loads a fresh copy, so an input on disk is never touched) and
returns a :class:`LayerReport` whose ``stage_record()`` goes into ``secateurs.json``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..data.calib import CalibConfig, calibration_ids
from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..model.drop_layers import check_removal, drop_layers
from ..model.load import LoadedModel
from ..options import build_options
from ..record import LayersStage, peak_memory_mb
from .base import ScoringContext, Selection
from .config import LayerConfig
from .compensation import CompensationOptions, compensate
from .registry import scorer_class


@dataclass
class LayerReport:
    """What a depth prune did: layers removed (original indices), scores, compensation, time."""

    config: LayerConfig
    calibration: CalibConfig
    n_layers_before: int
    selection: Selection
    compensation: dict | None
    seconds: dict[str, float]
    peak_memory_mb: float
    device: str

    @property
    def removed(self) -> list[int]:
        return self.selection.removed

    def first_scores(self) -> dict[int, float]:
        return self.selection.rounds[0]

    def stage_record(self) -> LayersStage:
        return LayersStage(
            method=self.config.method,
            options=self.config.options,
            removed_layers=self.removed,
            removal_order=self.selection.order,
            layers_before=self.n_layers_before,
            layers_after=self.n_layers_before - len(self.removed),
            scores=[{str(k): v for k, v in r.items()} for r in self.selection.rounds],
            passes=self.selection.passes,
            compensation=self.compensation,
            calibration=asdict(self.calibration),
            seed=self.calibration.seed,
            seconds={k: round(v, 3) for k, v in self.seconds.items()},
            peak_memory_mb=round(self.peak_memory_mb, 1),
            device=self.device,
        )


def prune_layers(
    loaded: LoadedModel,
    config: LayerConfig,
    calib: CalibConfig | None,
    engine: EngineOptions | None = None,
    calib_ids: torch.Tensor | None = None,
) -> LayerReport:
    """Remove ``config.remove`` decoder layers from ``loaded.model`` in place.

    ``calib_ids`` lets a caller (the benchmark) pass already tokenized windows so every method
    sees the very same tokens; otherwise they are built from ``calib``.
    """
    engine = engine or EngineOptions()
    device = engine.torch_device()
    model, spec = loaded.model, loaded.spec
    n_layers = len(spec.blocks_of(model))
    if not 1 <= config.remove < n_layers:
        raise UsageError(f"--remove must be between 1 and {n_layers - 1} for this {n_layers}-layer model, got {config.remove}")
    check_removal(model, spec, range(config.remove))
    if calib is None:
        raise UsageError("layer pruning needs calibration data: pass --calib (e.g. wikitext2)")
    cls = scorer_class(config.method)
    scorer = cls(build_options(cls.Options, config.options))
    comp_options = build_options(CompensationOptions, config.compensation)
    if config.compensate and "post_feedforward_layernorm" in spec.norms:
        raise UsageError(f"--compensate needs the MLP output added straight to the residual; {spec.name} normalises it first")
    ids = calib_ids if calib_ids is not None else calibration_ids(calib, loaded.tokenizer, model)
    batches = [b.to(device) for b in ids.split(max(engine.batch_size, 1))]
    ctx = ScoringContext(model, spec, batches, device, engine)
    scorer.check(ctx)
    home = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds: dict[str, float] = {}
    model.to(device)
    try:
        start = time.perf_counter()
        selection = scorer.choose(ctx, config.remove)
        seconds["select"] = _lap(device, start)
        compensation = None
        if config.compensate:
            start = time.perf_counter()
            compensation = compensate(model, spec, selection.removed, batches, comp_options)
            seconds["compensate"] = _lap(device, start)
        drop_layers(model, spec, selection.removed)
    finally:
        model.to(home)
    seconds["total"] = sum(seconds.values())
    return LayerReport(config, calib, n_layers, selection, compensation, seconds, peak_memory_mb(device), str(device))


def _lap(device: torch.device, start: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
