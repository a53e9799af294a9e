"""Forward hooks that make an unchanged model compute as if masked (mask learning's forward)."""

from __future__ import annotations

import torch

from ...model.groups import GroupSet, block_groups
from ...model.linear import weight_matrix
from ...model.load import LoadedModel
from .target import Plan


class MaskedForward:
    """Hooks that make the model compute with the masks in ``self.z`` (set them before each forward).

    Equivalent to the sliced model when the masks are 0/1: a removed block adds nothing to the
    residual, a removed head group / channel feeds nothing to its output projection, and a removed
    hidden dimension stays exactly 0 in the residual while the norms average over live dimensions.
    """

    def __init__(self, loaded: LoadedModel, plan: Plan) -> None:
        self.loaded, self.plan = loaded, plan
        self.z: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def _owners(self, group_set: GroupSet, n_cols: int) -> torch.Tensor:
        owner = torch.empty(n_cols, dtype=torch.long)
        for g, cols in enumerate(group_set.consumer.index):
            owner[cols] = g
        return owner

    def _scale_output(self, layer: int):
        def hook(module, args, output):
            scale = None
            if "layers" in self.z:
                scale = self.z["layers"][layer]
            if "hidden" in self.z:
                scale = self.z["hidden"] if scale is None else scale * self.z["hidden"]
            return output if scale is None else output * scale.to(output.dtype)
        return hook

    def _scale_input(self, kind: str, layer: int, owner: torch.Tensor):
        def hook(module, args):
            if kind not in self.z:
                return None
            mult = self.z[kind][layer][owner.to(args[0].device)]
            return (args[0] * mult.to(args[0].dtype), *args[1:])
        return hook

    def _live_scale(self) -> torch.Tensor | None:
        """sqrt(D / live dims): an RMSNorm of the input scaled by it averages over live dims only."""
        hidden = self.z.get("hidden")
        if hidden is None:
            return None
        live = (hidden > 0).sum().clamp(min=1)
        return torch.sqrt(hidden.numel() / live.to(hidden.dtype))

    def _norm_pre(self, module, args):
        scale = self._live_scale()
        return None if scale is None else (args[0] * scale.to(args[0].dtype), *args[1:])

    def _norm_post(self, module, args, output):
        scale = self._live_scale()
        return output if scale is None else output / scale.to(output.dtype)

    def _embed_post(self, module, args, output):
        hidden = self.z.get("hidden")
        return output if hidden is None else output * hidden.to(output.dtype)

    def __enter__(self) -> MaskedForward:
        model, spec = self.loaded.model, self.loaded.spec
        kinds = self.plan.kinds
        add = self.handles.append
        for i, block in enumerate(spec.blocks_of(model)):
            groups = block_groups(spec, model.config, block, tuple(k for k in ("heads", "channels") if k in kinds))
            for path, kind in ((spec.attention[-1], "heads"), (spec.mlp[-1], "channels")):
                module = block.get_submodule(path)
                if kind in groups:
                    owner = self._owners(groups[kind], weight_matrix(module).shape[1])
                    add(module.register_forward_pre_hook(self._scale_input(kind, i, owner)))
                add(module.register_forward_hook(self._scale_output(i)))
            if "hidden" in kinds:
                for path in spec.norms:
                    add(block.get_submodule(path).register_forward_pre_hook(self._norm_pre))
                    add(block.get_submodule(path).register_forward_hook(self._norm_post))
        if "hidden" in kinds:
            final = model.get_submodule(spec.final_norm)
            add(final.register_forward_pre_hook(self._norm_pre))
            add(final.register_forward_hook(self._norm_post))
            for path in spec.embeddings:
                add(model.get_submodule(path).register_forward_hook(self._embed_post))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.z = {}
