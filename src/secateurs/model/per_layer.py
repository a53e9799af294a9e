"""Models whose blocks differ in width: the config that describes them, and the class that rebuilds them.

After width surgery (:mod:`secateurs.model.slice`), :func:`update_config` makes the config describe
the model:

* Uniform widths: the config's head / KV-head / intermediate sizes are set, so the saved folder
  loads with plain ``AutoModelForCausalLM.from_pretrained`` and no custom code.
* Different widths per block (or parameters the stock config cannot express, such as an output
  bias added by FLAP's compensation): the config keeps the largest widths and records the exact
  shape of every parameter that differs in ``secateurs_shapes``; ``auto_map`` points to a small
  ``modeling_secateurs.py`` saved beside the weights (:func:`remote_code_files`), a subclass of the
  original model class that builds the stock model and then resizes exactly those parameters. Plain
  ``transformers`` users load it with ``from_pretrained(folder, trust_remote_code=True)`` (their
  choice to run that file). secateurs itself never runs code from a model folder:
  :func:`load_pretrained` rebuilds the same subclass (:func:`per_layer_class`) from the package's own
  :func:`resize_parameters` and reads only the config and the weights. Per-layer sizes rather than
  zero-padding keep the parameters and the speed that were won.
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
from .groups import head_geometry
from .linear import in_features

REMOTE_MODULE = "modeling_secateurs"
SHAPES_KEY = "secateurs_shapes"


def update_config(model: PreTrainedModel, spec: ArchSpec) -> None:
    """Set the config's sizes to the blocks' (largest) widths; record shapes it cannot express."""
    config = spec.text_config(model.config)  # sizes live in a multimodal model's text config
    blocks = spec.blocks_of(model)
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
    record_shapes(model)


def record_shapes(model: PreTrainedModel) -> None:
    """Record in the config the shape of every parameter (or buffer) the stock class would not build
    from it, pointing ``auto_map`` at the per-layer class; clear both when there is none. Called after
    the config's own sizes were set to the largest block's (widths, or an MoE layer's expert count)."""
    top = model.config
    if hasattr(top, SHAPES_KEY):
        delattr(top, SHAPES_KEY)
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
    """Parameters and buffers whose shape (or existence) differs from what the stock class builds from
    the config (buffers: DeepSeek-V3's per-expert score-correction bias after expert pruning)."""
    config = _stock_config(model)
    with torch.device("meta"):
        stock = _stock_class(model)(config)
    buffers = {name: tuple(b.shape) for name, b in stock.named_buffers()}
    expected = {**buffers, **{name: tuple(p.shape) for name, p in stock.named_parameters()}}
    differing: dict[str, dict[str, list[int]]] = {}
    resized = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in buffers)]
    for name, param in resized:
        if expected.get(name) != tuple(param.shape):
            module, _, leaf = name.rpartition(".")
            differing.setdefault(module, {})[leaf] = list(param.shape)
    return differing


def resize_parameters(model: nn.Module, shapes: dict[str, dict[str, list[int]]]) -> None:
    """Give every parameter (or buffer) listed in ``shapes`` (module path -> name -> shape) that shape,
    creating a parameter if the stock module lacks it (FLAP's output bias), before the weights are
    loaded; an MoE router or experts module also learns its expert count (the rows of what it holds)."""
    for path, params in shapes.items():
        module = model.get_submodule(path)
        for leaf, shape in params.items():
            old = getattr(module, leaf, None)
            like = old if isinstance(old, torch.Tensor) else module.weight
            fresh = torch.empty(shape, dtype=like.dtype, device=like.device)
            if leaf in module._buffers:
                module.register_buffer(leaf, fresh, persistent=leaf not in module._non_persistent_buffers_set)
            else:
                setattr(module, leaf, nn.Parameter(fresh))
        weight = getattr(module, "weight", None)
        if hasattr(module, "nf"):
            module.nf = weight.shape[1]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        if hasattr(module, "num_experts"):
            module.num_experts = next(iter(params.values()))[0]


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
    "load_pretrained",
    "load_sliced",
    "per_layer_class",
    "record_shapes",
    "remote_code_files",
    "resize_parameters",
    "skeleton_class",
    "update_config",
]
