"""Cutting the model to a binarised mask decision: hidden dimensions everywhere they appear, then
blocks and per-block widths through the shared surgery of :mod:`secateurs.model`."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ...model.arch import ArchSpec
from ...model.drop_layers import drop_layers
from ...model.load import LoadedModel
from ...model.slice import apply_widths, keep_linear
from .target import Plan


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=False))


def slice_hidden(model: PreTrainedModel, spec: ArchSpec, keep: torch.Tensor) -> None:
    """Keep residual dimensions ``keep`` everywhere they appear: embeddings, norms, every projection."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    config = model.config
    if spec.head_dim_key and not getattr(config, spec.head_dim_key, None):
        # Qwen2 / Phi-3 derive the head size from hidden_size when the config has none: pin it.
        setattr(config, spec.head_dim_key, config.hidden_size // getattr(config, spec.heads_key))
    head = model.get_submodule(spec.lm_head)
    embeddings = [model.get_submodule(path) for path in spec.embeddings]
    tied = any(head.weight is e.weight for e in embeddings)
    for embedding in embeddings:
        _replace(embedding, "weight", embedding.weight.data.index_select(1, keep.to(embedding.weight.device)))
        embedding.embedding_dim = len(keep)
    if tied:
        head.weight = embeddings[0].weight
        head.in_features = len(keep)
    else:
        keep_linear(head, "in", keep)
    norms = [model.get_submodule(spec.final_norm)]
    for block in spec.blocks_of(model):
        norms += [block.get_submodule(path) for path in spec.norms]
        for path in (*spec.attention[:-1], *spec.mlp[:-1]):
            keep_linear(block.get_submodule(path), "in", keep)
        for path in (spec.attention[-1], spec.mlp[-1]):
            keep_linear(block.get_submodule(path), "out", keep)
    for norm in norms:
        _replace(norm, "weight", norm.weight.data.index_select(0, keep.to(norm.weight.device)))
        if getattr(norm, "bias", None) is not None:
            _replace(norm, "bias", norm.bias.data.index_select(0, keep.to(norm.bias.device)))
    config.hidden_size = len(keep)


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
