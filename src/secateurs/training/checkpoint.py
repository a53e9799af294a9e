"""Resume checkpoints without pickle: one safetensors file whose tensors are the state's tensors and
whose metadata is the rest of the state as JSON.

A checkpoint folder is something a user may have downloaded or been handed, so reading it must never
run code (``torch.load`` without ``weights_only`` unpickles arbitrary objects). The state the training
loops save (model / adapter tensors, optimizer, scheduler and grad-scaler state, RNG state, loss
history) is nested dicts, lists and tuples of numbers, strings and tensors; it is encoded as JSON in
which every container is tagged (so int and tuple keys of optimizer and LoRAPrune state survive) and
every tensor is a reference into the safetensors file. Anything else in a file, or a file that is not
this format, is refused with one line naming the file.

Nothing read back is trusted either: before a run resumes, :func:`check_state` compares the state
with the live one (the step within the run, finite losses, every tensor's dtype and shape, every
optimizer setting) so a damaged or edited checkpoint is refused as the cause, with the fix, instead
of silently skipping training, casting an integer tensor, or surfacing later as a diverging loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import jsondoc
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
    """The one-line error for a checkpoint that cannot be used: the file is the cause, deleting it the fix."""
    text = str(reason).strip().splitlines()[0][:200] if str(reason).strip() else type(reason).__name__
    return UsageError(
        f"the checkpoint {path} is damaged or not a secateurs checkpoint of this run ({text}); "
        "delete it to train from the start, or choose another --checkpoint-dir"
    )


def _document(f, path: Path) -> dict:
    try:
        document = jsondoc.loads((f.metadata() or {})[STATE_KEY])
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


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"state", "param_groups"}


def _same(saved: Any, live: Any) -> bool:
    """Equal and of the same type (``True`` is not ``1``, a tensor never equals a setting)."""
    return not isinstance(saved, torch.Tensor) and type(saved) is type(live) and saved == live


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_progress(path: Path, state: dict, total_steps: int) -> tuple[int, list[float]]:
    """The step reached (an integer within the run) and one finite loss per step done."""
    step, losses = state.get("step"), state.get("losses")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total_steps:
        raise damaged(path, f"its step is {step!r}, not a whole number from 0 to the run's {total_steps} steps")
    if not isinstance(losses, list) or len(losses) != step or not all(map(_number, losses)):
        raise damaged(path, f"its losses are not {step} finite numbers, one per step done")
    return step, [float(x) for x in losses]


def _check_optimizer(path: Path, saved: Any, optimizer: torch.optim.Optimizer, steps: int, where: str) -> None:
    """Settings equal to the live optimizer's (the learning rate is the schedule's, checked by the
    loop), state only for its parameters, each tensor of its parameter's dtype and shape."""
    live = optimizer.state_dict()
    if not _is_optimizer_state(saved) or not isinstance(saved["state"], dict) or not isinstance(saved["param_groups"], list):
        raise damaged(path, f"{where} is not an optimizer state")
    if len(saved["param_groups"]) != len(live["param_groups"]):
        raise damaged(path, f"{where} has {len(saved['param_groups'])} parameter groups, the run has {len(live['param_groups'])}")
    for number, (got, want) in enumerate(zip(saved["param_groups"], live["param_groups"])):
        if not isinstance(got, dict) or set(got) != set(want):
            raise damaged(path, f"{where} group {number} has other settings than the run's")
        changed = [key for key in want if key != "lr" and not _same(got[key], want[key])]
        if changed:
            raise damaged(path, f"{where} {', '.join(changed)} differ from the run's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise damaged(path, f"{where} has state for a parameter {index!r} the run does not train")
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise damaged(path, f"{where} state {index}.{name} is {_describe(value)}, not a tensor")
            if name == "step":
                if value.dim() != 0 or not value.is_floating_point() or not 0 <= value.item() <= steps:
                    raise damaged(path, f"{where} step count is {value.tolist()!r}, not 0 to {steps}")
            elif value.dtype != params[index].dtype or value.shape != params[index].shape:
                raise damaged(path, f"{where} state {index}.{name} is {_describe(value)}, "
                                    f"its parameter {_describe(params[index].detach())}")


def _check_leaf(path: Path, saved: Any, live: Any, where: str) -> None:
    """A setting or counter of the type the run has (a finite number where it has a number)."""
    if isinstance(live, bool) or isinstance(live, str):
        ok = type(saved) is type(live)
    elif isinstance(live, int):
        ok = isinstance(saved, int) and not isinstance(saved, bool)
    elif isinstance(live, float):
        ok = _number(saved)
    else:
        ok = True
    if not ok:
        raise damaged(path, f"{where} is {saved!r:.40}, the run has {_describe(live)}")


def check_state(path: Path, saved: dict, live: dict, optimizers: list[torch.optim.Optimizer], steps: int) -> None:
    """``saved`` against the state the run would save (``live``): every tensor the run has at the
    same place has its dtype and shape, containers stay containers, numbers stay finite numbers;
    each optimizer state met (in ``optimizers``' order) is checked against that optimizer; and no
    floating-point tensor anywhere holds NaN or infinity. ``steps`` is the checkpoint's step."""
    pending = list(optimizers)
    stack: list[tuple[Any, Any, str]] = [(saved, live, "state")]
    while stack:
        got, want, where = stack.pop(0)
        if isinstance(want, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
                raise damaged(path, f"{where} is {_describe(got)}, the run has {_describe(want)}")
        elif _is_optimizer_state(want) and pending:
            _check_optimizer(path, got, pending.pop(0), steps, where)
        elif isinstance(want, dict):
            if not isinstance(got, dict) or not set(want) <= set(got):
                missing = sorted(map(str, set(want) - set(got))) if isinstance(got, dict) else []
                raise damaged(path, f"{where} lacks {', '.join(missing)}" if missing else f"{where} is {_describe(got)}, not a mapping")
            stack.extend((got[key], value, f"{where}.{key}") for key, value in want.items())
        elif isinstance(want, (list, tuple)):
            if not isinstance(got, (list, tuple)):
                raise damaged(path, f"{where} is {_describe(got)}, not a list")
            stack.extend((a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(got, want)))
        else:
            _check_leaf(path, got, want, where)
    _check_finite(path, saved)


def _check_finite(path: Path, state: Any) -> None:
    stack: list[tuple[Any, str]] = [(state, "state")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, torch.Tensor):
            if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                raise damaged(path, f"{where} holds NaN or infinite values")
        elif isinstance(value, dict):
            stack.extend((item, f"{where}.{key}") for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
