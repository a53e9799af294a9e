"""Physical width surgery: keep given heads / MLP channels per block, shrink the weights, fix the config.

Give :func:`apply_widths` the kept group indices per block (``{"heads": idx, "channels": idx}``, a
missing kind is left whole) and it slices every coupled row and column in place
(:mod:`secateurs.model.groups` says which), then makes the config describe the result
(:func:`~secateurs.model.per_layer.update_config`: the stock sizes for uniform widths, recorded
shapes for per-layer ones).

:func:`mask_groups` zeroes groups without changing shapes: the reference every surgery is tested
against, and what methods that keep shapes (LoRAPrune) use. :func:`slice_hidden` cuts the residual
stream itself (embeddings, norms, every projection) where the family allows it (``prunable_hidden``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import UsageError
from .arch import ArchSpec
from .groups import GroupSet, block_groups, check_target, head_geometry
from .linear import in_features, sync_features, weight_dim
from .per_layer import update_config

Widths = dict[str, torch.Tensor]


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=False))


def keep_linear(module: nn.Module, axis: str, keep: torch.Tensor) -> None:
    """Keep only the rows (``axis='out'``, with the bias) or columns (``'in'``) ``keep`` of a linear."""
    keep = keep.to(module.weight.device)
    _set_param(module, "weight", module.weight.data.index_select(weight_dim(module, axis), keep))
    if axis == "out" and getattr(module, "bias", None) is not None:
        _set_param(module, "bias", module.bias.data.index_select(0, keep))
    sync_features(module)


def slice_hidden(model: PreTrainedModel, spec: ArchSpec, keep: torch.Tensor) -> None:
    """Keep residual dimensions ``keep`` everywhere they appear: embeddings, norms, every projection
    (inputs of the ones that read the residual stream, outputs of the ones that write it), the LM head.

    Only for families with ``spec.prunable_hidden`` (Sheared LLaMA's hidden masks); the config's
    ``hidden_size`` is updated, and a head size the modeling code derived from it is pinned first.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    config = spec.text_config(model.config)
    if spec.head_dim_key and not getattr(config, spec.head_dim_key, None):
        # Qwen2 / Phi-3 derive the head size from hidden_size when the config has none: pin it.
        setattr(config, spec.head_dim_key, config.hidden_size // getattr(config, spec.heads_key))
    head = model.get_submodule(spec.lm_head)
    embeddings = [model.get_submodule(path) for path in spec.embeddings]
    tied = any(head.weight is e.weight for e in embeddings)
    for embedding in embeddings:
        _set_param(embedding, "weight", embedding.weight.data.index_select(1, keep.to(embedding.weight.device)))
        embedding.embedding_dim = len(keep)
    if tied:
        head.weight = embeddings[0].weight
        head.in_features = len(keep)
    else:
        keep_linear(head, "in", keep)
    norms = [model.get_submodule(spec.final_norm)] if spec.final_norm else []
    for block in spec.blocks_of(model):
        norms += [block.get_submodule(path) for path in spec.norms]
        for path in (*spec.attention[:-1], *spec.mlp[:-1]):
            keep_linear(block.get_submodule(path), "in", keep)
        for path in (spec.attention[-1], spec.mlp[-1]):
            keep_linear(block.get_submodule(path), "out", keep)
    for norm in norms:
        _set_param(norm, "weight", norm.weight.data.index_select(0, keep.to(norm.weight.device)))
        if getattr(norm, "bias", None) is not None:
            _set_param(norm, "bias", norm.bias.data.index_select(0, keep.to(norm.bias.device)))
    config.hidden_size = len(keep)


def _positions(slot_index: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Sorted rows / columns that the given groups own in one slot."""
    return slot_index[groups].reshape(-1).sort().values


def slice_groups(block: nn.Module, group_set: GroupSet, keep: torch.Tensor) -> None:
    """Keep only groups ``keep`` of one group set, in every linear it couples."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    for slot in group_set.slots:
        keep_linear(block.get_submodule(slot.path), slot.axis, _positions(slot.index, keep))


def mask_groups(block: nn.Module, group_set: GroupSet, remove: torch.Tensor) -> None:
    """Zero groups ``remove`` (weights and producer biases) without changing any shape."""
    remove = torch.as_tensor(remove, dtype=torch.long)
    with torch.no_grad():
        for slot in group_set.slots:
            module = block.get_submodule(slot.path)
            where = _positions(slot.index, remove).to(module.weight.device)
            module.weight.data.index_fill_(weight_dim(module, slot.axis), where, 0.0)
            if slot.axis == "out" and getattr(module, "bias", None) is not None:
                module.bias.data.index_fill_(0, where, 0.0)


def _check_keep(index: int, kind: str, keep: torch.Tensor, count: int) -> None:
    if keep.numel() == 0:
        raise UsageError(f"block {index} would lose every one of its {kind}; use a smaller --ratio")
    if keep.unique().numel() != keep.numel() or int(keep.min()) < 0 or int(keep.max()) >= count:
        raise UsageError(f"block {index}: kept {kind} indices must be distinct and in [0, {count})")


def apply_widths(model: PreTrainedModel, spec: ArchSpec, keep: list[Widths]) -> None:
    """Slice every block to its kept heads / channels and make the config describe the result.

    Validates every block before touching any weight, so a bad request leaves the model unchanged.
    """
    blocks = spec.blocks_of(model)
    if len(keep) != len(blocks):
        raise UsageError(f"need kept widths for each of the {len(blocks)} blocks, got {len(keep)}")
    kinds = tuple(sorted({kind for widths in keep for kind in widths}))
    check_target(spec, kinds)
    plans = []
    for index, (block, widths) in enumerate(zip(blocks, keep)):
        groups = block_groups(spec, model.config, block, kinds)
        for kind, kept in widths.items():
            kept = torch.as_tensor(kept, dtype=torch.long)
            _check_keep(index, kind, kept, groups[kind].count)
        plans.append((block, groups, widths))
    head_counts = {len(widths["heads"]) for widths in keep if "heads" in widths}
    if len(head_counts) > 1 and not spec.per_layer_heads:
        raise UsageError(
            f"{spec.name}: its fused q/k/v split reads the head count from the config, so every layer "
            "must keep the same number of heads; use --mode uniform or --target channels"
        )
    heads_before = [head_geometry(spec, model.config, block) for block in blocks] if "heads" in kinds else []
    for block, groups, widths in plans:
        for kind, kept in widths.items():
            slice_groups(block, groups[kind], kept)
    if "heads" in kinds:
        for block, before in zip(blocks, heads_before):
            _set_head_attributes(block, spec, before)
    update_config(model, spec)


def _set_head_attributes(block: nn.Module, spec: ArchSpec, before) -> None:
    """Keep attention modules' own head counts (when they store them) in line with the weights."""
    attention = block.get_submodule(spec.attention[-1].rsplit(".", 1)[0])
    heads = in_features(block.get_submodule(spec.attention[-1])) // before.head_dim
    for name, value in (("num_heads", heads), ("num_key_value_heads", heads // before.per_group)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)


__all__ = [
    "apply_widths",
    "keep_linear",
    "mask_groups",
    "slice_groups",
]
