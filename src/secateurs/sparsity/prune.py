"""``prune``: one unstructured / N:M method over the shared block engine, with the block-level steps
around it (per-block allocation, reconstruction, channel permutation) and the streamed form that never
holds the whole model. The request (:class:`PruneConfig`) and what it did (:class:`PruneReport`) live
here, beside the methods, as every other family keeps its verb beside its methods.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.calib import CalibConfig, calibration_ids
from ..engine.distributed import RankGroup
from ..engine.sequential import EngineHooks, EngineOptions, run_blocks
from ..engine.stream import StreamSession
from ..errors import UsageError
from ..model.arch import ArchSpec
from ..model.linear import sparsity_of, weight_matrix
from ..model.load import LoadedModel
from ..model.save import previous_stages
from ..options import build_options
from ..record import PruneStage, build_record, peak_memory_mb
from .atp import atp_target
from .base import SparsityTarget
from .config import AtpOptions, MoeOptions, OwlOptions, PruneConfig
from .experts import ExpertFallback, check_calibration_covers_experts
from .owl import owl_target
from .permute import ChannelPermutation
from .reconstruct import BlockReconstruction
from .registry import method_class


@dataclass
class PruneReport:
    """What a prune did: the request, the achieved sparsity per linear, time and peak memory."""

    config: PruneConfig
    target: SparsityTarget
    calibration: CalibConfig | None
    per_layer: dict[str, float]
    seconds: float
    peak_memory_mb: float
    device: str
    # Per block: reconstruction's held-out relative output error (the method's result, the weights
    # kept) and the score the permuted N:M groups keep (before, after the permutation).
    steps: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    # Per block: what reconstruction did (sparsity/reconstruct.BlockOutcome.to_record()).
    reconstruction: dict[int, dict] = field(default_factory=dict)
    # ATP's search: calibration loss per candidate spread (empty when the spread was given).
    allocation_search: dict[float, float] = field(default_factory=dict)
    # The method's block loop per engine stage (BlockTimes.stages; OWL / ATP passes not included).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # What the caller should tell the user (e.g. reconstruction kept no trained weights anywhere).
    notes: list[str] = field(default_factory=list)
    # An MoE model's: the --moe options as run, and per block the expert matrices pruned by the
    # fallback rule (too few calibration tokens); None on a dense model.
    moe: MoeOptions | None = None
    expert_fallback: dict[int, list[str]] | None = None

    @property
    def achieved(self) -> float:
        return sum(self.per_layer.values()) / max(len(self.per_layer), 1)

    def stage_record(self) -> PruneStage:
        return PruneStage(
            method=self.config.method,
            pattern=str(self.target.pattern),
            sparsity=list(self.target.per_block),
            options=self.config.options,
            allocation=self.config.allocation,
            allocation_options=self.config.allocation_options,
            reconstruct=self.config.reconstruct,
            permute=self.config.permute,
            allocation_search={f"{k:g}": round(v, 6) for k, v in self.allocation_search.items()},
            block_steps={kind: {str(i): [round(a, 6), round(b, 6)] for i, (a, b) in per.items()}
                         for kind, per in self.steps.items()},
            reconstruction={str(i): outcome for i, outcome in self.reconstruction.items()},
            calibration=asdict(self.calibration) if self.calibration else None,
            seed=self.calibration.seed if self.calibration else None,
            achieved_sparsity={"mean": self.achieved, "per_layer": self.per_layer},
            moe=asdict(self.moe) if self.moe is not None else None,
            expert_fallback=({str(i): names for i, names in sorted(self.expert_fallback.items())}
                             if self.expert_fallback is not None else None),
            seconds=round(self.seconds, 3),
            peak_memory_mb=round(self.peak_memory_mb, 1),
            device=self.device,
        )


def prune_spec(spec: ArchSpec, config: PruneConfig) -> ArchSpec:
    """The spec a prune walks: on an MoE family, with the request's ``--moe`` choices (routers,
    shared experts, routing-weighted statistics) deciding which linears are pruned and how."""
    moe = config.moe_options()
    return spec.with_moe_choices(moe.routers, moe.shared, moe.weighted)


def prunable_linears(loaded: LoadedModel, spec: ArchSpec | None = None) -> dict[str, torch.nn.Module]:
    """Every prunable linear of the model by its full module path."""
    return (spec or loaded.spec).named_linears(loaded.model)


def layer_sparsity(loaded: LoadedModel, spec: ArchSpec | None = None) -> dict[str, float]:
    """Achieved sparsity per linear; weights not in memory (a streamed model) are measured as they are written."""
    return {name: sparsity_of(weight_matrix(m)) for name, m in prunable_linears(loaded, spec).items()
            if not weight_matrix(m).is_meta}


def check_prune(loaded: LoadedModel | None, config: PruneConfig, calib: CalibConfig | None = None):
    """Every value of a prune request checked against the model's shapes; returns the built method.

    Needs only shapes, so the CLI, recipes and ``prune_streamed`` run it on a weightless (meta)
    skeleton before any weight is read or any output folder is made. With ``loaded`` None (a recipe
    stage whose input an earlier stage has yet to write) every check that needs no shapes still runs.
    """
    schedule = config.sparsity if isinstance(config.sparsity, (list, tuple)) else [config.sparsity]
    n_blocks = loaded.spec.num_layers(loaded.model.config) if loaded is not None else len(schedule)
    cls = method_class(config.method)
    config.check(calib)
    method = cls(SparsityTarget.build(config.sparsity, config.pattern, n_blocks), build_options(cls.Options, config.options))
    spec = prune_spec(loaded.spec, config) if loaded is not None else None
    for name, module in prunable_linears(loaded, spec).items() if loaded is not None else ():
        method.target.pattern.check_fits(weight_matrix(module).shape[1], name)
    if cls.needs_calibration and calib is None:
        raise UsageError(f"method {config.method} needs calibration data: pass --calib (e.g. wikitext2 or self)")
    if spec is not None and spec.moe is not None and cls.statistics and calib is not None:
        moe = config.moe_options()
        n_experts, top_k = spec.expert_counts(loaded.model.config)
        check_calibration_covers_experts(calib.n_samples * calib.seq_len, n_experts, top_k, moe)
    if config.allocation == "owl":
        build_options(OwlOptions, config.allocation_options)
        if calib is None:
            raise UsageError("--allocation owl measures outliers on calibration data: pass --calib")
    if calib is not None:
        calib.validate()
    return method


def prune(
    loaded: LoadedModel,
    config: PruneConfig,
    calib: CalibConfig | None = None,
    engine: EngineOptions | None = None,
    hooks: EngineHooks | None = None,
) -> PruneReport:
    """Prune ``loaded.model`` in place with an unstructured / N:M method, block by block; ``hooks``
    when streamed or split over processes (every block pass goes through them)."""
    engine = engine or EngineOptions()
    device = engine.torch_device()
    method = check_prune(loaded, config, calib)
    cls = type(method)
    spec = prune_spec(loaded.spec, config)
    reconstruct = config.check(calib)
    if reconstruct is not None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise UsageError("--reconstruct runs in one process (its optimiser steps are not shared between ranks); drop --nproc")
        method.reconstruction = BlockReconstruction(reconstruct)
    if config.permute:
        method.permutation = ChannelPermutation(spec, method.target.pattern)
        method.splits_by_linear = False  # the permutation spans the MLP's linears: one rank does the block
    moe = config.moe_options() if spec.moe is not None else None
    if moe is not None and cls.statistics:
        method.expert_fallback = ExpertFallback(moe)
        if moe.fallback == "pooled":
            method.splits_by_linear = False  # pooling reads every expert of the block: one rank does it
    owl = config.allocation == "owl"
    atp = config.allocation == "atp"
    owl_options = build_options(OwlOptions, config.allocation_options) if owl else None
    if owl and calib is None:
        raise UsageError("--allocation owl measures outliers on calibration data: pass --calib")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    ids = None
    if calib is not None and (cls.needs_calibration or cls.statistics or owl or atp or reconstruct is not None):
        ids = calibration_ids(calib, loaded.tokenizer, loaded.model)
    if owl:
        method.target = owl_target(loaded.model, spec, method.target, ids, engine, owl_options, hooks, moe)
    search = {}
    if atp:
        options = build_options(AtpOptions, config.allocation_options)
        method.target, search = atp_target(loaded.model, spec, method.target, ids, engine, options, hooks, moe)
    times = run_blocks(loaded.model, spec, method, ids, engine, f"{config.method} blocks", hooks)
    steps, outcomes, notes = {}, {}, []
    if method.reconstruction is not None:
        steps["reconstruct"] = method.reconstruction.errors
        outcomes = {i: o.to_record() for i, o in method.reconstruction.outcomes.items()}
        notes += [note for note in [method.reconstruction.summary()] if note]
    if method.permutation is not None:
        steps["permute"] = method.permutation.kept
    fallback = method.expert_fallback
    if isinstance(fallback, ExpertFallback):
        notes += [note for note in [fallback.note()] if note]
    return PruneReport(
        config=config,
        target=method.target,
        calibration=calib if ids is not None else None,
        per_layer=layer_sparsity(loaded, spec),
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
        device=str(device),
        steps=steps,
        reconstruction=outcomes,
        allocation_search=search,
        stage_seconds=times.stages,
        notes=notes,
        moe=moe,
        expert_fallback=fallback.fallen if isinstance(fallback, ExpertFallback) else None,
    )


def prune_streamed(
    source: str | Path,
    out: str | Path,
    config: PruneConfig,
    calib: CalibConfig | None = None,
    engine: EngineOptions | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    group: RankGroup | None = None,
    hooks: EngineHooks | None = None,
) -> tuple[PruneReport, Path | None]:
    """``prune`` + ``save`` for a model folder that need not fit in memory: blocks are read from its
    safetensors shards one at a time and written to OUT's shards as they finish (engine/stream.py).

    A rerun with the same arguments resumes after the last finished block. ``hooks`` (e.g. a
    multi-process :class:`~secateurs.engine.distributed.DistributedHooks`) keeps its role under the
    streaming session's; only rank 0 writes and gets the path back.
    """
    engine = engine or EngineOptions()
    if calib is not None and calib.source == "self":
        raise UsageError("--calib self generates text with the whole model; pass a dataset with --stream")
    request = {"config": asdict(config), "calibration": asdict(calib) if calib else None}
    session = StreamSession(source, out, dtype, request, overwrite, group, hooks)
    check_prune(session.loaded, config, calib)  # before .OUT.partial exists: a bad request leaves nothing
    session.spec = prune_spec(session.spec, config)  # its per-linear sparsity covers what the prune covers
    session.open()
    report = prune(session.loaded, config, calib, engine, session)
    report.per_layer = dict(session.per_layer)
    record = build_record(session.loaded.source, previous_stages(session.folder) + [report.stage_record()])
    return report, session.finish(record)
