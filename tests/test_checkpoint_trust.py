"""A resume checkpoint is a file a user may have edited, damaged or been handed: every number and
tensor read from it is checked against the run before training resumes, and one that does not fit
is refused in one line naming the checkpoint and the fix, before any step runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_model

from secateurs.errors import UsageError
from secateurs.jsondoc import MAX_DEPTH, depth
from secateurs.training.checkpoint import STATE_KEY, load_checkpoint, read_checkpoint, save_checkpoint
from secateurs.training.loop import SeededWindows, TrainHook, TrainPlan, train

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
STEPS = 4


class StopAt(TrainHook):
    """Interrupts the run after the backward of ``step``; counts the steps it sees."""

    def __init__(self, step: int | None) -> None:
        self.step, self.seen = step, 0

    def after_backward(self, step: int) -> None:
        self.seen += 1
        if step == self.step:
            raise KeyboardInterrupt


def _run(path: Path, stop: int | None) -> tuple[torch.nn.Module, StopAt]:
    loaded = tiny_model("llama")
    ids = torch.randint(0, 320, (2000,), generator=torch.Generator().manual_seed(0))
    plan = TrainPlan(steps=STEPS, lr=1e-3, schedule=lambda step: 1.0 - step / STEPS, checkpoint=path, save_every=2)
    hook = StopAt(stop)
    train(loaded.model, dict(loaded.model.named_parameters()), SeededWindows(ids, 1, 16, 3, "random"), plan, CPU,
          hook, {"test": "trust"})
    return loaded.model, hook


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A real checkpoint at step 2 of 4."""
    path = tmp_path_factory.mktemp("ckpt") / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _run(path, stop=2)
    assert read_checkpoint(path)["step"] == 2
    return path


def _first(state: dict, part: str) -> str:
    return next(iter(state[part]))


def _set(*keys: object, value: object) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        target = state
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return edit


def _param(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        name = _first(state, "params")
        state["params"][name] = change(state["params"][name])
    return edit


def _nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


EDITS: dict[str, Callable[[dict], None]] = {
    "step far past the end": _set("step", value=10**9),
    "negative step": _set("step", value=-50),
    "infinite step": _set("step", value=float("inf")),
    "fractional step": _set("step", value=1.5),
    "step as text": _set("step", value="2"),
    "NaN loss": _set("losses", value=lambda losses: [float("nan")] * len(losses)),
    "loss as text": _set("losses", value=lambda losses: ["5.0"] * len(losses)),
    "fewer losses than steps": _set("losses", value=lambda losses: losses[:1]),
    "int32 adapter tensor": _param(lambda t: t.to(torch.int32)),
    "transposed tensor": _param(lambda t: t.t().contiguous()),
    "NaN in a weight": _param(_nan),
    "params missing": _set("params", value=lambda params: dict(list(params.items())[1:])),
    "optimizer lr 1000x": _set("optimizer", "param_groups", 0, "lr", value=lambda lr: lr * 1000),
    "optimizer weight decay": _set("optimizer", "param_groups", 0, "weight_decay", value=0.5),
    "optimizer betas": _set("optimizer", "param_groups", 0, "betas", value=(0.0, 0.0)),
    "optimizer moment NaN": _set("optimizer", "state", 0, "exp_avg", value=_nan),
    "optimizer moment int32": _set("optimizer", "state", 0, "exp_avg", value=lambda t: t.to(torch.int32)),
    "optimizer moment reshaped": _set("optimizer", "state", 0, "exp_avg_sq", value=lambda t: t.reshape(-1)),
    "optimizer step count": _set("optimizer", "state", 0, "step", value=torch.tensor(-7.0)),
    "optimizer state for a stranger": _set("optimizer", "state", value=lambda s: {**s, 999: s[0]}),
    "optimizer as list": _set("optimizer", value=[]),
    "schedule base rate": _set("scheduler", "base_lrs", value=[1.0]),
    "schedule position": _set("scheduler", "last_epoch", value=0),
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_an_edited_checkpoint_is_refused_before_training(saved, tmp_path, edit):
    path = tmp_path / saved.name
    state = read_checkpoint(saved)
    EDITS[edit](state)
    save_checkpoint(path, state)
    hook = StopAt(None)
    with pytest.raises(UsageError) as caught:
        loaded = tiny_model("llama")
        ids = torch.randint(0, 320, (2000,), generator=torch.Generator().manual_seed(0))
        plan = TrainPlan(steps=STEPS, lr=1e-3, schedule=lambda step: 1.0 - step / STEPS, checkpoint=path, save_every=2)
        train(loaded.model, dict(loaded.model.named_parameters()), SeededWindows(ids, 1, 16, 3, "random"), plan, CPU,
              hook, {"test": "trust"})
    message = str(caught.value)
    assert str(path) in message and "delete it" in message and "\n" not in message, message
    assert hook.seen == 0  # refused before any step


def test_the_unedited_checkpoint_resumes(saved, tmp_path):
    """The checks pass a checkpoint the run wrote itself: the two remaining steps run."""
    path = tmp_path / saved.name
    shutil.copy(saved, path)
    _, hook = _run(path, stop=None)
    assert hook.seen == STEPS - 2


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_deeply_nested_json_is_one_line(tmp_path, depth):
    path = tmp_path / "state.safetensors"
    document = '{"format": 1, "state": {"step": ' + "[" * depth + "]" * depth + "}}"
    save_file({"t0": torch.zeros(1)}, str(path), metadata={STATE_KEY: document})
    with pytest.raises(UsageError, match="nested deeper") as caught:
        load_checkpoint(path, "digest")
    assert str(path) in str(caught.value)


def test_nesting_bound_leaves_room_for_real_states(saved):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        assert depth(json.loads(f.metadata()[STATE_KEY])) * 2 <= MAX_DEPTH
