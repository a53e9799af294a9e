"""Resume checkpoints without pickle: one safetensors file whose tensors are the state's tensors and
whose metadata is the rest of the state as JSON.

A checkpoint folder is something a user may have downloaded or been handed, so reading it must never
run code (``torch.load`` without ``weights_only`` unpickles arbitrary objects). The state the training
loops save (model / adapter tensors, optimizer, scheduler and grad-scaler state, RNG state, loss
history) is nested dicts, lists and tuples of numbers, strings and tensors; it is encoded as JSON in
which every container is tagged (so int and tuple keys of optimizer and LoRAPrune state survive) and
every tensor is a reference into the safetensors file. Anything else in a file, or a file that is not
this format, is refused with one line naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import UsageError
from ..files import os_reason, write_atomic

STATE_KEY = "secateurs_state"
FORMAT = 1
LEGACY_SUFFIX = ".pt"


def _encode(value: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        name = f"t{len(tensors)}"
        tensors[name] = tensor
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors, storages) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, storages) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ValueError(f"unexpected entry {sorted(value)}")
    (kind, body), = value.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    if kind == "dict":
        out = {}
        for key, item in body:
            key = _decode(key, tensors)
            if not isinstance(key, (str, int, float, bool, tuple)) and key is not None:
                raise ValueError(f"a {type(key).__name__} cannot be a key")
            out[key] = _decode(item, tensors)
        return out
    raise ValueError(f"unknown entry {kind!r}")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: an interrupted run leaves the previous checkpoint or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    document = json.dumps({"format": FORMAT, "state": _encode(state, tensors, set())})
    try:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={STATE_KEY: document}))
    except (OSError, SafetensorError) as exc:
        raise UsageError(
            f"could not write the checkpoint {path}: {os_reason(exc)}; the previous one is kept, rerun the same command to resume from it"
        ) from None


def damaged(path: Path, reason: object) -> UsageError:
    """The one-line error for a checkpoint that cannot be used."""
    text = str(reason).strip().splitlines()[0][:200] if str(reason).strip() else type(reason).__name__
    return UsageError(
        f"the checkpoint {path} is damaged or not a secateurs checkpoint ({text}); delete it or choose another --checkpoint-dir"
    )


def _document(f, path: Path) -> dict:
    try:
        document = json.loads((f.metadata() or {})[STATE_KEY])
    except (KeyError, ValueError, TypeError) as exc:
        raise damaged(path, f"no readable {STATE_KEY} entry: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise damaged(path, f"not format {FORMAT}")
    return document


def read_checkpoint(path: Path, tensors: bool = True) -> dict:
    """The state saved at ``path`` (no pickle, nothing executed); one line if it is not one of ours.

    With ``tensors=False`` only the structure is checked (every tensor it names is present), which
    is cheap enough to do before the model loads.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            document = _document(f, path)
            names = set(f.keys())
            store = {name: f.get_tensor(name) for name in names} if tensors else dict.fromkeys(names)
        state = _decode(document["state"], store)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise damaged(path, exc) from None
    if not isinstance(state, dict):
        raise damaged(path, "its state is not a mapping")
    return state


def _legacy(path: Path) -> Path | None:
    legacy = path.with_suffix(LEGACY_SUFFIX)
    return legacy if legacy != path and legacy.exists() else None


def check_checkpoints(paths: list[Path]) -> None:
    """Before any work: every checkpoint that a run would resume from is readable and not pickle."""
    for path in paths:
        legacy = _legacy(path)
        if legacy is not None:
            raise _pickle_error(legacy)
        if path.exists():
            read_checkpoint(path, tensors=False)


def _pickle_error(legacy: Path) -> UsageError:
    return UsageError(
        f"{legacy} is a pickle checkpoint, which secateurs never opens (it could run code); "
        "delete it to start over, or choose another --checkpoint-dir"
    )


def load_checkpoint(path: Path, digest: str) -> dict | None:
    """The checkpoint at ``path`` if one exists; a clear error if it belongs to another run.

    A pickle checkpoint of an older secateurs (``.pt`` beside it) is never opened: it is named so
    the user can delete it.
    """
    check_checkpoints([path])
    if not path.is_file():
        return None
    state = read_checkpoint(path)
    if state.get("digest") != digest:
        raise UsageError(
            f"the checkpoint {path} was made with other settings or another model; "
            "delete it or choose another --checkpoint-dir"
        )
    return state


@contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Apply a loaded state; a field of the wrong kind or shape becomes the one-line error."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise damaged(path, exc) from None
