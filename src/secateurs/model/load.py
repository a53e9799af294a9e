"""Turn what a user typed as MODEL (:mod:`secateurs.model.sources`) into a float ``transformers``
model, its tokenizer (:mod:`secateurs.model.tokenizer`) and ArchSpec, checking its config and its
stored tensors' shapes first; a folder of a registered layout (:mod:`secateurs.model.formats`) gets
its replaced modules put back. Also MODEL's config, its weightless skeleton and its size, read without
loading the weights.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from ..errors import UsageError, first_line
from .arch import ArchSpec, spec_for
from .formats import _own_config, folder_formats
from .per_layer import load_pretrained, skeleton_class
from .shards import ShardReader, read_header
from .sources import SHORTCUTS, _load_gguf, _resolve, _shortcut_folder, gguf_alone, hub_reachable, local_folder, model_folder
from .tokenizer import _try_tokenizer, check_tokenizer
from .validate import check_config, check_tensors

__all__ = ["SHORTCUTS", "LoadedModel", "check_tokenizer", "load_config", "load_model", "load_skeleton", "local_folder",
           "model_bytes", "model_folder", "resolve_dtype"]  # SHORTCUTS, check_tokenizer, local_folder, model_folder: where callers found them

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bytes per element of the integer tensors a safetensors header names (sparse exports store some).
_INTEGER_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


@dataclass
class LoadedModel:
    """A model ready for pruning: float weights, eval mode, its tokenizer and ArchSpec."""

    model: PreTrainedModel
    tokenizer: object | None
    spec: ArchSpec
    source: str
    local_path: Path | None


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(source: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """Load MODEL (folder, hub id, .gguf file or shortcut) as a plain float model on the CPU.

    No code from a model folder or hub repository runs unless ``trust_remote_code`` is set (the
    user's explicit choice): secateurs' own per-layer-width folders are rebuilt by the package.
    """
    torch_dtype = resolve_dtype(dtype)
    kind, where = _resolve(source)
    if kind == "shortcut":
        return _load_folder(_shortcut_folder(source), torch_dtype, source)
    if kind == "gguf":
        model, tokenizer = _load_gguf(where, torch_dtype, trust_remote_code)
        return LoadedModel(model, tokenizer, spec_for(model), source, where.resolve())
    if kind == "folder":
        return _load_folder(where, torch_dtype, source, trust_remote_code)
    return _load_hub(source, torch_dtype, trust_remote_code)


def load_config(source: str, trust_remote_code: bool = False):
    """MODEL's config without its weights (a shortcut's folder is built once, as loading would)."""
    kind, where = _resolve(source)
    try:
        if kind == "gguf":
            with gguf_alone(where) as alone:
                config = AutoConfig.from_pretrained(alone.parent, gguf_file=alone.name, trust_remote_code=trust_remote_code)
        else:
            folder = _shortcut_folder(source) if kind == "shortcut" else where
            config = _folder_config(folder, trust_remote_code)[0]
    except UsageError:
        raise
    except Exception as exc:  # transformers raises many types for a broken config
        raise UsageError(f"could not load the model in {source}: {first_line(exc)}") from exc
    check_config(config, spec_for(config), _shards(source), source)
    return config


def load_skeleton(source: str, trust_remote_code: bool = False) -> LoadedModel | None:
    """MODEL's architecture with every weight on the meta device (no memory, nothing read but the
    config), so each flag can be checked against its real shapes before the weights load; None when
    only code from the model folder could build it."""
    config = load_config(source, trust_remote_code)
    if hasattr(config, "quantization_config"):  # a GGUF's: the loaded model is plain float
        del config.quantization_config
    model = _skeleton(config)
    if model is None:
        return None
    reader = _shards(source)
    if reader is not None:
        check_tensors(model, reader, source)
    path = Path(source).expanduser()
    return LoadedModel(model.eval(), None, spec_for(model), source, path.resolve() if path.exists() else None)


def _skeleton(config) -> PreTrainedModel | None:
    """``config``'s model with every weight on the meta device (built on a copy, which building may
    annotate); None when only code from the model folder could build it."""
    cls = skeleton_class(config)
    if cls is None:
        return None
    with torch.device("meta"):
        return cls(copy.deepcopy(config))


def _shards(source: str) -> ShardReader | None:
    """The checked safetensors headers of MODEL's local folder; None for a hub id, a GGUF file or a
    folder whose weights are not safetensors."""
    folder = local_folder(source)
    return ShardReader.of(folder) if folder is not None else None


def model_bytes(source: str, dtype: str = "float32") -> int | None:
    """Bytes of MODEL's tensors once loaded in ``dtype``, read from its safetensors headers (no
    weights read); None when that is not known before loading (hub id, .gguf, .bin weights)."""
    folder = local_folder(source)
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    if not files:
        return None
    itemsize = resolve_dtype(dtype).itemsize
    total = 0
    try:
        for file in files:
            for info in read_header(file, file.parent)[0].values():
                stored = info["dtype"]
                total += math.prod(info["shape"]) * (itemsize if stored.startswith(("F", "BF")) else _INTEGER_BYTES.get(stored, 8))
    except (OSError, UsageError):
        return None  # the load itself will name the broken shard
    return total


def _finish(model: PreTrainedModel, tokenizer, source: str, path: Path | None) -> LoadedModel:
    spec = spec_for(model)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, spec, source, path)


def _folder_config(folder: Path, trust_remote_code: bool) -> tuple[object, bool]:
    """A folder's config, and whether the package rebuilds it whatever ``trust_remote_code`` says."""
    own = _own_config(folder)
    if own is not None:
        return own, True
    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), False


def _load_folder(folder: Path, dtype: torch.dtype, source: str, trust_remote_code: bool = False) -> LoadedModel:
    try:
        config, own = _folder_config(folder, trust_remote_code)
        trust_remote_code = trust_remote_code and not own
        reader = ShardReader.of(folder)
        check_config(config, spec_for(config), reader, source)
        skeleton = _skeleton(config) if reader is not None else None
        if skeleton is not None:  # before loading: a stored shape the config does not build would be allocated
            check_tensors(skeleton, reader, source)
        formats = [fmt for fmt in folder_formats().values() if fmt.detect(folder)]
        hf_logger = logging.getLogger("transformers")
        level = hf_logger.level
        if formats:  # its replaced modules have no .weight on purpose: silence the "missing" warning
            hf_logger.setLevel(logging.ERROR)
        for key in {key for fmt in formats for key in fmt.config_keys if hasattr(config, key)}:
            delattr(config, key)
        try:
            model = load_pretrained(folder, None if trust_remote_code else config, trust_remote_code, dtype=dtype)
        finally:
            hf_logger.setLevel(level)
    except UsageError:
        raise
    except Exception as exc:  # transformers raises many types for a broken folder
        raise UsageError(f"could not load the model in {folder}: {first_line(exc)}") from exc
    if reader is not None and skeleton is None:  # built by the folder's own code: checked once built
        check_tensors(model, reader, source)
    for fmt in formats:
        fmt.restore(model, folder, dtype)
    tokenizer = _try_tokenizer(folder, trust_remote_code)
    return _finish(model, tokenizer, source, folder.resolve())


def _load_hub(repo_id: str, dtype: torch.dtype, trust_remote_code: bool = False) -> LoadedModel:
    offline = not hub_reachable()  # then only the local cache is read (check_hub found it there)
    try:
        model = load_pretrained(repo_id, None, trust_remote_code, dtype=dtype, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code, local_files_only=offline)
    except Exception as exc:
        raise UsageError(
            f"could not load {repo_id!r} from the Hugging Face hub ({first_line(exc)}); "
            "without a network pass a local folder or .gguf file instead"
        ) from exc
    return _finish(model, tokenizer, repo_id, None)
