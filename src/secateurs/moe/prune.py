"""The expert-pruning verb: score every routed expert on calibration tokens, keep the best per layer.

``prune_experts(loaded, ExpertConfig("reap", keep=0.5), calib)`` edits ``loaded.model`` in place and
returns an :class:`ExpertReport` whose ``stage_record()`` goes into ``secateurs.json``.

Scores (per expert, over the calibration tokens the router sends it, with routing weight ``g`` and
expert output ``f(x)``): ``reap`` (router-weighted expert activation pruning) the mean of
``g · ‖f(x)‖``; ``frequency`` how many tokens were routed to it; ``ean`` (expert activation norm) the
sum of ``‖f(x)‖``. An expert no calibration token reached scores 0 on every criterion (it goes
first) and is listed in the report as unrouted. The engine runs the model block by block
(:func:`~secateurs.engine.sequential.run_blocks`, observe-only) while a hook on each MoE block's
experts module reads the routing (token → top-k experts and weights) the router just computed.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..data.calib import CalibConfig, calibration_ids
from ..engine.sequential import BlockMethod, EngineOptions, Stats, run_blocks
from ..errors import UsageError
from ..model.arch import ArchSpec, moe_model_types
from ..model.experts import DOWN, GATE_UP, ExpertLinear, expert_intermediate, keep_experts
from ..model.load import LoadedModel
from ..record import ExpertsStage, peak_memory_mb
from .config import ExpertConfig


def moe_shape(spec: ArchSpec, config) -> tuple[int, int]:
    """(routed experts per layer, router top-k) of an MoE model; one line for anything we cannot prune."""
    if spec.moe is None:
        raise UsageError(
            f"{spec.name} is a dense model: expert pruning needs a mixture-of-experts model "
            f"({', '.join(moe_model_types())})"
        )
    text = spec.text_config(config)
    groups = getattr(text, spec.moe.group_key, None) if spec.moe.group_key else None
    if groups and groups > 1:
        raise UsageError(
            f"{spec.name} routes within {groups} expert groups (n_group); removing experts would reshuffle "
            "the groups, so expert pruning supports n_group 1 only"
        )
    return int(getattr(text, spec.moe.experts_key)), int(getattr(text, spec.moe.top_k_key))


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
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
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


@dataclass
class ExpertReport:
    """What expert pruning did: experts per layer before/after, kept indices, scores, unrouted experts."""

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

    def stage_record(self) -> ExpertsStage:
        return ExpertsStage(
            method=self.config.method,
            keep=self.config.keep,
            experts_before=self.n_experts_before,
            experts_after=self.n_experts_after,
            kept_experts={str(k): v for k, v in self.kept.items()},
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
) -> ExpertReport:
    """Remove the lowest-scoring routed experts of every MoE layer of ``loaded.model``, in place.

    Every MoE layer keeps the same number of experts (``config.keep`` of them, at least the router's
    top-k), so the config's one expert count holds and plain ``transformers`` reloads the folder.
    ``calib_ids`` lets a caller pass already tokenized windows; otherwise they are built from ``calib``.
    """
    engine = engine or EngineOptions()
    config.validate()
    model, spec = loaded.model, loaded.spec
    n_experts, top_k = moe_shape(spec, model.config)
    n_keep = config.kept_count(n_experts, top_k)
    device = engine.torch_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ids = calib_ids if calib_ids is not None else calibration_ids(calib, loaded.tokenizer, model)
    start = time.perf_counter()
    scorer = ExpertScorer(spec, model)
    try:
        run_blocks(model, spec, scorer, ids, engine, description="scoring experts")
    finally:
        scorer.remove_hooks()
    seconds = {"score": time.perf_counter() - start}
    scores = scorer.scores(config.method)
    kept: dict[int, list[int]] = {}
    blocks = spec.blocks_of(model)
    for index, values in scores.items():
        order = torch.sort(values, descending=True, stable=True).indices
        chosen = order[:n_keep].sort().values
        keep_experts(spec.experts_of(blocks[index]), spec.router_of(blocks[index]), chosen)
        kept[index] = chosen.tolist()
    setattr(spec.text_config(model.config), spec.moe.experts_key, n_keep)
    seconds["total"] = time.perf_counter() - start
    unrouted = {i: (scorer.counts[i] == 0).nonzero().flatten().tolist() for i in scorer.counts}
    return ExpertReport(
        config, calib, n_experts, n_keep, kept, {i: v.tolist() for i, v in scores.items()}, unrouted, seconds,
        peak_memory_mb(device), str(device),
    )
