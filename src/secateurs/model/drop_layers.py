"""Physical layer removal: fewer decoder blocks, a config that says so, a KV cache that still fits.

Removing a block is more than deleting it from the ModuleList. Attention modules index the KV cache
by their ``layer_idx``, so the kept ones are renumbered 0..k-1; the cache itself is sized from the
config (``num_hidden_layers`` and ``layer_types``), so the layer count and every per-layer config
list are cut to the kept layers. The result loads with plain ``AutoModelForCausalLM``.

:func:`layers_removed` does the same temporarily and undoes it, so scorers can evaluate "the model
without these layers" on any architecture without a copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from ..errors import UsageError
from .arch import ArchSpec

# Config keys meaning a layer depends on another layer's state: dropping one would break the other.
_CROSS_LAYER_KEYS = ("num_kv_shared_layers", "kv_sharing", "cross_layer_attention")


def check_removal(model: nn.Module, spec: ArchSpec, removed: Sequence[int]) -> list[int]:
    """Validate a removal request before any work; returns the sorted unique indices."""
    blocks = spec.blocks_of(model)
    if not isinstance(blocks, nn.ModuleList):
        raise UsageError(f"{spec.blocks} of this {spec.name} model is not a list of layers; it cannot be depth-pruned")
    config = spec.text_config(model.config)
    for key in _CROSS_LAYER_KEYS:
        if getattr(config, key, None):
            raise UsageError(f"this model shares state across layers ({key}); its layers cannot be dropped one by one")
    n = len(blocks)
    indices = sorted(set(int(i) for i in removed))
    if not indices:
        raise UsageError("no layers to remove; pass --remove N with N >= 1")
    if indices[0] < 0 or indices[-1] >= n:
        raise UsageError(f"layer indices must be in 0..{n - 1}, got {indices}")
    if len(indices) >= n:
        raise UsageError(f"cannot remove {len(indices)} of {n} layers: at least one must remain")
    return indices


def _per_layer_keys(config, n: int) -> list[str]:
    """Config attributes holding one entry per layer (``layer_types`` and the like)."""
    keys = []
    for key, value in vars(config).items():
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n:
            keys.append(key)
    return keys


def _layer_idx_modules(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _apply(model: nn.Module, spec: ArchSpec, kept: list[int]) -> None:
    blocks = spec.blocks_of(model)
    config = spec.text_config(model.config)
    n = len(blocks)
    for key in _per_layer_keys(config, n):
        value = getattr(config, key)
        setattr(config, key, type(value)(value[i] for i in kept))
    setattr(config, spec.num_layers_key, len(kept))
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    for new_index, block in enumerate(new_blocks):
        for module in _layer_idx_modules(block):
            module.layer_idx = new_index
    parent_path, _, name = spec.blocks.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new_blocks)


def drop_layers(model: nn.Module, spec: ArchSpec, removed: Sequence[int]) -> list[int]:
    """Remove the blocks at ``removed`` (indices of the current model) in place; returns the kept indices."""
    indices = check_removal(model, spec, removed)
    kept = [i for i in range(len(spec.blocks_of(model))) if i not in set(indices)]
    _apply(model, spec, kept)
    return kept


@contextmanager
def layers_removed(model: nn.Module, spec: ArchSpec, removed: Sequence[int]) -> Iterator[list[int]]:
    """The model without ``removed`` inside the ``with``, restored exactly afterwards (no weight copies)."""
    blocks = spec.blocks_of(model)
    config = spec.text_config(model.config)
    saved_config = {key: getattr(config, key) for key in _per_layer_keys(config, len(blocks))}
    saved_config[spec.num_layers_key] = getattr(config, spec.num_layers_key)
    saved_idx = [(m, m.layer_idx) for block in blocks for m in _layer_idx_modules(block)]
    if not removed:
        yield list(range(len(blocks)))
        return
    kept = drop_layers(model, spec, removed)
    try:
        yield kept
    finally:
        for key, value in saved_config.items():
            setattr(config, key, value)
        for module, index in saved_idx:
            module.layer_idx = index
        parent_path, _, name = spec.blocks.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, blocks)
