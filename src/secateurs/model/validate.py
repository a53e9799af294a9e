"""Numbers a model folder states, checked before anything is built or allocated from them.

A ``config.json`` sizes the model that is built (a million layers are a million modules, even on
the meta device; a hidden size of 10⁹ is a terabyte once streaming allocates it), and a safetensors
header says what each stored tensor is. Neither is trusted:

- :func:`check_config`: the decoder's sizes are positive integers, and no larger than the weights
  beside the config hold (the layer count, hidden size and vocabulary their headers imply), before
  any skeleton is built;
- :func:`check_tensors`: every stored tensor that the built model also has matches its shape, and
  is floating point where the model's is (an ``I32`` weight would otherwise be cast to floats and
  saved as a garbage model).

Every failure is one :class:`UsageError` line naming the file and the number at fault.
"""

from __future__ import annotations

import numbers
import re

from torch import nn

from ..errors import UsageError
from .arch import ArchSpec
from .shards import DTYPES, ShardReader

# Ceilings for a config with no safetensors headers to compare against (a GGUF file, a hub id,
# .bin weights): far above any released decoder (about 130 layers, widths in the tens of
# thousands, vocabularies of a few hundred thousand), low enough that building the skeleton is quick.
MAX_LAYERS = 10_000
MAX_WIDTH = 2**24
# Stored dtypes that hold integers: never loaded into a floating-point weight.
INTEGER_CODES = frozenset({"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"})


def check_config(config, spec: ArchSpec, reader: ShardReader | None, source: str) -> None:
    """Refuse a config whose decoder sizes are not positive integers, exceed the ceilings, or exceed
    what ``reader``'s headers hold (None: no headers to compare against)."""
    text = spec.text_config(config)
    keys = [spec.num_layers_key, "hidden_size", "vocab_size", spec.heads_key, spec.kv_heads_key,
            spec.intermediate_key, spec.head_dim_key]
    for key in dict.fromkeys(k for k in keys if k is not None):
        value = getattr(text, key, None)
        if value is None:
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{source}: its config gives {key} = {value!r}; it must be a positive integer")
        ceiling = MAX_LAYERS if key == spec.num_layers_key else MAX_WIDTH
        if value > ceiling:
            raise UsageError(f"{source}: its config gives {key} = {value}, over secateurs' limit of {ceiling}; the config is corrupt")
    if reader is not None:
        _check_against_weights(text, spec, reader, source)


def _check_against_weights(text, spec: ArchSpec, reader: ShardReader, source: str) -> None:
    """The layer count, hidden size and vocabulary the headers imply, where their names show them."""
    layers = getattr(text, spec.num_layers_key)
    held = _stored_layers(reader, spec.blocks)
    if held is not None and layers > held:
        raise UsageError(
            f"{source}: config.json gives {spec.num_layers_key} = {layers}, but its weights hold {held} layers; "
            "the config does not belong to these weights"
        )
    for key, tensor, axis in (("hidden_size", f"{spec.final_norm}.weight", 0), ("vocab_size", f"{spec.embeddings[0]}.weight", 0)):
        shape = reader.shapes.get(tensor)
        value = getattr(text, key, None)
        if shape and value is not None and value != shape[axis]:
            raise UsageError(
                f"{source}: config.json gives {key} = {value}, but {tensor} in {reader.keys[tensor]} has shape {shape}; "
                "the config does not belong to these weights"
            )


def _stored_layers(reader: ShardReader, blocks: str) -> int | None:
    """How many blocks the headers hold: distinct indices under the spec's blocks path, else (a
    checkpoint that names its weights differently) the most under any ``….<last part>.<i>.``
    path; None where no name shows a block."""
    found: dict[str, set[str]] = {}
    pattern = re.compile(rf"^(.*?\b{re.escape(blocks.rpartition('.')[2])})\.(\d+)\.")
    for key in reader.keys:
        match = pattern.match(key)
        if match:
            found.setdefault(match.group(1), set()).add(match.group(2))
    if blocks in found:
        return len(found[blocks])
    return max((len(indices) for indices in found.values()), default=None)


def check_tensors(model: nn.Module, reader: ShardReader, source: str, streamed_prefix: str | None = None) -> None:
    """Every tensor both ``model`` (usually a weightless skeleton) and the headers have: same shape,
    and floating point where the model's is. ``streamed_prefix`` (the blocks path, when streaming
    reads the shards itself): every tensor streaming will read must also be in a dtype it reads."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in reader.shapes:
            continue
        where = f"{source}: tensor {key} in {reader.keys[key]}"
        if reader.shapes[key] != list(value.shape):
            raise UsageError(
                f"{where} has shape {reader.shapes[key]}, but config.json builds {list(value.shape)}; "
                "the config does not belong to these weights, or the file is corrupt"
            )
        if value.is_floating_point() and reader.dtypes[key] in INTEGER_CODES:
            raise UsageError(
                f"{where} is stored as {reader.dtypes[key]}, but the model needs floating-point weights there; "
                "re-download or re-export the model"
            )
    if streamed_prefix is None:
        return
    for key, code in reader.dtypes.items():
        read = key in expected or not key.startswith(f"{streamed_prefix}.")
        if read and code not in DTYPES:
            raise UsageError(
                f"{source}: tensor {key} in {reader.keys[key]} has dtype {code}, which streaming cannot read; "
                "prune without --stream"
            )
