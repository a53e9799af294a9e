"""The expert-pruning verb: score every routed expert on calibration tokens, keep the best per layer.

``prune_experts(loaded, ExpertConfig("reap", keep=0.5), calib)`` edits ``loaded.model`` in place and
returns an :class:`ExpertReport` whose ``stage_record()`` goes into ``secateurs.json``.

Scores (per expert, over the calibration tokens the router sends it, with routing weight ``g`` and
expert output ``f(x)``): ``reap`` (router-weighted expert activation pruning) the mean of
``g · ‖f(x)‖``; ``frequency`` how many tokens were routed to it; ``ean`` (expert activation norm) the
sum of ``‖f(x)‖``. An expert no calibration token reached scores 0 on every criterion (it goes
first) and is listed in the report as unrouted; a calibration too short to reach every expert even
if spread evenly is refused before anything loads. The engine runs the model block by block
(:func:`~secateurs.engine.sequential.run_blocks`, observe-only) while a hook on each MoE block's
experts module reads the routing (token → top-k experts and weights) the router just computed.

``mode="uniform"`` keeps the same count in every layer (a folder plain ``transformers`` loads);
``"global"`` spreads the same total by score over the layers (each layer's scores divided by its
mean, so layers with larger activations do not take the whole budget; at least top-k per layer),
and the folder records each layer's shapes for the package's own per-layer class
(:mod:`secateurs.model.per_layer`). Group-limited routing (DeepSeek's ``n_group`` > 1) keeps the
same count in every group, so the groups stay contiguous and the router's group scores unchanged
for the kept experts. ``merge`` folds each removed expert into its most similar kept one
(:func:`~secateurs.model.experts.fold_experts`) instead of dropping it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.calib import CalibConfig, calibration_ids
from ..engine.sequential import BlockMethod, EngineHooks, EngineOptions, Stats, run_blocks
from ..engine.stream import StreamSession
from ..errors import UsageError
from ..model.arch import ArchSpec, moe_model_types
from ..model.experts import (
    DOWN,
    GATE_UP,
    ExpertLinear,
    check_routed_coverage,
    expert_intermediate,
    fold_experts,
    keep_experts,
    routing,
)
from ..model.load import LoadedModel
from ..model.per_layer import record_shapes
from ..model.save import previous_stages
from ..record import ExpertsStage, build_record, peak_memory_mb
from .config import ExpertConfig


@dataclass(frozen=True)
class RoutingShape:
    """What an MoE model's router allows expert removal to leave: routed experts per layer, top-k,
    and under group-limited routing the groups, the groups picked, and what a group's score reads."""

    n_experts: int
    top_k: int
    groups: int = 1
    top_groups: int = 1
    group_min: int = 1

    def kept(self, config: ExpertConfig) -> int:
        """Experts each layer keeps under ``config`` (one line when the router could not work with it)."""
        return config.kept_count(self.n_experts, self.top_k, self.groups, self.top_groups, self.group_min)

    def check_calibration(self, n_tokens: int) -> None:
        """One line when ``n_tokens`` calibration tokens cannot reach every expert even if spread evenly."""
        check_routed_coverage(n_tokens, self.n_experts, self.top_k, 1,
                              "some experts would certainly score 0 unseen and be removed first",
                              "more --n-samples / --seq-len")


def moe_shape(spec: ArchSpec, config) -> RoutingShape:
    """The routing of an MoE model; one line for a dense model."""
    if spec.moe is None:
        raise UsageError(
            f"{spec.name} is a dense model: expert pruning needs a mixture-of-experts model "
            f"({', '.join(moe_model_types())})"
        )
    n_experts, top_k = spec.expert_counts(config)
    text = spec.text_config(config)
    groups = int(getattr(text, spec.moe.group_key, 1) or 1) if spec.moe.group_key else 1
    if groups > 1:
        return RoutingShape(n_experts, top_k, groups, int(getattr(text, spec.moe.group_top_key, 1) or 1), spec.moe.group_min)
    return RoutingShape(n_experts, top_k)


class ExpertScorer(BlockMethod):
    """Observe-only: per MoE block, each expert's routed-token count, Σ g·‖f(x)‖ and Σ ‖f(x)‖."""

    needs_calibration = True
    modifies_weights = False

    def __init__(self, spec: ArchSpec, model: nn.Module) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        self.weighted: dict[int, torch.Tensor] = {}
        self.norms: dict[int, torch.Tensor] = {}
        self._handles = []
        for index, block in enumerate(spec.blocks_of(model)):
            experts = spec.experts_of(block)
            if experts is not None:
                count = getattr(experts, GATE_UP).shape[0]
                for sums in (self.counts, self.weighted, self.norms):
                    sums[index] = torch.zeros(count, dtype=torch.float64)
                hook = functools.partial(self._routed, index, spec.moe.transposed)
                self._handles.append(experts.register_forward_hook(hook, with_kwargs=True))

    def _routed(self, index: int, transposed: bool, experts: nn.Module, args: tuple, kwargs: dict, _out) -> None:
        hidden, top_k, weights = routing(args, kwargs)
        for e in top_k.unique().tolist():
            tokens, slot = (top_k == e).nonzero(as_tuple=True)
            x = hidden[tokens]
            inner = expert_intermediate(experts, ExpertLinear(experts, GATE_UP, e, transposed)(x))
            norm = ExpertLinear(experts, DOWN, e, transposed)(inner).float().norm(dim=-1)
            self.counts[index][e] += len(tokens)
            self.weighted[index][e] += (weights[tokens, slot].float() * norm).sum().item()
            self.norms[index][e] += norm.sum().item()

    def process_block(self, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats) -> None:
        """Scores are gathered by the routing hooks; nothing is decided block by block."""

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    def scores(self, method: str) -> dict[int, torch.Tensor]:
        """Each MoE block's expert scores (higher: keep); an unrouted expert scores 0."""
        if method == "frequency":
            return dict(self.counts)
        if method == "ean":
            return dict(self.norms)
        return {i: self.weighted[i] / self.counts[i].clamp(min=1) for i in self.counts}


def choose_experts(scores: dict[int, torch.Tensor], shape: RoutingShape, config: ExpertConfig) -> dict[int, torch.Tensor]:
    """The experts each MoE layer keeps (ascending indices), the highest-scoring first (ties: the lower index)."""
    n_keep = shape.kept(config)
    if config.mode == "global":
        return _spread_by_score(scores, n_keep * len(scores), shape.top_k)
    size = shape.n_experts // shape.groups
    chosen = {}
    for index, values in scores.items():
        parts = []
        for start in range(0, shape.n_experts, size):  # each routing group keeps its own best
            order = torch.sort(values[start:start + size], descending=True, stable=True).indices
            parts.append(order[: n_keep // shape.groups] + start)
        chosen[index] = torch.cat(parts).sort().values
    return chosen


def _spread_by_score(scores: dict[int, torch.Tensor], total: int, top_k: int) -> dict[int, torch.Tensor]:
    """``total`` experts over the layers: each layer's top-k first, then the rest by score divided by
    its layer's mean (so one layer's larger activations do not take the whole budget)."""
    chosen: dict[int, list[int]] = {}
    candidates = []
    for index, values in scores.items():
        order = torch.sort(values, descending=True, stable=True).indices.tolist()
        chosen[index] = order[:top_k]
        mean = float(values.mean())
        relative = values / mean if mean > 0 else values
        candidates += [(-float(relative[e]), index, e) for e in order[top_k:]]
    for _, index, e in sorted(candidates)[: total - top_k * len(scores)]:
        chosen[index].append(e)
    return {index: torch.tensor(sorted(kept)) for index, kept in chosen.items()}


@dataclass
class ExpertReport:
    """What expert pruning did: experts per layer before/after (after: the most any layer kept),
    kept indices, scores, unrouted experts, and with ``merge`` the experts folded into each kept one."""

    config: ExpertConfig
    calibration: CalibConfig
    n_experts_before: int
    n_experts_after: int
    kept: dict[int, list[int]]
    scores: dict[int, list[float]]
    unrouted: dict[int, list[int]]
    seconds: dict[str, float]
    peak_memory_mb: float
    device: str
    merged: dict[int, dict[int, list[int]]] = field(default_factory=dict)

    def stage_record(self) -> ExpertsStage:
        return ExpertsStage(
            method=self.config.method,
            keep=self.config.keep,
            mode=self.config.mode,
            merge=self.config.merge,
            experts_before=self.n_experts_before,
            experts_after=self.n_experts_after,
            kept_experts={str(k): v for k, v in self.kept.items()},
            merged={str(i): {str(k): v for k, v in folded.items()} for i, folded in self.merged.items()}
            if self.config.merge else None,
            scores={str(k): [round(s, 6) for s in v] for k, v in self.scores.items()},
            unrouted_experts={str(k): v for k, v in self.unrouted.items() if v},
            calibration=asdict(self.calibration),
            seed=self.calibration.seed,
            seconds={k: round(v, 3) for k, v in self.seconds.items()},
            peak_memory_mb=round(self.peak_memory_mb, 1),
            device=self.device,
        )


def prune_experts(
    loaded: LoadedModel,
    config: ExpertConfig,
    calib: CalibConfig,
    engine: EngineOptions | None = None,
    calib_ids: torch.Tensor | None = None,
    session: StreamSession | None = None,
) -> ExpertReport:
    """Remove the lowest-scoring routed experts of every MoE layer of ``loaded.model``, in place.

    ``config.mode`` "uniform": every MoE layer keeps ``config.keep`` of its experts (at least the
    router's top-k), so the config's one expert count holds and plain ``transformers`` reloads the
    folder; "global": the same total spread by score, the config holding the largest count and each
    layer's shapes (:func:`~secateurs.model.per_layer.record_shapes`). ``calib_ids`` lets a caller
    pass already tokenized windows; otherwise they are built from ``calib``. ``session``: a streamed
    model (:func:`experts_streamed`): the blocks are scored as they are read, then read once more,
    cut and written, so the choice is the in-memory one.
    """
    engine = engine or EngineOptions()
    config.validate()
    model, spec = loaded.model, loaded.spec
    shape = moe_shape(spec, model.config)
    shape.kept(config)
    if calib_ids is None:
        shape.check_calibration(calib.n_samples * calib.seq_len)
    device = engine.torch_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ids = calib_ids if calib_ids is not None else calibration_ids(calib, loaded.tokenizer, model)
    shape.check_calibration(ids.numel())
    start = time.perf_counter()
    scorer = ExpertScorer(spec, model)
    try:
        run_blocks(model, spec, scorer, ids, engine, "scoring experts", session or EngineHooks())
    finally:
        scorer.remove_hooks()
    seconds = {"score": time.perf_counter() - start}
    scores = scorer.scores(config.method)
    chosen = choose_experts(scores, shape, config)
    merged: dict[int, dict[int, list[int]]] = {}

    def cut(index: int, block: nn.Module) -> None:
        if index in chosen:
            experts = spec.experts_of(block)
            if config.merge:
                merged[index] = fold_experts(experts, chosen[index], scorer.counts[index])
            keep_experts(experts, spec.router_of(block), chosen[index])

    if session is None:
        for index, block in enumerate(spec.blocks_of(model)):
            cut(index, block)
    else:
        session.copy_unchanged(cut)
    n_after = max(len(kept) for kept in chosen.values())
    setattr(spec.text_config(model.config), spec.moe.experts_key, n_after)
    record_shapes(model)  # per-layer counts (--mode global) need the package's class; uniform ones clear it
    seconds["total"] = time.perf_counter() - start
    unrouted = {i: (scorer.counts[i] == 0).nonzero().flatten().tolist() for i in scorer.counts}
    return ExpertReport(
        config, calib, shape.n_experts, n_after, {i: v.tolist() for i, v in chosen.items()},
        {i: v.tolist() for i, v in scores.items()}, unrouted, seconds, peak_memory_mb(device), str(device), merged,
    )


def experts_streamed(
    source: str | Path,
    out: str | Path,
    config: ExpertConfig,
    calib: CalibConfig,
    engine: EngineOptions | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> tuple[ExpertReport, Path]:
    """``prune_experts`` + ``save`` for a model folder that need not fit in memory: one streamed pass
    scores every block (:mod:`secateurs.engine.stream`), a second reads each block again, cuts its
    experts and writes it. A rerun with the same arguments resumes the second pass."""
    if calib.source == "self":
        raise UsageError("--calib self generates text with the whole model; pass a dataset with --stream")
    request = {"experts": asdict(config), "calibration": asdict(calib)}
    session = StreamSession(source, out, dtype, request, overwrite)
    shape = moe_shape(session.spec, session.loaded.model.config)  # before .OUT.partial exists
    shape.kept(config)
    shape.check_calibration(calib.n_samples * calib.seq_len)
    session.open()
    report = prune_experts(session.loaded, config, calib, engine, session=session)
    record = build_record(session.loaded.source, previous_stages(session.folder) + [report.stage_record()])
    path = session.finish(record)
    assert path is not None  # one process: it writes
    return report, path
