"""Swap a pruned model's linears for ``SparseLinear`` (and its fused MoE experts for ``SparseExperts``), and read the sparse exports of earlier versions.

Exports are now written in the compressed-tensors layout (:mod:`secateurs.kernels.compressed`).
Folders written before hold, for each swapped linear, the kernel tensors themselves
(``<name>.<part>`` for each of its format's ``parts``) instead of ``<name>.weight``, listed by the
``export`` stage in ``secateurs.json`` (with no ``layout``). This module registers that layout with
:mod:`secateurs.model.load` (``FolderFormat("sparse")``), so ``secateurs.load_model`` still restores
them, saying once that a re-export gives the format other tools read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UsageError
from ..model.arch import ArchSpec
from ..model.experts import DOWN, GATE_UP, ExpertLinear, RouterLinear
from ..model.formats import FolderFormat, register_folder_format
from ..model.linear import weight_matrix
from ..record import ExportStage
from . import registry
from .experts import SparseExperts, unsupported
from .formats import SparseFormat
from .linear import SparseLinear, note

DEFAULT_MIN_SPARSITY = 0.5


@dataclass
class SparsifyReport:
    """Which linears became sparse (and in which format), which stayed dense and why, and the bytes."""

    swapped: dict[str, dict] = field(default_factory=dict)
    kept_dense: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0
    sparse_bytes: int = 0

    def stage_record(self) -> ExportStage:
        return ExportStage(format="sparse", layers=self.swapped, kept_dense=self.kept_dense,
                           weight_bytes={"dense": self.dense_bytes, "compressed": self.sparse_bytes})


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def sparsify(model: nn.Module, spec: ArchSpec, min_sparsity: float = DEFAULT_MIN_SPARSITY) -> SparsifyReport:
    """Replace every block linear that is 2:4 (or at least ``min_sparsity`` zeros) by a SparseLinear,
    and every fused MoE experts module whose expert matrices all are by a :class:`SparseExperts`.

    The 50% default is where a bitmap stops being larger than the dense fp16 weight would be worth
    reading (values + 1 bit per weight + offsets ≈ 0.58 of dense at 50%).
    """
    if not 0.0 <= min_sparsity < 1.0:
        raise UsageError(f"min sparsity {min_sparsity} must be in [0, 1)")
    already = next((name for name, m in model.named_modules() if isinstance(m, (SparseLinear, SparseExperts))), None)
    if already is not None:
        raise UsageError(f"{already} is already sparse; sparsify a dense (pruned) model")
    report = SparsifyReport()
    experts: dict[str, dict[str, ExpertLinear]] = {}
    for name, module in spec.named_linears(model).items():
        if isinstance(module, ExpertLinear):  # swapped with the rest of its module, below
            path, _, view = name.rpartition(".")
            path, _, matrix = path.rpartition(".")
            experts.setdefault(path, {})[f"{matrix}.{view}"] = module
            continue
        if isinstance(module, RouterLinear):
            report.kept_dense[name] = "an MoE router (a view of its weight): stays dense, its logits choose the experts"
            continue
        weight = weight_matrix(module)
        fmt_cls, why = registry.choose_format(weight, min_sparsity)
        if fmt_cls is None:
            report.kept_dense[name] = why
            continue
        sparse = SparseLinear.from_module(weight, getattr(module, "bias", None), fmt_cls)
        report.swapped[name] = {"kind": sparse.kind, "shape": [sparse.out_features, sparse.in_features], "why": why}
        report.dense_bytes += weight.numel() * weight.element_size()
        report.sparse_bytes += sparse.format().nbytes()
        set_module(model, name, sparse)
    for path, views in experts.items():
        _swap_experts(model, path, views, min_sparsity, report)
    if not report.swapped:
        raise UsageError(
            "no linear is sparse enough to store compressed (needs 2:4, or at least "
            f"{min_sparsity:.0%} zeros); prune it first, e.g. secateurs prune --pattern 2:4"
        )
    return report


def _swap_experts(model: nn.Module, path: str, views: dict[str, ExpertLinear], min_sparsity: float,
                  report: SparsifyReport) -> None:
    """Replace the experts module at ``path`` by a SparseExperts, each of its matrices (``views``, by
    ``gate_up_proj.3``) in the format ``choose_format`` picks; all of them or none, so the module never
    holds an expert both ways (then each matrix is listed dense with the reason)."""
    first = next(iter(views.values()))
    reason = unsupported(first.experts)
    chosen: dict[str, tuple[type[SparseFormat], str]] = {}
    for rel, view in views.items() if reason is None else ():
        fmt_cls, why = registry.choose_format(weight_matrix(view), min_sparsity)
        if fmt_cls is None:
            reason = f"{rel}: {why}, so this module's experts stay dense together"
            break
        chosen[rel] = (fmt_cls, why)
    if reason is not None:
        report.kept_dense.update({f"{path}.{rel}": reason for rel in views})
        return
    formats: dict[str, list[SparseFormat]] = {GATE_UP: [], DOWN: []}
    for rel, view in views.items():  # expert by expert, so each list is in expert order
        weight = weight_matrix(view)
        fmt_cls, why = chosen[rel]
        fmt = fmt_cls.compress(weight.detach())
        formats[rel.partition(".")[0]].append(fmt)
        report.swapped[f"{path}.{rel}"] = {"kind": fmt.kind, "shape": list(fmt.shape), "why": why}
        report.dense_bytes += weight.numel() * weight.element_size()
        report.sparse_bytes += fmt.nbytes()
    set_module(model, path, SparseExperts(first.experts, formats, first.transposed))


def export_stage(folder: Path) -> dict | None:
    """The last ``export`` stage recorded in ``folder/secateurs.json`` with format sparse in the layout
    of earlier versions (no ``layout`` key), if any."""
    record = folder / "secateurs.json"
    if not record.is_file():
        return None
    try:
        stages = json.loads(record.read_text()).get("stages", [])
    except (json.JSONDecodeError, AttributeError):
        return None
    found = [s for s in stages if isinstance(s, dict) and s.get("stage") == ExportStage.kind and s.get("format") == "sparse"]
    return found[-1] if found and "layout" not in found[-1] else None


def restore_sparse(model: nn.Module, folder: Path, dtype: torch.dtype) -> int:
    """Put the SparseLinears of a sparse export back into a freshly built ``model``; returns how many."""
    stage = export_stage(folder)
    if stage is None:
        return 0
    note(f"{folder} is a sparse export in secateurs' earlier layout: it loads, but only secateurs reads it; "
         "re-export it (secateurs prune ... --export sparse) for the compressed-tensors layout other tools read")
    layers: dict[str, dict] = stage.get("layers", {})
    for name, info in layers.items():
        if info["kind"] not in registry.FORMATS:
            raise UsageError(f"{folder} stores {name} in unknown format {info['kind']!r}; upgrade secateurs")
    classes = {name: registry.format_class(info["kind"]) for name, info in layers.items()}
    wanted = {f"{name}.{part}" for name, cls in classes.items() for part in (*cls.parts, "bias")}
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in wanted:
                    tensors[key] = handle.get_tensor(key)
    for name, cls in classes.items():
        missing = [p for p in cls.parts if f"{name}.{p}" not in tensors]
        if missing:
            raise UsageError(f"{folder} is a sparse export but lacks {name}.{missing[0]}; re-export it")
        stored = {p: tensors[f"{name}.{p}"] for p in cls.parts}
        # the weight's values come in the model's dtype; positions, bits and offsets keep their integer types
        found = {p: t.to(dtype) if t.is_floating_point() else t for p, t in stored.items()}
        bias = tensors.get(f"{name}.bias")
        set_module(model, name, SparseLinear(cls.from_parts(found, layers[name]["shape"]),
                                             bias.to(dtype) if bias is not None else None))
    return len(layers)


def densify(model: nn.Module, source: str, stage: str) -> int:
    """Expand a loaded sparse export's ``SparseLinear`` layers back to plain ``nn.Linear`` (zeros kept) for
    a stage that edits weights, which reads ``.weight`` like every method; returns how many. Fused MoE experts
    in a sparse layout have no dense module to return to here: one line names the dense checkpoint instead."""
    experts = next((name for name, m in model.named_modules() if isinstance(m, SparseExperts)), None)
    if experts is not None:
        raise UsageError(f"{source} stores its MoE experts in the sparse kernels' layout ({experts}), which "
                         f"secateurs {stage} cannot edit: run it on the dense checkpoint the export came from")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    for name, layer in layers:
        weight = layer.dense_weight()
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        set_module(model, name, dense)
    return len(layers)


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


register_folder_format(FolderFormat("sparse", lambda folder: export_stage(folder) is not None, restore_sparse))
