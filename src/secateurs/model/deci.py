"""Per-layer widths in the ``block_configs`` layout of NVIDIA's heterogeneous Llama models (DeciLM /
Nemotron-NAS: Llama-3.1-Nemotron-51B and the rest of its family), which vLLM serves natively
(``DeciLMForCausalLM``) and llama.cpp converts (its "deci" architecture).

Our own per-layer folders (:mod:`secateurs.model.per_layer`) run only through secateurs or a
``modeling_secateurs.py`` that a ``transformers`` user must trust. This layout is one that serving
engines already run. The config is the Llama config plus, per layer, an ``attention`` entry
(``n_heads_in_group``: query heads per KV head, the query head count being the model's one) and an
``ffn`` entry (``ffn_mult``); the weights keep the Llama names. What the layout can hold, as vLLM's
``nemotron_nas.py`` and NVIDIA's ``block_config.py`` read it:

* every layer has the model's ``num_attention_heads`` query heads; only the KV heads vary;
* an FFN width ``w`` is stored as ``ffn_mult``, read back as ``floor(2 * ffn_mult * hidden / 3)``
  rounded up to a multiple of 256 (NVIDIA's config class first rounds ``ffn_mult`` to 6 decimals),
  so only multiples of 256 are expressible (:func:`ffn_mult_for`);
* biases are all or nothing: ``attention_bias`` gives q/k/v/o biases to every layer, ``mlp_bias``
  gate/up/down biases. FLAP's output biases are written that way, with zero biases where the model
  has none, which changes no output;
* a layer without attention or FFN (``no_op``) exists in the format; our depth pruning removes whole
  layers, so it is never written, and a folder holding one is refused on reading.

A model the layout cannot hold (per-layer query heads, an FFN width that no ``ffn_mult`` gives back,
a non-Llama architecture) gets one line saying why; :mod:`secateurs.model.save` then writes our own
per-layer folder instead. Reading a folder back (:data:`DECI_FORMAT`) builds the per-layer model
from ``block_configs`` with the package's own class (:func:`secateurs.model.per_layer.per_layer_class`);
the ``configuration_decilm.py`` written beside the weights (for vLLM's ``--trust-remote-code``) is
never run by secateurs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ..errors import UsageError
from .arch import ArchSpec
from .groups import head_geometry
from .linear import in_features
from .formats import FolderFormat, register_folder_format
from .per_layer import SHAPES_KEY

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
FFN_MULTIPLE = 256
MULT_DECIMALS = 6  # NVIDIA's FFNConfig rounds ffn_mult to this many decimals when it reads it
CONFIG_MODULE = "configuration_decilm"
SHARD_SIZE = "5GB"
ARCH_TYPES = ("llama", "mistral")  # Llama's layers; Mistral's are the same without a sliding window
# Config keys the format moves into block_configs (NVIDIA's config class deletes them globally).
PER_LAYER_KEYS = ("intermediate_size", "num_key_value_heads")


class NotExpressible(UsageError):
    """The model has something the ``block_configs`` layout cannot hold (the message says what)."""


def ffn_mult_to_intermediate(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width the format's readers build from ``ffn_mult`` (vLLM's, llama.cpp's and NVIDIA's rule)."""
    width = int(2 * round(ffn_mult, MULT_DECIMALS) * hidden_size / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


def ffn_mult_for(width: int, hidden_size: int) -> float | None:
    """An ``ffn_mult`` the readers turn back into exactly ``width``, or None when none does (the rule
    only gives multiples of 256). Tries the nearest 6-decimal values, since the readers round to them."""
    if width <= 0 or width % FFN_MULTIPLE:
        return None
    centre = round(3 * width / (2 * hidden_size), MULT_DECIMALS)
    step = 10.0**-MULT_DECIMALS
    for offset in (0, -1, 1, -2, 2):
        mult = round(centre + offset * step, MULT_DECIMALS)
        if mult > 0 and ffn_mult_to_intermediate(mult, hidden_size) == width:
            return mult
    return None


@dataclass(frozen=True)
class DeciPlan:
    """What a model becomes in the layout: the config to write and the zero biases that fold ours in."""

    config: dict
    zero_biases: dict[str, tuple[int, ...]]
    notes: tuple[str, ...]


def check_architecture(config) -> None:
    """Refuse, before any work, a model whose layers are not Llama's: the layout is Llama's with per-layer sizes."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCH_TYPES:
        raise UsageError(
            f"--save-format deci writes Llama-family models (model_type {', '.join(ARCH_TYPES)}); this one is "
            f"{model_type!r}: use --save-format hf"
        )
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        raise UsageError("--save-format deci has no sliding-window attention; this Mistral model uses one: use --save-format hf")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UsageError(f"--save-format deci: readers build SiLU gated MLPs; this model uses {config.hidden_act!r}")


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def plan(model: PreTrainedModel, spec: ArchSpec) -> DeciPlan:
    """The ``block_configs`` config of ``model``; raises :class:`NotExpressible` (one line) when the
    layout cannot hold it, and UsageError when the architecture is not Llama's."""
    config = model.config
    check_architecture(config)
    hidden = int(config.hidden_size)
    blocks = spec.blocks_of(model)
    expected = {f"{path}.{leaf}" for path in spec.attention + spec.mlp for leaf in ("weight", "bias")}
    expected |= {f"{path}.weight" for path in spec.norms}
    block_configs, q_counts, zero_biases = [], [], {}
    head_dim = head_geometry(spec, config, blocks[0]).head_dim
    has_bias = {"attention": False, "mlp": False}
    for index, block in enumerate(blocks):
        stray = {name for name, _ in block.named_parameters()} - expected
        stray |= {path for path in spec.attention + spec.mlp if not isinstance(block.get_submodule(path), nn.Linear)}
        if stray:
            raise NotExpressible(f"layer {index} holds {', '.join(sorted(stray))}, which block_configs has no place for")
        q_proj, k_proj = (block.get_submodule(path) for path in spec.attention[:2])
        q_heads, kv_heads = q_proj.out_features // head_dim, k_proj.out_features // head_dim
        q_counts.append(q_heads)
        width = in_features(block.get_submodule(spec.mlp[-1]))
        mult = ffn_mult_for(width, hidden)
        if mult is None:
            raise NotExpressible(
                f"layer {index} keeps {width} MLP channels; block_configs stores the FFN width as ffn_mult, which "
                f"gives only multiples of {FFN_MULTIPLE} (width pruning's --round-to {FFN_MULTIPLE} keeps one)"
            )
        if q_heads % kv_heads:
            raise NotExpressible(f"layer {index} has {q_heads} query heads for {kv_heads} KV heads, not a whole number per group")
        block_configs.append({
            "attention": {"n_heads_in_group": q_heads // kv_heads, "no_op": False, "replace_with_linear": False},
            "ffn": {"ffn_mult": mult, "no_op": False, "replace_with_linear": False},
        })
        for kind, paths in (("attention", spec.attention), ("mlp", spec.mlp)):
            has_bias[kind] |= any(_bias_of(block.get_submodule(path)) is not None for path in paths)
    if len(set(q_counts)) > 1:
        raise NotExpressible(
            f"layers keep {min(q_counts)} to {max(q_counts)} query heads; block_configs gives every layer the "
            "model's one query head count and varies only the KV heads"
        )
    for index, block in enumerate(blocks):
        for kind, paths in (("attention", spec.attention), ("mlp", spec.mlp)):
            if not has_bias[kind]:
                continue
            for path in paths:
                module = block.get_submodule(path)
                if _bias_of(module) is None:
                    zero_biases[f"{spec.blocks}.{index}.{path}.bias"] = (module.weight.shape[0],)
    notes = []
    if zero_biases:
        flags = " and ".join(f"{k}_bias" for k in ("attention", "mlp") if has_bias[k])
        notes.append(f"the model's extra biases are written as the format's {flags}, with zero biases where it has none (exact)")
    return DeciPlan(_config_dict(model, q_counts[0], head_dim, block_configs, has_bias), zero_biases, tuple(notes))


def _config_dict(model: PreTrainedModel, heads: int, head_dim: int, block_configs: list[dict], bias: dict[str, bool]) -> dict:
    """The Llama config with the per-layer sizes moved into ``block_configs``; rope written both the way
    NVIDIA's (older transformers) config class reads it and the way current ones do."""
    data = model.config.to_dict()
    for key in (*PER_LAYER_KEYS, SHAPES_KEY, "auto_map", "sliding_window", "use_sliding_window", "max_window_layers",
                "layer_types", "transformers_version"):
        data.pop(key, None)
    rope = dict(data.get("rope_parameters") or {})
    if rope:
        data["rope_theta"] = rope.get("rope_theta", 10000.0)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            data["rope_scaling"] = scaling
    dtype = next(model.parameters()).dtype
    data.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        num_attention_heads=heads,
        head_dim=head_dim,
        attention_bias=bias["attention"],
        o_proj_bias=bias["attention"],
        mlp_bias=bias["mlp"],
        hidden_act="silu",
        block_configs=block_configs,
        dtype=str(dtype).removeprefix("torch."),
        torch_dtype=str(dtype).removeprefix("torch."),
        auto_map={"AutoConfig": f"{CONFIG_MODULE}.DeciLMConfig"},
    )
    return data


def write_folder(model: PreTrainedModel, spec: ArchSpec, folder: Path, deci: DeciPlan) -> None:
    """Write ``config.json``, the weights (Llama names, sharded safetensors) and the config class vLLM
    loads with ``--trust-remote-code`` into ``folder`` (a temporary folder the caller renames)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == f"{spec.lm_head}.weight":
            continue
        tensors[name] = tensor.detach().to("cpu").contiguous()
    dtype = next(model.parameters()).dtype
    for name, shape in deci.zero_biases.items():
        tensors[name] = torch.zeros(shape, dtype=dtype)
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(deci.config, indent=2, sort_keys=True) + "\n")
    (folder / f"{CONFIG_MODULE}.py").write_text(CONFIG_SOURCE)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)


# A config class of our own (not NVIDIA's): what vLLM reads of block_configs is attribute access
# (block.attention.no_op, .n_heads_in_group, .ffn.ffn_mult), which a plain JSON list does not give.
CONFIG_SOURCE = '''"""DeciLM / Nemotron-NAS config for a folder written by secateurs (``block_configs``, per layer).

vLLM reads this folder as ``DeciLMForCausalLM``; ``transformers`` knows no ``nemotron-nas`` config,
so vLLM needs ``--trust-remote-code`` to use this class. It only turns each ``block_configs`` entry
into attributes (``block.attention.n_heads_in_group``, ``block.ffn.ffn_mult``). secateurs reads the
folder without it.
"""

from transformers import PretrainedConfig


class Subblock:
    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_dict(self):
        return dict(self.__dict__)


class Block:
    def __init__(self, attention, ffn, **extra):
        self.attention = Subblock(**attention)
        self.ffn = Subblock(**ffn)
        self.__dict__.update(extra)

    def to_dict(self):
        return {key: value.to_dict() if isinstance(value, Subblock) else value for key, value in self.__dict__.items()}


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [Block(**block) if isinstance(block, dict) else block for block in block_configs or []]
        super().__init__(**kwargs)

    def to_dict(self):
        data = super().to_dict()
        data["block_configs"] = [block.to_dict() for block in self.block_configs]
        return data
'''


def is_deci_folder(folder: Path) -> bool:
    """Whether ``folder``'s config is a ``block_configs`` one (read as JSON; no code runs)."""
    data = _read_json(folder)
    return data is not None and (data.get("model_type") == MODEL_TYPE or ARCHITECTURE in (data.get("architectures") or []))


def _read_json(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: object, what: str, folder: Path, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise UsageError(f"{folder}: {what} is {value!r}, not a positive number")
    return value


def layer_sizes(data: dict, folder: Path) -> list[tuple[int, int]]:
    """(KV heads, FFN width) of every layer of a ``block_configs`` config, checked as the format's readers do."""
    blocks = data.get("block_configs")
    heads = int(_number(data.get("num_attention_heads"), "num_attention_heads", folder))
    hidden = int(_number(data.get("hidden_size"), "hidden_size", folder))
    layers = data.get("num_hidden_layers")
    if not isinstance(blocks, list) or len(blocks) != layers:
        raise UsageError(f"{folder}: block_configs must list one entry per layer ({layers}), got {type(blocks).__name__}")
    sizes = []
    for index, block in enumerate(blocks):
        attention, ffn = (block.get(part) if isinstance(block, dict) else None for part in ("attention", "ffn"))
        if not isinstance(attention, dict) or not isinstance(ffn, dict):
            raise UsageError(f"{folder}: block_configs[{index}] needs an attention and an ffn entry")
        for part, entry in (("attention", attention), ("ffn", ffn)):
            if entry.get("no_op") or entry.get("replace_with_linear"):
                raise UsageError(
                    f"{folder}: layer {index} has no {part} ({'no_op' if entry.get('no_op') else 'replace_with_linear'}); "
                    "secateurs reads block_configs folders whose every layer has attention and an FFN"
                )
        group = _number(attention.get("n_heads_in_group"), f"layer {index}'s n_heads_in_group", folder)
        if int(group) != group or heads % int(group):
            raise UsageError(f"{folder}: layer {index}'s n_heads_in_group {group} does not divide {heads} query heads")
        if "ffn_mult" in ffn:
            width = ffn_mult_to_intermediate(_number(ffn["ffn_mult"], f"layer {index}'s ffn_mult", folder), hidden)
        else:
            width = int(_number(ffn.get("intermediate_size"), f"layer {index}'s ffn_mult / intermediate_size", folder))
        sizes.append((heads // int(group), width))
    return sizes


def llama_config(folder: Path) -> LlamaConfig:
    """The Llama config (with our per-layer shapes) that rebuilds a ``block_configs`` folder's model.

    A query head count that does not divide the hidden size (a pruned one) is valid in the format but
    not in ``LlamaConfig``; the config then holds a stand-in count and the shapes record the real ones,
    as :func:`secateurs.model.per_layer.update_config` does."""
    data = _read_json(folder)
    if data is None:
        raise UsageError(f"{folder}/config.json is not a JSON object")
    sizes = layer_sizes(data, folder)
    heads, hidden = int(data["num_attention_heads"]), int(data["hidden_size"])
    head_dim = int(data.get("head_dim") or hidden // heads)
    attention_bias = bool(data.get("attention_bias")) or bool(data.get("o_proj_bias"))
    mlp_bias = bool(data.get("mlp_bias"))
    keep = {key: value for key, value in data.items()
            if key not in ("block_configs", "auto_map", "architectures", "model_type", "rope_theta", "rope_scaling",
                           "o_proj_bias", "torch_dtype", SHAPES_KEY, *PER_LAYER_KEYS)}
    if not keep.get("rope_parameters"):
        scaling = data.get("rope_scaling") or {"rope_type": "default"}
        keep["rope_parameters"] = {**scaling, "rope_theta": data.get("rope_theta", 10000.0)}
    keep.update(head_dim=head_dim, num_attention_heads=heads if hidden % heads == 0 else 1,
                num_key_value_heads=max(kv for kv, _ in sizes), intermediate_size=max(width for _, width in sizes),
                attention_bias=attention_bias, mlp_bias=mlp_bias, architectures=["LlamaForCausalLM"])
    try:
        config = LlamaConfig(**keep)
    except Exception as exc:  # transformers' config validation raises several types
        raise UsageError(f"{folder}: its block_configs config does not make a Llama config: {str(exc).splitlines()[0]}") from None
    with torch.device("meta"):
        stock = {name: list(p.shape) for name, p in LlamaForCausalLM(config).named_parameters()}
    shapes: dict[str, dict[str, list[int]]] = {}
    for index, (kv, width) in enumerate(sizes):
        wanted = {"self_attn.q_proj": ([heads * head_dim, hidden], attention_bias),
                  "self_attn.k_proj": ([kv * head_dim, hidden], attention_bias),
                  "self_attn.v_proj": ([kv * head_dim, hidden], attention_bias),
                  "self_attn.o_proj": ([hidden, heads * head_dim], attention_bias),
                  "mlp.gate_proj": ([width, hidden], mlp_bias), "mlp.up_proj": ([width, hidden], mlp_bias),
                  "mlp.down_proj": ([hidden, width], mlp_bias)}
        for path, (weight, bias) in wanted.items():
            module = f"model.layers.{index}.{path}"
            params = {"weight": weight, **({"bias": weight[:1]} if bias else {})}
            differing = {leaf: shape for leaf, shape in params.items() if stock.get(f"{module}.{leaf}") != shape}
            if differing:
                shapes[module] = differing
    if shapes:
        setattr(config, SHAPES_KEY, shapes)
    return config


def _restore(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    """Give each attention module its own query-per-KV group count (the stock one comes from the
    config's counts: the widest layer's KV heads, perhaps a stand-in query count)."""
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.num_key_value_groups = attention.q_proj.out_features // attention.k_proj.out_features


DECI_FORMAT = FolderFormat(name="deci", detect=is_deci_folder, restore=_restore, config=llama_config)
register_folder_format(DECI_FORMAT)

__all__ = [
    "ARCHITECTURE",
    "DECI_FORMAT",
    "MODEL_TYPE",
    "DeciPlan",
    "NotExpressible",
    "check_architecture",
    "ffn_mult_for",
    "ffn_mult_to_intermediate",
    "is_deci_folder",
    "layer_sizes",
    "llama_config",
    "plan",
    "write_folder",
]
