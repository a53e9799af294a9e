"""What goes into ``secateurs.json``: the stages run, with which data and seed, and the results,
and the typed form of each stage entry that both its writer and ``secateurs report`` agree on."""

from __future__ import annotations

import platform
import resource
import sys
from dataclasses import dataclass, field, fields, replace
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


def build_record(source: str, stages: list[dict], results: dict | None = None) -> dict:
    return {
        "tool": "secateurs",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": source,
        "versions": versions(),
        "stages": stages,
        "results": results or {},
    }


def run_record(label: str, source: str, stages: list[dict], perplexity: dict[str, float] | None = None,
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
    return replace(start, profile={**start.profile, **(profile or {})}, **changes)


def _fraction_removed(before: int | None, after: int | None) -> float:
    """1 - after/before, or 0 when either count is missing."""
    return 1.0 - float(after) / float(before) if before and after is not None else 0.0


@dataclass
class StageRecord:
    """The fields of one ``stages`` entry of ``secateurs.json`` that are read back.

    Writers put at least these fields in their ``stage_record()`` (a test checks every writer
    against its class, strictly); :func:`parse_stage` reads them back leniently, so records from
    older versions still open. ``effect`` says what the stage did, given what came before it.
    """

    kind: ClassVar[str] = ""
    method: str = "?"

    @classmethod
    def written_fields(cls) -> list[str]:
        """The fields every writer of this kind must put in its record."""
        return [f.name for f in fields(cls)]

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
    pattern: str = "unstructured"
    achieved_sparsity: dict[str, Any] = field(default_factory=dict)
    # Per block (str index): sparsity/reconstruct.BlockOutcome.to_record(); empty without --reconstruct.
    reconstruction: dict[str, Any] = field(default_factory=dict)

    def effect(self, before: Effect | None) -> Effect:
        method = self.method + ("" if self.pattern == "unstructured" else f" {self.pattern}")
        profile = {"sparsity": _per_block(self.achieved_sparsity.get("per_layer", {}))}
        kept = _kept_ratios(self.reconstruction)
        if kept:
            profile[RECONSTRUCTION_PROFILE] = dict(sorted(kept.items()))
        return _after(before, profile, kind="sparsity", method=method,
                      removed=float(self.achieved_sparsity.get("mean", 0.0)))


@dataclass
class LayersStage(StageRecord):
    kind: ClassVar[str] = "layers"
    removed_layers: list[int] = field(default_factory=list)
    layers_before: int = 1
    scores: list[dict[str, float]] = field(default_factory=list)

    def effect(self, before: Effect | None) -> Effect:
        profile = {"importance": {int(k): float(v) for k, v in self.scores[0].items()}} if self.scores else {}
        return _after(before, profile, kind="layers removed", method=self.method,
                      removed=len(self.removed_layers) / max(self.layers_before, 1), removed_layers=list(self.removed_layers))


@dataclass
class WidthStage(StageRecord):
    kind: ClassVar[str] = "width"
    achieved: dict[str, Any] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    widths: list[Any] = field(default_factory=list)

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
    params_before: int | None = None
    params_after: int | None = None

    def effect(self, before: Effect | None) -> Effect:
        return _after(before, kind="width removed", method=self.method,
                      removed=_fraction_removed(self.params_before, self.params_after),
                      params_after=self.params_after if self.params_after is not None else before and before.params_after)


@dataclass
class IterativeStage(StageRecord):
    kind: ClassVar[str] = "prune_iterative"
    achieved_sparsity: float = 0.0

    def effect(self, before: Effect | None) -> Effect:
        return _after(before, kind="sparsity", method=f"{self.method} iterative", removed=float(self.achieved_sparsity))


@dataclass
class RecoverStage(StageRecord):
    """LoRA keeps the earlier stage's effect (the method gains a suffix); LoRAPrune prunes as it tunes."""

    kind: ClassVar[str] = "recover"
    method: str = "lora"
    sparsity: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] | None = None
    loraprune: dict[str, Any] | None = None

    @classmethod
    def written_fields(cls) -> list[str]:
        """``params`` and ``loraprune`` are written by LoRAPrune only."""
        return ["method", "sparsity"]

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
    """Routed experts removed from every MoE layer (``secateurs experts``): each layer keeps the same
    count, so the fraction removed is of experts, and the profile is the experts each layer kept."""

    kind: ClassVar[str] = "experts"
    experts_before: int = 1
    experts_after: int = 1
    kept_experts: dict[str, list[int]] = field(default_factory=dict)

    def effect(self, before: Effect | None) -> Effect:
        profile = {"experts kept": {int(k): float(len(v)) for k, v in self.kept_experts.items()}}
        return _after(before, profile, kind="experts removed", method=self.method,
                      removed=_fraction_removed(self.experts_before, self.experts_after))


@dataclass
class ExportStage(StageRecord):
    """Storage format only (``secateurs export``, ``bench``): changes nothing a report shows."""

    kind: ClassVar[str] = "export"
    format: str = "sparse"

    @classmethod
    def written_fields(cls) -> list[str]:
        return ["format"]


STAGE_KINDS: dict[str, type[StageRecord]] = {
    cls.kind: cls for cls in (PruneStage, LayersStage, WidthStage, ShearStage, IterativeStage, RecoverStage, ExpertsStage,
                               ExportStage)
}


def parse_stage(data: dict, strict: bool = False) -> StageRecord | None:
    """The typed record of one ``stages`` entry, or None for a kind this version does not know.

    Lenient by default (a missing field takes its default, so older records open); ``strict``
    raises ``ValueError`` naming the fields a writer left out.
    """
    cls = STAGE_KINDS.get(str(data.get("stage", "")))
    if cls is None:
        return None
    if strict:
        missing = [name for name in cls.written_fields() if name not in data]
        if missing:
            raise ValueError(f"{cls.kind} stage record lacks {', '.join(missing)}")
    return cls(**{f.name: data[f.name] for f in fields(cls) if data.get(f.name) is not None})
