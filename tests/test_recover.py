"""Recovery: masked LoRA keeps zeros exactly, training lowers the loss, LoRAPrune's importance, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_model
from typer.testing import CliRunner

from secateurs.api import PruneConfig, prune
from secateurs.cli import app
from secateurs.errors import UsageError
from secateurs.model.linear import weight_matrix
from secateurs.model.slice import mask_groups
from secateurs.recover.adapters import attach
from secateurs.training.checkpoint import read_checkpoint
from secateurs.recover.iterative import prune_iterative
from secateurs.recover.lora import (
    CHECKPOINT,
    RecoverConfig,
    recover_lora,
    train_adapters,
    train_ids,
)
from secateurs.recover.loraprune import (
    LoRAPruneConfig,
    LoRAPruneHook,
    group_importance,
    loraprune,
)
from secateurs.training.loop import TrainHook, enable_checkpointing
from secateurs.structured.base import model_groups

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
def config(text_file: Path, **overrides) -> RecoverConfig:
    settings = dict(steps=8, lr=1e-2, seq_len=32, batch_size=2, data=str(text_file), warmup_steps=0)
    return RecoverConfig(**{**settings, **overrides})


def linears(loaded) -> list[torch.Tensor]:
    return [weight_matrix(m) for b in loaded.spec.blocks_of(loaded.model) for m in loaded.spec.linears(b).values()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_merge_keeps_zeros_exactly_and_matches_training(arch, text_file):
    loaded = tiny_model(arch)
    prune(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"}))
    zeros = [w == 0 for w in linears(loaded)]
    cfg = config(text_file)
    adapters = attach(loaded, cfg)
    assert len(adapters.masked) == len(zeros)
    train_adapters(adapters, cfg, train_ids(loaded, cfg), CPU)
    assert any(bool(layer.lora_B["default"].weight.abs().sum() > 0) for layer in adapters.layers.values())
    ids = random_ids(2, 16)
    with torch.no_grad():
        tuned = loaded.model(ids).logits
    assert adapters.merge()
    with torch.no_grad():
        merged = loaded.model(ids).logits
    torch.testing.assert_close(merged, tuned, rtol=1e-4, atol=1e-4)
    for weight, zero in zip(linears(loaded), zeros):
        assert bool((weight[zero] == 0).all())
        assert bool((weight[~zero] != 0).any())


def _fixed_loss(loaded, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(loaded.model(input_ids=ids, labels=ids).loss)


def test_a_few_lora_steps_lower_the_loss(text_file):
    loaded = tiny_model("llama")
    prune(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"}))
    cfg = config(text_file, steps=15)
    held = train_ids(loaded, cfg)[:257].reshape(1, -1)
    before = _fixed_loss(loaded, held)
    report = recover_lora(loaded, cfg, CPU)
    assert _fixed_loss(loaded, held) < before
    first, last = report.loss_start_end(3)
    assert last < first
    assert report.zeros_kept and report.sparsity_after == pytest.approx(report.sparsity_before)
    assert report.tokens == 15 * 2 * 32


def test_dense_model_takes_plain_lora(text_file):
    loaded = tiny_model("llama")
    adapters = attach(loaded, config(text_file))
    assert adapters.masked == set()
    adapters.discard()


@pytest.mark.parametrize("kind, zeroed", [("channels", 5), ("heads", 1)])
def test_loraprune_importance_of_a_zeroed_group_is_lowest(kind, zeroed, text_file):
    loaded = tiny_model("llama")
    groups = model_groups(loaded, (kind,))
    block = loaded.spec.blocks_of(loaded.model)[1]
    mask_groups(block, groups[1][kind], torch.tensor([zeroed]))
    cfg = config(text_file)
    adapters = attach(loaded, cfg, mask_all=True)
    hook = LoRAPruneHook(adapters, LoRAPruneConfig(0.5, kind, 0, 0), [0, 1, 2], groups, steps=3)
    ids = random_ids(2, 16)
    adapters.peft_model(input_ids=ids, labels=ids).loss.backward()
    scores = group_importance(adapters, 1, groups[1][kind])
    assert int(scores.argmin()) == zeroed
    assert scores[zeroed] == 0 and bool((scores.sort().values[1:] > 0).all())
    hook.after_backward(0)
    assert hook.scores[(1, kind)].argmin() == zeroed
    adapters.discard()


def test_loraprune_structured_removes_groups_physically(text_file):
    loaded = tiny_model("llama")
    report = loraprune(loaded, LoRAPruneConfig(0.5, "both", 0, 0, prune_every=2), config(text_file, steps=6), CPU)
    record = report.stage_record()
    assert record.groups_removed == {"heads": 3, "channels": 3 * 64}
    assert record.params["after"] < record.params["before"]
    block = loaded.spec.blocks_of(loaded.model)[0]
    assert block.mlp.down_proj.weight.shape[1] == 64 and block.self_attn.o_proj.weight.shape[1] == 32
    assert torch.isfinite(loaded.model(random_ids(1, 8)).logits).all()


def test_loraprune_unstructured_reaches_ratio_with_exact_zeros(text_file):
    loaded = tiny_model("llama")
    report = loraprune(loaded, LoRAPruneConfig(0.5, "unstructured", 0, 0, prune_every=2), config(text_file, steps=6), CPU)
    assert report.zeros_kept and report.sparsity_after == pytest.approx(0.5)


class StopAt(TrainHook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_backward(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def test_resume_after_interruption_continues_from_the_saved_step(text_file, tmp_path):
    cfg = config(text_file, steps=6, save_every=2, checkpoint_dir=str(tmp_path / "ckpt"))

    def pruned():
        loaded = tiny_model("llama")
        prune(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"}))
        return loaded

    stopped = pruned()
    original = [w.clone() for w in linears(stopped)]
    with pytest.raises(KeyboardInterrupt):
        recover_lora(stopped, cfg, CPU, hook=StopAt(4))
    assert all(torch.equal(a, b) for a, b in zip(original, linears(stopped)))
    assert read_checkpoint(tmp_path / "ckpt" / CHECKPOINT)["step"] == 4
    resumed = pruned()
    report = recover_lora(resumed, cfg, CPU)
    assert report.log.resumed_from == 4 and len(report.log.losses) == 6
    straight = pruned()
    reference = recover_lora(straight, RecoverConfig(**{**cfg.__dict__, "checkpoint_dir": None}), CPU)
    assert report.log.losses == pytest.approx(reference.log.losses, rel=1e-5)
    for a, b in zip(linears(resumed), linears(straight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="other settings"):
        recover_lora(pruned(), RecoverConfig(**{**cfg.__dict__, "lr": 5e-3}), CPU)


def test_iterative_reaches_the_target_in_rounds(text_file):
    loaded = tiny_model("llama")
    report = prune_iterative(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"}), 2, config(text_file, steps=2))
    assert [r["round"] for r in report.rounds] == [1, 2]
    assert report.rounds[0]["achieved_sparsity"] == pytest.approx(0.25)
    assert report.sparsity == pytest.approx(0.5) and all(r["zeros_kept"] for r in report.rounds)
    with pytest.raises(UsageError, match="rounds 1"):
        prune_iterative(tiny_model("llama"), PruneConfig("magnitude", None, "2:4"), 2, config(text_file))


def test_cli_recover_writes_record_and_clears_checkpoint(text_file, tmp_path):
    loaded = tiny_model("llama")
    prune(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"}))
    loaded.model.save_pretrained(tmp_path / "pruned")
    loaded.tokenizer.save_pretrained(tmp_path / "pruned")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["recover", str(tmp_path / "pruned"), "--out", str(out), "--steps", "2", "--seq-len", "32",
            "--batch-size", "2", "--data", str(text_file), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "secateurs.json").read_text())
    assert record["stages"][-1]["stage"] == "recover" and record["stages"][-1]["zeros_kept"]
    assert not Path(f"{out}.ckpt").exists()
    bad = runner.invoke(app, ["recover", str(tmp_path / "pruned"), "--out", str(tmp_path / "o2"), "--method", "nope"])
    assert bad.exit_code == 2


def test_loraprune_cooldown_moves_the_end_of_the_schedule(tmp_path):
    """The schedule reaches the full ratio exactly when the cool-down starts; a bad value is a one-line error."""
    for cooldown in (0.1, 0.5):
        config = LoRAPruneConfig(0.2, cooldown=cooldown)
        reached = [step for step in range(100) if config.ratio_at(step, 100) == 0.2]
        assert reached[0] == round(100 * (1 - cooldown))
        assert all(config.ratio_at(s, 100) < 0.2 for s in range(reached[0]))
    result = CliRunner().invoke(app, ["recover", "smollm2-135m", "--method", "loraprune", "--cooldown", "0.95",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--cooldown" in result.output and not (tmp_path / "o").exists()


def test_checkpointing_switch_works_with_old_and_new_transformers_names():
    """transformers 5.17 (GPU images) has only gradient_checkpointing_*; 5.2x prefers activation_checkpointing_*."""
    from torch import nn

    class Old(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
            self.calls.append(f"on {gradient_checkpointing_kwargs}")

        def gradient_checkpointing_disable(self) -> None:
            self.calls.append("off")

    class New(Old):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None) -> None:
            self.calls.append(f"new on {activation_checkpointing_kwargs}")

        def activation_checkpointing_disable(self) -> None:
            self.calls.append("new off")

    old, new = Old(), New()
    for model in (old, new):
        enable_checkpointing(model)
        enable_checkpointing(model, on=False)
    assert old.calls == ["on {'use_reentrant': False}", "off"]
    assert new.calls == ["new on {'use_reentrant': False}", "new off"]
