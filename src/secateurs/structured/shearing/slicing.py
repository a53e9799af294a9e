"""Cutting the model to a binarised mask decision with the shared surgery of :mod:`secateurs.model`:
hidden dimensions everywhere they appear, then blocks, then per-block widths."""

from __future__ import annotations

import torch

from ...model.drop_layers import drop_layers
from ...model.load import LoadedModel
from ...model.slice import apply_widths, slice_hidden
from .target import Plan


def apply_keep(loaded: LoadedModel, plan: Plan, keep: dict[str, torch.Tensor]) -> None:
    """Slice the model in place to a binarised mask decision (indices from :meth:`ShearMasks.keep`)."""
    model, spec = loaded.model, loaded.spec
    if "hidden" in keep:
        slice_hidden(model, spec, keep["hidden"])
    n = plan.source["layers"]
    kept_layers = keep["layers"].tolist() if "layers" in keep else list(range(n))
    if len(kept_layers) < n:
        drop_layers(model, spec, [i for i in range(n) if i not in set(kept_layers)])
    widths = [{kind: keep[kind][i] for kind in ("heads", "channels") if kind in keep} for i in kept_layers]
    apply_widths(model, spec, widths)


def non_embedding_params(loaded: LoadedModel) -> int:
    """Parameters of the decoder blocks (what the target sizes and the 60% goal refer to)."""
    return sum(p.numel() for p in loaded.spec.blocks_of(loaded.model).parameters())
