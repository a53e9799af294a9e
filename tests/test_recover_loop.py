"""The one training loop: a run stopped mid-way and resumed from its checkpoint ends with the very
weights, losses and batch-source state of the run that was never stopped: plain LM training with
gradient accumulation, shearing's mask learning (its hook and dynamic batch loading) and LoRAPrune
(its pruning state)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from secateurs.training.checkpoint import read_checkpoint
from secateurs.recover.lora import RecoverConfig
from secateurs.recover.loraprune import LoRAPruneConfig, LoRAPruneHook, loraprune
from secateurs.training.loop import SeededWindows, TrainHook, TrainPlan, train
from secateurs.structured.shearing import ShearConfig, ShearTarget, shear
from secateurs.structured.shearing.driver import ShearTraining

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


class StopAt(TrainHook):
    """Interrupts the run after the backward of ``step`` (before that step's optimizer update)."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def after_backward(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def _run(folder: Path | None, stop: int | None):
    loaded = tiny_model("llama")
    ids = torch.randint(0, 320, (4000,), generator=torch.Generator().manual_seed(0))
    plan = TrainPlan(steps=6, lr=1e-3, schedule=lambda step: 1.0 - step / 6, grad_accum=2,
                     checkpoint=folder / "state.safetensors" if folder else None, save_every=2)
    batches = SeededWindows(ids, batch_size=2, seq_len=16, seed=3, name="random")
    log = train(loaded.model, dict(loaded.model.named_parameters()), batches, plan, CPU, StopAt(stop),
                {"test": "resume"})
    return loaded, log


def test_loop_resumes_to_the_same_final_weights(tmp_path):
    straight, reference = _run(None, None)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, stop=3)
    assert read_checkpoint(tmp_path / "state.safetensors")["step"] == 2
    resumed, log = _run(tmp_path, None)
    assert log.resumed_from == 2 and log.losses == reference.losses and log.tokens == 6 * 2 * 2 * 16
    for (name, a), b in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in resumed.model.parameters())  # left as it was found


def test_shearing_resumes_mid_mask_learning(tmp_path, monkeypatch):
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog".split()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    b.write_text(" ".join(rng.choice(words[:3]) for _ in range(3000)))

    def run(folder: str | None):
        loaded = tiny_model("llama")
        config = ShearConfig(ShearTarget(layers=2, hidden=48, heads=2, intermediate=64), datasets=[str(a), str(b)],
                             steps=6, continue_steps=2, batch_size=2, seq_len=16, eval_windows=1, update_every=2,
                             reference_loss=[3.0, 5.0], lr=1e-3, checkpoint_dir=folder, checkpoint_every=2)
        return shear(loaded, config), loaded

    reference, straight = run(None)
    after_backward = ShearTraining.after_backward

    def stop_at_four(self, step: int) -> None:
        if step == 4:
            raise KeyboardInterrupt
        after_backward(self, step)

    monkeypatch.setattr(ShearTraining, "after_backward", stop_at_four)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "ckpt"))
    monkeypatch.setattr(ShearTraining, "after_backward", after_backward)
    report, resumed = run(str(tmp_path / "ckpt"))
    assert report.prune_log.resumed_from == 4 and report.continue_log.resumed_from == 0
    assert report.prune_log.losses == reference.prune_log.losses
    assert report.prune_log.domain_weights == reference.prune_log.domain_weights
    assert len(reference.prune_log.domain_weights) == 2 and reference.prune_log.domain_weights[-1][1] < 0.5  # weights moved
    assert report.kept == reference.kept and report.continue_log.losses == reference.continue_log.losses
    for a_param, b_param in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a_param, b_param)


@pytest.mark.parametrize("target", ["both", "unstructured"])
def test_loraprune_resumes_its_pruning_state(target, tmp_path, monkeypatch):
    """LoRAPrune's hook state (moving-average scores, live groups or masks) travels in the checkpoint."""
    text = tmp_path / "train.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice("the quick brown fox jumps over the lazy dog".split()) for _ in range(3000)))

    def run(folder: Path | None):
        loaded = tiny_model("llama")
        config = RecoverConfig(steps=6, lr=1e-2, seq_len=32, batch_size=2, data=str(text), warmup_steps=0,
                               checkpoint_dir=str(folder) if folder else None, save_every=2)
        return loraprune(loaded, LoRAPruneConfig(0.5, target, 0, 0, prune_every=2), config, CPU), loaded

    reference, straight = run(None)
    after_backward = LoRAPruneHook.after_backward

    def stop_at_three(self, step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt
        after_backward(self, step)

    monkeypatch.setattr(LoRAPruneHook, "after_backward", stop_at_three)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ckpt")
    monkeypatch.setattr(LoRAPruneHook, "after_backward", after_backward)
    report, resumed = run(tmp_path / "ckpt")
    assert report.log.resumed_from == 2 and report.log.losses == reference.log.losses
    assert report.stage_record().groups_removed == reference.stage_record().groups_removed
    for a_param, b_param in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a_param, b_param)
