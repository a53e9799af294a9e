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

Routed experts (``RecoverConfig.experts``, on by default) are fused 3-D parameters, not linears: each
experts module's ``gate_up_proj`` and ``down_proj`` gets peft's :class:`~peft.tuners.lora.layer.ParamWrapper`
(what ``LoraConfig(target_parameters=...)`` builds), one rank-r pair (Bₑ, Aₑ) per expert, as
:class:`MaskedParamWrapper`: its delta, the stack of s·BₑAₑ in the parameter's stored layout, is
multiplied by a 3-D keep-mask (one slice per expert, the expert's non-zero pattern where that expert is
at least ``mask_min_sparsity`` sparse, all ones otherwise), and that one masked delta is what both the
forward (a parametrization W + ΔW ⊙ M for the length of the call) and the merge (W += ΔW ⊙ M) use, so
an expert's pruned weights stay exactly zero. peft's own forward would fold the unmasked factors in
with one ``baddbmm``; the masked one materialises ΔW ⊙ M (the size of the parameter) per forward.
ParamWrapper has no dropout (x cannot be factored out of W + ΔW), so expert adapters train without it.
Routers are never adapted. Each expert matrix is one key of :attr:`Adapters.layers` (its path as
the block lists it, ``mlp.experts.down_proj.3``), an :class:`ExpertAdapter` that exposes its (out, in)
factors, weight and keep-mask like a linear's, which is what LoRAPrune's unstructured scoring reads.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import peft
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import (
    LoraLayer,
    LoraVariant,
    ParamWrapper,
    _LoraParameterProxy,
)
from peft.utils.other import transpose
from torch import nn

from ..errors import UsageError, first_line
from ..model.experts import DOWN, GATE_UP
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


class MaskedParamWrapper(ParamWrapper):
    """peft's LoRA on one fused expert parameter whose update is masked per expert: the delta
    (:meth:`get_delta_weight`, in the parameter's stored layout) is zero wherever the 3-D buffer
    ``secateurs_keep`` is False, in the forward and in the merge. Without that buffer it is peft's."""

    def get_delta_weight(self, adapter_name: str, *args, **kwargs) -> torch.Tensor:
        delta = super().get_delta_weight(adapter_name, *args, **kwargs)
        if delta.dim() == 2 and self.get_param().dim() == 3:
            # One expert: peft returns its (out, in) update (Linear's), not the stored [1, out, in] / [1, in, out].
            delta = (delta if self._did_swap_in_out_features else delta.t()).unsqueeze(0)
        keep = self._buffers.get(KEEP)
        # In place: the delta is a fresh tensor no backward needs, and it is the size of the whole expert stack.
        return delta if keep is None else delta.masked_fill_(~keep, 0.0)

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]) -> Iterator[None]:
        """peft's, except that a masked parameter always takes the delta path (peft folds a single
        adapter's unmasked factors in with ``baddbmm``, which would undo the mask)."""
        adapters = [a for a in active_adapters if a in self.lora_A]
        if KEEP not in self._buffers or not adapters:
            with super()._activate_lora(active_adapters):
                yield
            return
        delta = self.get_delta_weight(adapters[0])
        for adapter in adapters[1:]:
            delta += self.get_delta_weight(adapter)
        base = self.get_base_layer()
        requires_grad = self.get_param().requires_grad
        nn.utils.parametrize.register_parametrization(base, self.parameter_name, _LoraParameterProxy(delta))
        base.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
        try:
            with nn.utils.parametrize.cached():
                yield
        finally:
            self._remove_parametrizations()


class ExpertAdapter:
    """Expert ``index`` of one :class:`MaskedParamWrapper` seen as a linear's adapter: its factors
    Aₑ (r, in) and Bₑ (out, r), weight and keep-mask as (out, in) views (``transposed``: gpt-oss's
    [E, in, out] storage)."""

    def __init__(self, wrapper: MaskedParamWrapper, index: int, transposed: bool) -> None:
        self.wrapper, self.index, self.transposed = wrapper, index, transposed
        self.scaling = wrapper.scaling

    def _oriented(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.t() if self.transposed else stored

    def weight(self) -> torch.Tensor:
        return self._oriented(self.wrapper.get_param().data[self.index])

    def keep(self) -> torch.Tensor:
        return self._oriented(getattr(self.wrapper, KEEP)[self.index])

    def factors(self, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(Aₑ, Bₑ), or their gradients with ``grad`` (None when there are none): peft lays out A as
        (E·r, in), expert e's rows e·r…e·r+r−1, and B as (out, r·E), expert e's columns e, e+E, …"""
        a, b = self.wrapper.lora_A[ADAPTER].weight, self.wrapper.lora_B[ADAPTER].weight
        if grad:
            if a.grad is None or b.grad is None:
                return None
            a, b = a.grad, b.grad
        count = self.wrapper.num_experts
        return a.reshape(count, -1, a.shape[-1])[self.index], b.reshape(b.shape[0], -1, count)[:, :, self.index]


def base_weight(layer: LoraLayer | ExpertAdapter) -> torch.Tensor:
    """The frozen weight under the adapter as (out, in) (a view: transposed for GPT-2's Conv1D)."""
    if isinstance(layer, ExpertAdapter):
        return layer.weight()
    return weight_matrix(layer.get_base_layer())


@dataclass
class Adapters:
    """LoRA attached to every block linear: ``layers`` by (block index, path in the block); a routed
    expert's matrix is an :class:`ExpertAdapter` there, its fused parameter's wrapper in ``experts``
    (by (block index, path of the parameter), ``mlp.experts.gate_up_proj``)."""

    peft_model: nn.Module
    layers: dict[tuple[int, str], LoraLayer | ExpertAdapter]
    masked: set[tuple[int, str]] = field(default_factory=set)
    experts: dict[tuple[int, str], MaskedParamWrapper] = field(default_factory=dict)

    def mask(self, key: tuple[int, str], keep: torch.Tensor) -> None:
        layer = self.layers[key]
        if isinstance(layer, ExpertAdapter):
            wrapper = layer.wrapper
            if KEEP not in wrapper._buffers:
                wrapper.register_buffer(KEEP, torch.ones_like(wrapper.get_param(), dtype=torch.bool), persistent=False)
            layer.keep().copy_(keep.to(layer.keep().device))
        else:
            set_keep(layer, keep)
        self.masked.add(key)

    def keep(self, key: tuple[int, str]) -> torch.Tensor:
        """The keep-mask (out, in) of a masked layer."""
        layer = self.layers[key]
        return layer.keep() if isinstance(layer, ExpertAdapter) else getattr(layer, KEEP)

    def factors(self, key: tuple[int, str], grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (r, in), B (out, r), scaling) of one adapted matrix, or with ``grad`` their gradients (None
        when the step left none): the update of its (out, in) weight is scaling · B @ A."""
        layer = self.layers[key]
        if isinstance(layer, ExpertAdapter):
            pair = layer.factors(grad)
        else:
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            pair = (a.grad, b.grad) if grad else (a, b)
            pair = None if pair[0] is None or pair[1] is None else pair
        return None if pair is None else (*pair, layer.scaling[ADAPTER])

    def trainable(self) -> dict[str, nn.Parameter]:
        """The adapter weights by name, in the model's parameter order (what the training loop trains)."""
        return {name: p for name, p in self.peft_model.named_parameters() if p.requires_grad}

    def merge(self) -> bool:
        """Merge the adapters into the weights and remove them; True if every masked zero stayed zero."""
        keeps = [(self.layers[key], self.keep(key)) for key in self.masked]
        with torch.no_grad():
            self.peft_model.merge_and_unload()
        return all(bool((base_weight(layer)[~keep.to(base_weight(layer).device)] == 0).all()) for layer, keep in keeps)

    def discard(self) -> None:
        """Remove the adapters without merging (after a failure), leaving the weights as they were."""
        self.peft_model.unload()


def attach(loaded: LoadedModel, config: RecoverConfig, mask_all: bool = False) -> Adapters:
    """Wrap every block linear of ``loaded.model`` in a LoRA adapter (in place).

    Linears at least ``config.mask_min_sparsity`` sparse, or all of them with ``mask_all`` (LoRAPrune
    prunes as it trains), get a masked adapter whose mask is their current non-zero pattern. An MoE
    model's routed experts (fused parameters) get per-expert adapters (:class:`MaskedParamWrapper`),
    each expert's matrix masked by the same rule, unless ``config.experts`` is off: then they stay
    exactly as they are (said once on stderr). Routers are not adapted.
    """
    spec = loaded.spec
    paths = {
        (i, name): f"{spec.blocks}.{i}.{name}"
        for i, block in enumerate(spec.blocks_of(loaded.model))
        for name, module in spec.linears(block).items()
        if isinstance(module, nn.Module)
    }
    fused = {}
    if spec.moe is not None:
        fused = {
            i: f"{spec.moe.block}.{spec.moe.experts}"
            for i, block in enumerate(spec.blocks_of(loaded.model)) if spec.experts_of(block) is not None
        }
        if not config.experts:
            print("secateurs: LoRA adapts the attention and shared-expert linears; the routed experts (fused "
                  "parameters) are not adapted (experts=false) and stay as they are", file=sys.stderr)
            fused = {}
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
    if fused:
        _check_peft()
        if config.dropout:
            print(f"secateurs: the routed experts' adapters train without dropout (peft's parameter LoRA has none); "
                  f"--dropout {config.dropout:g} applies to the other linears", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):  # seeded adapter init without touching the caller's RNG
        torch.manual_seed(config.seed)
        with _targets_as_given() if spec.moe is not None else nullcontext():
            peft_model = get_peft_model(loaded.model, lora)
        try:  # a refusal leaves the model as it came
            layers = {key: loaded.model.get_submodule(path) for key, path in paths.items()}
            moved = next((paths[key] for key, layer in layers.items() if not isinstance(layer, LoraLayer)), None)
            if moved is not None or peft_model.peft_config[ADAPTER].target_parameters:
                raise UsageError(f"peft {peft.__version__} moved the LoRA targets secateurs gave it (e.g. "
                                 f"{moved or 'onto fused parameters'}); install peft 0.21 (what secateurs is tested with)")
            wrappers = {(i, f"{path}.{name}"): wrapper for i, path in fused.items()
                        for name, wrapper in _wrap_experts(loaded, f"{spec.blocks}.{i}.{path}", config).items()}
        except UsageError:
            peft_model.unload()
            raise
    adapters = Adapters(peft_model, layers, experts=wrappers)
    transposed = spec.moe is not None and spec.moe.transposed
    for (i, path), wrapper in wrappers.items():
        for e in range(wrapper.num_experts):
            adapters.layers[(i, f"{path}.{e}")] = ExpertAdapter(wrapper, e, transposed)
    for key, layer in adapters.layers.items():
        weight = base_weight(layer)
        if mask_all or sparsity_of(weight) >= max(config.mask_min_sparsity, 1e-12):
            adapters.mask(key, weight != 0)
    return adapters


@contextmanager
def _targets_as_given() -> Iterator[None]:
    """peft under transformers 5 rewrites LoRA targets named like transformers 4's MoE experts
    (``gate_proj``, ``up_proj``, ``down_proj`` in Qwen2-MoE-pattern families, DeepSeek-V2/V3 included)
    into targets on the fused expert parameters, so that adapters trained on v4 still load. Our
    targets are v5 module paths, and DeepSeek's shared expert really has those names: the rewrite
    would move its adapters onto the routed experts (unmasked, and refused with dropout). Off for the
    length of one ``get_peft_model`` call on an MoE model; :func:`attach` then checks that every target
    it gave is a LoRA layer, so a peft that rewrites elsewhere is one line, not a silent move."""
    try:
        import peft.utils.transformers_weight_conversion as conversion
    except ImportError:  # a peft without the rewrite (attach's check catches one that rewrites elsewhere)
        conversion = None
    if not hasattr(conversion, "convert_peft_config_for_transformers"):
        yield
        return
    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def _wrap_experts(loaded: LoadedModel, path: str, config: RecoverConfig) -> dict[str, MaskedParamWrapper]:
    """Replace the experts module at ``path`` by a :class:`MaskedParamWrapper` on ``gate_up_proj``
    wrapping one on ``down_proj`` (peft nests a module's targeted parameters so); by parameter name."""
    parent_path, _, child = path.rpartition(".")
    parent = loaded.model.get_submodule(parent_path)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none")
    module, wrappers = getattr(parent, child), {}
    transposed = loaded.spec.moe.transposed
    for name in (GATE_UP, DOWN):
        module = wrappers[name] = MaskedParamWrapper(module, ADAPTER, parameter_name=name, config=lora, r=config.rank,
                                                     lora_alpha=config.alpha)
        if module._did_swap_in_out_features == transposed:  # peft reads the layout from the module's is_transposed
            raise UsageError(f"{path}.{name} is stored {'[E, in, out]' if transposed else '[E, out, in]'} but its "
                             "module tells peft otherwise (is_transposed); recover with --no-experts")
        if module.get_param().dtype in (torch.float16, torch.bfloat16):
            # fp32 factors on a half-precision model, as get_peft_model makes the linears' (autocast_adapter_dtype):
            # AdamW steps on bf16 factors would round most updates away.
            module.lora_A.float()
            module.lora_B.float()
    setattr(parent, child, module)
    return wrappers


class _ProbeExperts(nn.Module):
    """A toy fused-experts module for :func:`_check_peft`: its forward returns the weight it sees."""

    def __init__(self, count: int, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        self.weight = nn.Parameter(torch.randn((count, 5, 3) if transposed else (count, 3, 5)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.clone()


@functools.cache
def _check_peft() -> None:
    """Check, once, the peft internals expert adapters rest on, on a toy 3 x 5 expert stack of 1 and 2
    experts in both storage orientations: the factors' layout :class:`ExpertAdapter` reads (Aₑ rows
    e·r…, Bₑ columns e, e+E, …, an (out, in) product), the delta peft computes from them, and the
    masked forward (a parametrization while ParamWrapper's forward runs) and merge. These are
    private to peft and may change in any release; a peft whose behaviour differs is one line."""
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            for transposed in (False, True):
                for count in (1, 2):
                    _probe(count, transposed)
    except Exception as exc:  # noqa: BLE001 - any failure here means peft is not the one checked
        raise UsageError(f"peft {peft.__version__}'s parameter LoRA is not what secateurs' expert adapters were "
                         f"built on ({first_line(exc)}); install peft 0.21, or recover with --no-experts") from None


def _probe(count: int, transposed: bool) -> None:
    """One case of :func:`_check_peft`: raises (AssertionError or peft's own error) where peft differs."""
    experts = _ProbeExperts(count, transposed)
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, bias="none")
    wrapper = MaskedParamWrapper(experts, ADAPTER, parameter_name="weight", config=lora, r=2, lora_alpha=4)
    if wrapper._did_swap_in_out_features == transposed:
        raise AssertionError("in/out features read in the other orientation")
    nn.init.normal_(wrapper.lora_B[ADAPTER].weight)
    delta = wrapper.get_delta_weight(ADAPTER)
    if delta.shape != experts.weight.shape:
        raise AssertionError(f"delta of shape {tuple(delta.shape)} for a parameter of {tuple(experts.weight.shape)}")
    for e in range(count):
        a, b = ExpertAdapter(wrapper, e, transposed).factors()
        if not torch.allclose(wrapper.scaling[ADAPTER] * b @ a, delta[e].t() if transposed else delta[e], atol=1e-5):
            raise AssertionError("an expert's factors are not its slice of the delta")
    keep = torch.rand(experts.weight.shape) < 0.5
    experts.weight.mul_(keep)
    wrapper.register_buffer(KEEP, keep, persistent=False)
    expected = experts.weight + delta * keep
    seen = wrapper(torch.zeros(1))
    if not torch.allclose(seen, expected, atol=1e-5) or bool(seen[~keep].any()):
        raise AssertionError("the masked forward does not use W + masked delta")
    if nn.utils.parametrize.is_parametrized(experts):
        raise AssertionError("the forward left its parametrization")
    wrapper.merge()
    if not torch.allclose(experts.weight, expected, atol=1e-5) or bool(experts.weight[~keep].any()):
        raise AssertionError("the merge does not add the masked delta")
