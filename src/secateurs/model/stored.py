"""A checkpoint's tensors as stored versus as the model names them, for code that reads and writes
safetensors shards itself (streaming, :mod:`secateurs.engine.stream`).

``transformers`` 5 converts some tensors while loading and back while saving: most mixture-of-experts
families store one tensor per expert and matrix (``mlp.experts.3.gate_proj.weight``, Mixtral's
``block_sparse_moe.experts.3.w1.weight``) that the model holds fused (``mlp.experts.gate_up_proj``,
[experts, 2·intermediate, hidden]). :class:`StoredLayout` applies the model's own conversion mapping
(``get_model_conversion_mapping``) in both directions, on a few tensors at a time, so one block can
be read, pruned and written in the layout ``from_pretrained`` and ``save_pretrained`` use, and a
streamed folder equals the one an in-memory run saves. A model with no conversion passes through.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, revert_weight_conversion

from ..errors import UsageError


class StoredLayout:
    """The conversions between ``model``'s tensor names and the checkpoint's (both directions)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        transforms = get_model_conversion_mapping(model, add_legacy=False)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        if not self.identity:
            self._apply = _forward_conversion()

    @property
    def identity(self) -> bool:
        """No tensor is renamed or converted: stored names are the model's."""
        return not self.renamings and not self.converters

    def to_stored(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model tensors (full names) as the checkpoint stores them; meta tensors give names and shapes."""
        return dict(state) if self.identity else revert_weight_conversion(self.model, dict(state))

    def to_model(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored tensors (full names, every one a converter needs, e.g. all experts of a block) as the
        model names and shapes them: renamings first, then at most one converter per key, as loading does."""
        if self.identity:
            return dict(stored)
        patterns = {pattern: converter for converter in self.converters for pattern in converter.source_patterns}
        pending: dict[str, WeightConverter] = {}
        found: dict[str, torch.Tensor] = {}
        for key, tensor in sorted(stored.items(), key=lambda item: dot_natural_key(item[0])):
            apply_renamings, apply_converters = self._apply
            renamed = apply_renamings(key, self.renamings)
            target, pattern = apply_converters(renamed, self.converters)
            if pattern is None:
                found[renamed] = tensor
                continue
            pending.setdefault(target, deepcopy(patterns[pattern])).add_tensor(target, key, pattern, tensor)
        for target, converter in pending.items():
            for name, value in converter.convert(target, model=self.model, config=self.model.config).items():
                found[name] = value[0] if isinstance(value, list) else value
        return found


def _forward_conversion():
    """transformers' per-key renaming and converter lookup, which older 5.x releases (5.17, the GPU
    image's) do not export: imported here so ``import secateurs`` works on every ``transformers>=5``, and
    only a streamed checkpoint that needs them is refused, in one line, before anything is read."""
    try:
        from transformers.core_model_loading import apply_converters, apply_renamings
    except ImportError:
        import transformers

        raise UsageError(
            f"--stream on a checkpoint whose tensors transformers renames or fuses while loading (one tensor "
            f"per expert) needs a newer transformers than {transformers.__version__}: "
            "pip install -U transformers, or run without --stream") from None
    return apply_renamings, apply_converters
