"""Physical width surgery: keep given heads / MLP channels per block, shrink the weights, fix the config.

Give :func:`apply_widths` the kept group indices per block (``{"heads": idx, "channels": idx}``, a
missing kind is left whole) and it slices every coupled row and column in place
(:mod:`secateurs.model.groups` says which), then updates the config:

* Uniform widths: the config's head / KV-head / intermediate sizes are set, so the saved folder
  loads with plain ``AutoModelForCausalLM.from_pretrained`` and no custom code.
* Different widths per block (or parameters the stock config cannot express, such as an output
  bias added by FLAP's compensation): the config keeps the largest widths and records the exact
  shape of every parameter that differs in ``secateurs_shapes``; ``auto_map`` points to a small
  ``modeling_secateurs.py`` saved beside the weights, a subclass of the original model class that
  builds the stock model and then resizes exactly those parameters. Plain ``transformers`` users
  load it with ``from_pretrained(folder, trust_remote_code=True)`` (their choice to run that file).
  secateurs itself never runs code from a model folder: :func:`load_pretrained` rebuilds the same
  subclass from the package's own :func:`resize_parameters` and reads only the config and the
  weights. Per-layer sizes rather than zero-padding keep the parameters and the speed that were won.

:func:`mask_groups` zeroes groups without changing shapes: the reference every surgery is tested
against, and what methods that keep shapes (LoRAPrune) use. :func:`slice_hidden` cuts the residual
stream itself (embeddings, norms, every projection) where the family allows it (``prunable_hidden``).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..errors import UsageError
from .arch import ArchSpec
from .groups import GroupSet, block_groups, check_target, head_geometry
from .linear import in_features, sync_features, weight_dim

REMOTE_MODULE = "modeling_secateurs"
SHAPES_KEY = "secateurs_shapes"

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


def update_config(model: PreTrainedModel, spec: ArchSpec) -> None:
    """Set the config's sizes to the blocks' (largest) widths; record shapes it cannot express."""
    top, config = model.config, spec.text_config(model.config)  # sizes live in a multimodal model's text config
    blocks = spec.blocks_of(model)
    if hasattr(top, SHAPES_KEY):
        delattr(top, SHAPES_KEY)
    if spec.head_dim_key is not None:
        geometries = [head_geometry(spec, config, block) for block in blocks]
        widest = max(geometries, key=lambda geo: geo.heads)
        keys = [key for key in (spec.head_dim_key, spec.heads_key, spec.kv_heads_key) if key]
        previous = {key: getattr(config, key, None) for key in keys}
        setattr(config, spec.head_dim_key, widest.head_dim)
        setattr(config, spec.heads_key, widest.heads)
        if spec.kv_heads_key:
            setattr(config, spec.kv_heads_key, widest.kv_heads)
        try:
            _stock_config(model)
        except (ValueError, StrictDataclassClassValidationError):
            # Llama / Gemma configs insist that hidden_size be a multiple of the head count; keep
            # the old (valid) counts and let the recorded shapes carry the real ones.
            for key, value in previous.items():
                if value is None:
                    delattr(config, key)
                else:
                    setattr(config, key, value)
    down = spec.mlp[-1]
    widths = [in_features(block.get_submodule(down)) for block in blocks]
    setattr(config, spec.intermediate_key, max(widths))
    differing = _differing_shapes(model)
    auto_map = dict(getattr(top, "auto_map", None) or {})
    if differing:
        setattr(top, SHAPES_KEY, differing)
        auto_map["AutoModelForCausalLM"] = f"{REMOTE_MODULE}.{_remote_class_name(model)}"
        top.auto_map = auto_map
    elif auto_map.get("AutoModelForCausalLM", "").startswith(f"{REMOTE_MODULE}."):
        del auto_map["AutoModelForCausalLM"]
        top.auto_map = auto_map or None


def _stock_class(model: PreTrainedModel) -> type[PreTrainedModel]:
    """The transformers class the model is (or, for a reloaded secateurs model, derives from)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and issubclass(cls, PreTrainedModel):
            return cls
    raise UsageError(f"{type(model).__name__} is not a transformers model class")


def _remote_class_name(model: PreTrainedModel) -> str:
    """The stock class's own name, so transformers' per-class checkpoint renamings still apply."""
    return _stock_class(model).__name__


def _stock_config(model: PreTrainedModel):
    """The model's config rebuilt by its own class (so its validation runs), without our additions."""
    return model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k not in (SHAPES_KEY, "auto_map")}
    )


def _differing_shapes(model: PreTrainedModel) -> dict[str, dict[str, list[int]]]:
    """Parameters whose shape (or existence) differs from what the stock class builds from the config."""
    config = _stock_config(model)
    with torch.device("meta"):
        stock = _stock_class(model)(config)
    expected = {name: tuple(p.shape) for name, p in stock.named_parameters()}
    differing: dict[str, dict[str, list[int]]] = {}
    for name, param in model.named_parameters():
        if expected.get(name) != tuple(param.shape):
            module, _, leaf = name.rpartition(".")
            differing.setdefault(module, {})[leaf] = list(param.shape)
    return differing


def resize_parameters(model: nn.Module, shapes: dict[str, dict[str, list[int]]]) -> None:
    """Give every parameter listed in ``shapes`` (module path -> parameter name -> shape) that shape,
    creating it if the stock module lacks it (FLAP's output bias), before the weights are loaded."""
    for path, params in shapes.items():
        module = model.get_submodule(path)
        for leaf, shape in params.items():
            old = getattr(module, leaf, None)
            like = old if isinstance(old, torch.Tensor) else module.weight
            setattr(module, leaf, nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device)))
        weight = getattr(module, "weight", None)
        if hasattr(module, "nf"):
            module.nf = weight.shape[1]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape


# The saved file embeds resize_parameters' own source, so the package and the file cannot drift.
REMOTE_CODE = '''"""{stock} with per-layer widths, written by secateurs (structured width pruning).

Builds the stock transformers model from the config, then resizes the parameters listed in
``config.{shapes}`` (module path -> parameter name -> shape) before the weights are loaded:
different numbers of heads or MLP channels per layer, or a bias the stock layer lacks.
Load with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` (secateurs
itself loads such a folder without this file).
"""

import torch
import transformers
from torch import nn


{resize}

class {name}(transformers.{stock}):
    @classmethod
    def is_custom_code(cls):
        # Same modules and weight names as the stock class, so its checkpoint renamings apply.
        return False

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        resize_parameters(self, getattr(config, "{shapes}", {{}}))
'''


def remote_code_files(model: PreTrainedModel) -> dict[str, str]:
    """Files to save beside the weights: ``modeling_secateurs.py`` when the config needs it, else none."""
    if not getattr(model.config, SHAPES_KEY, None):
        return {}
    stock = _stock_class(model).__name__
    source = REMOTE_CODE.format(
        stock=stock, name=_remote_class_name(model), shapes=SHAPES_KEY, resize=inspect.getsource(resize_parameters)
    )
    return {f"{REMOTE_MODULE}.py": source}


@functools.cache
def per_layer_class(stock: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The package's own per-layer-width subclass of ``stock`` (what ``modeling_secateurs.py`` defines),
    named like the stock class so transformers' per-class checkpoint renamings still apply."""

    def __init__(self, config, *args, **kwargs):
        stock.__init__(self, config, *args, **kwargs)
        resize_parameters(self, getattr(config, SHAPES_KEY, None) or {})

    def is_custom_code(cls) -> bool:
        return False

    return type(stock.__name__, (stock,), {"__init__": __init__, "is_custom_code": classmethod(is_custom_code)})


def _config_stock_class(config) -> type[PreTrainedModel] | None:
    """The transformers class a saved config names (``architectures``), else its causal-LM class."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def skeleton_class(config) -> type[PreTrainedModel] | None:
    """The class :func:`load_pretrained` builds for ``config`` without running folder code; None if none."""
    stock = _config_stock_class(config)
    if stock is None:
        return None
    return per_layer_class(stock) if getattr(config, SHAPES_KEY, None) else stock


def load_pretrained(
    folder: str | Path, config=None, trust_remote_code: bool = False, **kwargs
) -> PreTrainedModel:
    """``from_pretrained`` for any folder, running code from it only if ``trust_remote_code`` is set.

    A folder saved by secateurs with per-layer widths (``secateurs_shapes`` in its config) is rebuilt
    by :func:`per_layer_class` from the installed package; ``auto_map`` and any ``.py`` file in the
    folder are ignored. A folder whose config asks for its own code and has no stock class is refused
    unless the user passed ``trust_remote_code``.
    """
    if trust_remote_code:
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)
    if config is None:
        config = AutoConfig.from_pretrained(
            folder, trust_remote_code=False, local_files_only=kwargs.get("local_files_only", False)
        )
    stock = _config_stock_class(config)
    if getattr(config, SHAPES_KEY, None):
        if stock is None:
            raise UsageError(f"{folder}: its config names no transformers model class to rebuild the per-layer widths on")
        return per_layer_class(stock).from_pretrained(folder, config=config, trust_remote_code=False, **kwargs)
    auto_map = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if auto_map and stock is None:
        raise UsageError(
            f"{folder} asks to run its own Python code ({auto_map}); secateurs never runs code from a model "
            "folder unless you pass --trust-remote-code (trust_remote_code=True) after reading that code"
        )
    return AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=False, **kwargs)


def load_sliced(folder: str | Path, **kwargs) -> PreTrainedModel:
    """Reload a width-pruned folder (uniform or per-layer) with the package's code, never the folder's."""
    return load_pretrained(folder, **kwargs)


__all__ = [
    "apply_widths",
    "keep_linear",
    "load_pretrained",
    "load_sliced",
    "mask_groups",
    "per_layer_class",
    "remote_code_files",
    "resize_parameters",
    "skeleton_class",
    "slice_groups",
    "update_config",
]
