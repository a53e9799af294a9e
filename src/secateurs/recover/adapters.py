"""LoRA adapters over ``peft`` that keep every pruned weight at exactly zero.

Sparse models need more than a plain merge: W + s·BA is dense, so it would undo the pruning.
A linear that is sparse (at least ``mask_min_sparsity`` of its weights exactly zero) gets a
*masked adapter*: a peft ``LoraVariant`` whose forward adds ``x · ((s·BA) ⊙ M)ᵀ`` with M the
keep-mask, and whose merge adds the same masked delta. Training therefore sees exactly the model
that the merge produces, the gradients of A and B are those of the masked model, and the merged
weights are zero wherever M is. Width- and layer-pruned models are dense and take the plain
(faster) LoRA path. The threshold exists because dense weights can hold a few exact zeros too:
SmolLM2-135M dequantized from its Q4_1 GGUF has up to 0.07% per linear, pruned linears have tens
of percent. LoRAPrune (:mod:`.loraprune`) attaches masked adapters everywhere and narrows the masks
as it prunes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose
from torch import nn

from ..model.linear import is_transposed, sparsity_of, weight_matrix
from ..model.load import LoadedModel
from .config import RecoverConfig

ADAPTER = "default"
KEEP = "secateurs_keep"


class MaskedLora(LoraVariant):
    """A peft LoRA variant whose update is (s·BA) ⊙ M in the forward pass and in the merge.

    M is the boolean buffer ``secateurs_keep`` on the layer, shaped (out, in) like the delta.
    """

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        """Nothing to set up: the mask is registered by :func:`set_keep`."""

    @staticmethod
    def delta(module: LoraLayer, adapter: str) -> torch.Tensor:
        """The masked update (out, in): s·BA with every pruned position exactly zero."""
        full = (module.lora_B[adapter].weight @ module.lora_A[adapter].weight) * module.scaling[adapter]
        return full.masked_fill(~getattr(module, KEEP), 0.0)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = transpose(MaskedLora.delta(module, active_adapter), module.fan_in_fan_out)
        keep = transpose(getattr(module, KEEP), module.fan_in_fan_out)
        return (orig_weight + delta.to(orig_weight.dtype)).masked_fill(~keep, 0.0)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = MaskedLora.merge_safe(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = transpose(MaskedLora.delta(module, active_adapter), module.fan_in_fan_out)
        return orig_weight.data - delta.to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        return result + F.linear(dropout(x), MaskedLora.delta(module, active_adapter))


def set_keep(layer: LoraLayer, keep: torch.Tensor) -> None:
    """Give ``layer`` a masked adapter with keep-mask ``keep`` (out, in), or update its mask."""
    keep = keep.to(device=layer.lora_A[ADAPTER].weight.device, dtype=torch.bool)
    if KEEP in layer._buffers:
        getattr(layer, KEEP).copy_(keep)
        return
    layer.register_buffer(KEEP, keep, persistent=False)
    layer.lora_variant[ADAPTER] = MaskedLora()


def base_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen weight under the adapter as (out, in) (a view: transposed for GPT-2's Conv1D)."""
    return weight_matrix(layer.get_base_layer())


@dataclass
class Adapters:
    """LoRA attached to every block linear: ``layers`` by (block index, path in the block)."""

    peft_model: nn.Module
    layers: dict[tuple[int, str], LoraLayer]
    masked: set[tuple[int, str]] = field(default_factory=set)

    def mask(self, key: tuple[int, str], keep: torch.Tensor) -> None:
        set_keep(self.layers[key], keep)
        self.masked.add(key)

    def keep(self, key: tuple[int, str]) -> torch.Tensor:
        """The keep-mask (out, in) of a masked layer."""
        return getattr(self.layers[key], KEEP)

    def trainable(self) -> dict[str, nn.Parameter]:
        """The adapter weights by name, in the model's parameter order (what the training loop trains)."""
        return {name: p for name, p in self.peft_model.named_parameters() if p.requires_grad}

    def merge(self) -> bool:
        """Merge the adapters into the weights and remove them; True if every masked zero stayed zero."""
        keeps = {key: (self.layers[key].get_base_layer(), self.keep(key)) for key in self.masked}
        with torch.no_grad():
            self.peft_model.merge_and_unload()
        return all(bool((weight_matrix(base)[~keep.to(base.weight.device)] == 0).all()) for base, keep in keeps.values())

    def discard(self) -> None:
        """Remove the adapters without merging (after a failure), leaving the weights as they were."""
        self.peft_model.unload()


def attach(loaded: LoadedModel, config: RecoverConfig, mask_all: bool = False) -> Adapters:
    """Wrap every block linear of ``loaded.model`` in a LoRA adapter (in place).

    Linears at least ``config.mask_min_sparsity`` sparse, or all of them with ``mask_all`` (LoRAPrune
    prunes as it trains), get a masked adapter whose mask is their current non-zero pattern. An MoE
    model's routed experts are views into fused 3-D parameters, which LoRA cannot wrap: they get no
    adapter and stay exactly as they are (said once on stderr); attention and shared experts are adapted.
    """
    spec = loaded.spec
    paths = {
        (i, name): f"{spec.blocks}.{i}.{name}"
        for i, block in enumerate(spec.blocks_of(loaded.model))
        for name, module in spec.linears(block).items()
        if isinstance(module, nn.Module)
    }
    if spec.moe is not None:
        print("secateurs: LoRA adapts the attention and shared-expert linears; the routed experts (fused "
              "parameters) are not adapted and stay as they are", file=sys.stderr)
    conv = any(is_transposed(loaded.model.get_submodule(p)) for p in paths.values())
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(paths.values()),
        fan_in_fan_out=conv,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # seeded adapter init without touching the caller's RNG
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(loaded.model, lora)
    adapters = Adapters(peft_model, {key: loaded.model.get_submodule(path) for key, path in paths.items()})
    for key, layer in adapters.layers.items():
        weight = base_weight(layer)
        if mask_all or sparsity_of(weight) >= max(config.mask_min_sparsity, 1e-12):
            adapters.mask(key, weight != 0)
    return adapters
