"""What goes into ``secateurs.json``: the stages run, with which data and seed, and the results,
and the typed form of each stage entry that both its writer and ``secateurs report`` agree on."""

from __future__ import annotations

import platform
import resource
import sys
from dataclasses import Field, dataclass, field, fields, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar

import torch


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("secateurs", "torch", "transformers", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def build_record(source: str, stages: list[StageRecord | dict], results: dict | None = None) -> dict:
    """The whole ``secateurs.json``: ``stages`` are this run's records and, as dicts read back
    verbatim, those of the runs its input came from."""
    return {
        "tool": "secateurs",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": source,
        "versions": versions(),
        "stages": [stage.to_dict() if isinstance(stage, StageRecord) else stage for stage in stages],
        "results": results or {},
    }


def run_record(label: str, source: str, stages: list[StageRecord | dict], perplexity: dict[str, float] | None = None,
               results: dict | None = None) -> dict:
    """One benchmark variant as a run ``secateurs report`` renders: the stages it ran, its perplexity
    per dataset, and any other results in the ``secateurs.json`` schema, under a row label."""
    measured = {f"ppl_{name}": {"ppl": value} for name, value in (perplexity or {}).items()}
    return {**build_record(source, stages, {**measured, **(results or {})}), "label": label}


@dataclass
class Effect:
    """What the stages so far did to the model, in terms comparable across kinds of pruning.

    ``kind`` is the x axis a report plots the run on ("sparsity", "layers removed", "width
    removed"); ``profile`` holds per-block curves (name → block index → value) for the layer plot.
    """

    kind: str
    method: str
    removed: float
    profile: dict[str, dict[int, float]] = field(default_factory=dict)
    params_after: int | None = None
    removed_layers: list[int] = field(default_factory=list)
    # What a reader must know to trust the numbers (an MoE prune's experts pruned by the fallback rule).
    notes: list[str] = field(default_factory=list)


def _per_block(per_linear: dict[str, float]) -> dict[int, float]:
    """Mean value per block index from ``{"model.layers.3.mlp.up_proj": s, ...}``."""
    sums: dict[int, list[float]] = {}
    for name, value in per_linear.items():
        index = next((int(part) for part in name.split(".") if part.isdigit()), None)
        if index is not None:
            sums.setdefault(index, []).append(value)
    return {i: sum(v) / len(v) for i, v in sorted(sums.items())}


def _after(before: Effect | None, profile: dict[str, dict[int, float]] | None = None, **changes: Any) -> Effect:
    """``before`` with ``changes`` applied: a stage sets what it changed and keeps the rest (earlier
    per-block curves stay beside a new one, e.g. layer importance beside later sparsity)."""
    start = before or Effect("dense", "dense", 0.0)
    notes = start.notes + changes.pop("notes", [])
    return replace(start, profile={**start.profile, **(profile or {})}, notes=notes, **changes)


def _fraction_removed(before: int | None, after: int | None) -> float:
    """1 - after/before, or 0 when either count is missing."""
    return 1.0 - float(after) / float(before) if before and after is not None else 0.0


def optional() -> Any:
    """A field its writer puts only when it has a value: :meth:`StageRecord.to_dict` leaves it out
    when None (LoRA's record has no ``params``, an export by the benchmark's swap no ``layout``)."""
    return field(default=None, metadata={"optional": True})


def key_of(item: Field) -> str:
    """The ``secateurs.json`` key of a record field (its name, unless the key is a Python keyword)."""
    return item.metadata.get("key", item.name)


@dataclass
class StageRecord:
    """One ``stages`` entry of ``secateurs.json``: every key its writer puts, in the order written.

    Writers (each verb's ``stage_record()``) build the subclass of their kind; :meth:`to_dict` is
    the JSON entry. :func:`parse_stage` reads entries back leniently, so records from older versions
    still open; ``effect`` says what the stage did, given what came before it.
    """

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"stage": self.kind}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None or not item.metadata.get("optional"):
                record[key_of(item)] = value
        return record

    def effect(self, before: Effect | None) -> Effect | None:
        return before


RECONSTRUCTION_PROFILE = "reconstruction: held-out block error kept ÷ method's"


def _kept_ratios(outcomes: Any) -> dict[int, float]:
    """Block index → held-out error kept ÷ the method's own (1.0: reconstruction skipped there);
    entries that are not well-formed are left out."""
    ratios = {}
    for index, outcome in (outcomes.items() if isinstance(outcomes, dict) else ()):
        try:
            ratios[int(index)] = float(outcome["kept"]) / float(outcome["start"])
        except (TypeError, ValueError, KeyError, ZeroDivisionError):
            continue
    return dict(sorted(ratios.items()))


@dataclass
class PruneStage(StageRecord):
    kind: ClassVar[str] = "prune"
    method: str = "?"
    pattern: str = "unstructured"
    sparsity: list[float] | None = None  # target per block
    options: dict[str, Any] | None = None
    allocation: str | None = None
    allocation_options: dict[str, Any] | None = None
    reconstruct: dict[str, Any] | None = None
    permute: bool | None = None
    allocation_search: dict[str, float] | None = None  # spread tried → its score
    block_steps: dict[str, Any] | None = None
    # Per block (str index): sparsity/reconstruct.BlockOutcome.to_record(); empty without --reconstruct.
    reconstruction: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    seed: int | None = None
    achieved_sparsity: dict[str, Any] = field(default_factory=dict)
    # An MoE model's: its --moe options, and per block (str index) the routed-expert matrices pruned
    # by the fallback rule because the router sent them too few calibration tokens.
    moe: dict[str, Any] | None = optional()
    expert_fallback: dict[str, list[str]] | None = optional()
    seconds: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None

    def effect(self, before: Effect | None) -> Effect:
        method = self.method + ("" if self.pattern == "unstructured" else f" {self.pattern}")
        profile = {"sparsity": _per_block(self.achieved_sparsity.get("per_layer", {}))}
        kept = _kept_ratios(self.reconstruction)
        if kept:
            profile[RECONSTRUCTION_PROFILE] = dict(sorted(kept.items()))
        notes = []
        if self.expert_fallback:
            rule = (self.moe or {}).get("fallback", "magnitude")
            listed = "; ".join(f"block {b}: {', '.join(names)}" for b, names in self.expert_fallback.items())
            notes.append(f"{method}: expert matrices with fewer than {(self.moe or {}).get('min_tokens', '?')} "
                         f"calibration tokens pruned by the {rule} fallback ({listed})")
        return _after(before, profile, kind="sparsity", method=method,
                      removed=float(self.achieved_sparsity.get("mean", 0.0)), notes=notes)


@dataclass
class LayersStage(StageRecord):
    """A depth prune (``secateurs layers``); a removal of given layers (``drop_layers_streamed``)
    writes only the method, the layers, their counts and the compensation (none)."""

    kind: ClassVar[str] = "layers"
    method: str = "?"
    options: dict[str, Any] | None = optional()
    removed_layers: list[int] = field(default_factory=list)
    removal_order: list[int] | None = optional()
    layers_before: int = 1
    layers_after: int | None = None
    scores: list[dict[str, float]] | None = optional()
    passes: dict[str, int] | None = optional()
    compensation: dict[str, Any] | None = None  # written as null without --compensate
    calibration: dict[str, Any] | None = optional()
    seed: int | None = optional()
    seconds: dict[str, float] | None = optional()
    peak_memory_mb: float | None = optional()
    device: str | None = optional()

    def effect(self, before: Effect | None) -> Effect:
        profile = {"importance": {int(k): float(v) for k, v in self.scores[0].items()}} if self.scores else {}
        return _after(before, profile, kind="layers removed", method=self.method,
                      removed=len(self.removed_layers) / max(self.layers_before, 1), removed_layers=list(self.removed_layers))


@dataclass
class WidthStage(StageRecord):
    kind: ClassVar[str] = "width"
    method: str = "?"
    config: dict[str, Any] | None = None
    importance: str | None = None
    calibration: dict[str, Any] | None = None
    seed: int | None = None
    achieved: dict[str, Any] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    widths: list[Any] = field(default_factory=list)
    per_layer_config: bool | None = None
    seconds: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None

    def effect(self, before: Effect | None) -> Effect:
        profile = ({"width (groups kept)": {i: float(sum(w.values())) for i, w in enumerate(self.widths)}}
                   if self.widths and isinstance(self.widths[0], dict) else {})
        return _after(before, profile, kind="width removed", method=self.method,
                      removed=float(self.achieved.get("param_reduction", 0.0)),
                      params_after=self.params.get("after", before.params_after if before else None))


@dataclass
class ShearStage(StageRecord):
    kind: ClassVar[str] = "shear"
    method: str = "llm-shearing"
    config: dict[str, Any] | None = None
    source_shape: dict[str, int] | None = None
    target_shape: dict[str, int] | None = None
    kept: dict[str, Any] | None = None
    params_before: int | None = None
    params_after: int | None = None
    reference_loss: float | None = None
    prune: dict[str, Any] | None = None
    continued: dict[str, Any] | None = field(default=None, metadata={"key": "continue"})
    tokens: int | None = None
    seconds: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None

    def effect(self, before: Effect | None) -> Effect:
        return _after(before, kind="width removed", method=self.method,
                      removed=_fraction_removed(self.params_before, self.params_after),
                      params_after=self.params_after if self.params_after is not None else before and before.params_after)


@dataclass
class IterativeStage(StageRecord):
    kind: ClassVar[str] = "prune_iterative"
    method: str = "?"
    rounds: list[dict[str, Any]] | None = None
    achieved_sparsity: float = 0.0
    recovery_tokens: int | None = None
    seconds: float | None = None

    def effect(self, before: Effect | None) -> Effect:
        return _after(before, kind="sparsity", method=f"{self.method} iterative", removed=float(self.achieved_sparsity))


@dataclass
class RecoverStage(StageRecord):
    """LoRA keeps the earlier stage's effect (the method gains a suffix); LoRAPrune prunes as it tunes."""

    kind: ClassVar[str] = "recover"
    method: str = "lora"
    config: dict[str, Any] | None = None
    seed: int | None = None
    steps: int | None = None
    resumed_from: int | None = None
    tokens: int | None = None
    precision: str | None = None
    loss: dict[str, Any] | None = None
    masked_linears: int | None = None
    sparsity: dict[str, float] = field(default_factory=dict)
    zeros_kept: bool | None = None
    # LoRAPrune's: its config, the layers it pruned, the groups removed (structured) and parameters.
    loraprune: dict[str, Any] | None = optional()
    pruned_layers: list[int] | None = optional()
    # With distillation: the teacher and the LM loss beside the objective; with a held-out set, its curve.
    teacher: str | None = optional()
    lm_loss: dict[str, Any] | None = optional()
    held_out: list[list[float]] | None = optional()
    groups_removed: dict[str, int] | None = optional()
    params: dict[str, int] | None = optional()
    seconds: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None

    def effect(self, before: Effect | None) -> Effect | None:
        if self.method != "loraprune":
            return None if before is None else _after(before, method=f"{before.method} + {self.method}")
        if (self.loraprune or {}).get("target") == "unstructured":
            return _after(before, kind="sparsity", method="loraprune", removed=float(self.sparsity.get("after", 0.0)))
        params = self.params or {}
        after = params.get("after")
        return _after(before, kind="width removed", method="loraprune",
                      removed=_fraction_removed(params.get("before"), after),
                      params_after=after if after is not None else before and before.params_after)


@dataclass
class ExpertsStage(StageRecord):
    """Routed experts removed from every MoE layer (``secateurs experts``): the fraction removed is of
    routed experts over all MoE layers, and the profile is the experts each layer kept."""

    kind: ClassVar[str] = "experts"
    method: str = "?"
    keep: float | None = None  # the share of each layer's routed experts asked to be kept
    mode: str | None = optional()  # uniform (same count per layer) or global (spread by score)
    merge: bool | None = optional()
    experts_before: int = 1
    experts_after: int = 1  # the most any layer kept (the config's count)
    kept_experts: dict[str, list[int]] = field(default_factory=dict)
    merged: dict[str, dict[str, list[int]]] | None = optional()  # block → kept expert → experts folded in
    scores: dict[str, list[float]] | None = None
    unrouted_experts: dict[str, list[int]] | None = None
    calibration: dict[str, Any] | None = None
    seed: int | None = None
    seconds: dict[str, float] | None = None
    peak_memory_mb: float | None = None
    device: str | None = None

    def effect(self, before: Effect | None) -> Effect:
        profile = {"experts kept": {int(k): float(len(v)) for k, v in self.kept_experts.items()}}
        notes = [f"{self.method}: experts no calibration token reached scored 0 ("
                 + "; ".join(f"block {b}: {', '.join(map(str, e))}" for b, e in self.unrouted_experts.items()) + ")"
                 ] if self.unrouted_experts else []
        kept = sum(len(v) for v in self.kept_experts.values())
        removed = (_fraction_removed(self.experts_before * len(self.kept_experts), kept) if self.kept_experts
                   else _fraction_removed(self.experts_before, self.experts_after))
        return _after(before, profile, kind="experts removed", method=self.method + (" merge" if self.merge else ""),
                      removed=removed, notes=notes)


@dataclass
class ExportStage(StageRecord):
    """Storage format only (``secateurs export``, ``bench``): changes nothing a report shows."""

    kind: ClassVar[str] = "export"
    format: str = "sparse"
    layers: dict[str, Any] | None = None  # swapped linear → its kernel format, shape, why
    kept_dense: dict[str, str] | None = None  # linear left dense → why
    weight_bytes: dict[str, int] | None = None  # dense and compressed
    # The compressed-tensors layout and storage (export_sparse); the benchmark's swap writes neither.
    layout: str | None = optional()
    storage: str | None = optional()


STAGE_KINDS: dict[str, type[StageRecord]] = {
    cls.kind: cls for cls in (PruneStage, LayersStage, WidthStage, ShearStage, IterativeStage, RecoverStage, ExpertsStage,
                               ExportStage)
}


def parse_stage(data: dict) -> StageRecord | None:
    """The typed record of one ``stages`` entry, or None for a kind this version does not know;
    a missing field takes its default, so records from older versions still open."""
    cls = STAGE_KINDS.get(str(data.get("stage", "")))
    if cls is None:
        return None
    return cls(**{f.name: data[key_of(f)] for f in fields(cls) if data.get(key_of(f)) is not None})
