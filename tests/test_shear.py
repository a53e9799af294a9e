"""LLM-Shearing: L0 masks toward a target shape, slicing that equals the masked forward, a config plain
transformers reloads, and dynamic batch loading. Tiny random models only (mechanics, not quality)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from secateurs.api import save, shear
from secateurs.cli import app
from secateurs.errors import UsageError
from secateurs.structured.shearing.dynamic_batch import (
    Domains,
    TrainSettings,
    pretrain,
    update_weights,
)
from secateurs.structured.shearing import (
    HIDDEN_ARCHS,
    MaskedForward,
    ShearConfig,
    ShearMasks,
    ShearTarget,
    ShearTraining,
    apply_keep,
    plan_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[str, str]:
    """Two small text domains in files (the tiny tokenizer knows these words)."""
    folder = tmp_path_factory.mktemp("domains")
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog".split()
    a, b = folder / "a.txt", folder / "b.txt"
    a.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    b.write_text(" ".join(rng.choice(words[:3]) for _ in range(3000)))
    return str(a), str(b)


def _random_logits(masks: ShearMasks, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logit in masks.logits.values():
            logit.copy_(torch.randn(logit.shape, generator=generator))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gpt2", "gpt_neox"])
def test_binarised_masks_slice_equal_masked_forward(arch):
    loaded = tiny_model(arch)
    heads_ok = loaded.spec.head_dim_key is not None
    target = ShearTarget(layers=2, hidden=48 if arch in HIDDEN_ARCHS else None,
                         heads=2 if heads_ok else None, intermediate=96)
    plan = plan_for(loaded, target)
    masks = ShearMasks(plan)
    _random_logits(masks)
    keep = masks.keep()
    ids = random_ids(2, 12)
    with MaskedForward(loaded, plan) as forward, torch.no_grad():
        forward.z = masks.binary(keep)
        masked = loaded.model(input_ids=ids).logits
        forward.z = {}
        whole = loaded.model(input_ids=ids).logits
    assert not torch.allclose(masked, whole, atol=1e-3)  # the masks did change the output
    apply_keep(loaded, plan, keep)
    with torch.no_grad():
        sliced = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-4)
    config = loaded.model.config
    assert loaded.spec.num_layers(config) == 2
    assert len(loaded.spec.blocks_of(loaded.model)) == 2
    if "hidden" in plan.kinds:
        assert config.hidden_size == 48


def test_expected_size_moves_toward_target(texts):
    loaded = tiny_model("llama")
    config = ShearConfig(ShearTarget(layers=2, hidden=48, heads=2, intermediate=64), datasets=[texts[0]],
                         steps=6, batch_size=2, seq_len=16, eval_windows=1, lagrangian_warmup=0.0)
    plan = plan_for(loaded, config.target)
    masks = ShearMasks(plan)
    domains = Domains.load(config.datasets, loaded.tokenizer, config.seq_len, config.eval_windows)
    before = float(masks.expected_params().detach())
    with MaskedForward(loaded, plan) as forward:
        pretrain(loaded.model, domains, config.settings(config.steps, 0), torch.device("cpu"),
                 ShearTraining(masks, forward, config))
    after = float(masks.expected_params().detach())
    goal = plan.target_params
    assert before > goal
    assert abs(after - goal) < abs(before - goal) * 0.9
    assert all(float(masks.lambdas[f"{k}_1"].detach()) < 0 for k in plan.kinds)  # ascent pushed the multipliers


def test_sheared_model_reloads_in_plain_transformers(texts, tmp_path):
    loaded = tiny_model("llama")
    config = ShearConfig(ShearTarget(layers=2, hidden=48, heads=2, kv_heads=1, intermediate=64),
                         datasets=list(texts), steps=3, continue_steps=2, batch_size=2, seq_len=16,
                         eval_windows=1, update_every=1)
    report = shear(loaded, config)
    out = save(loaded, tmp_path / "sheared", [report.stage_record()])
    assert not (out / "modeling_secateurs.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = reloaded.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size) == (2, 48, 2, 1, 64)
    ids = random_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    record = json.loads((out / "secateurs.json").read_text())["stages"][-1]
    assert record["params_after"] < record["params_before"]
    assert record["tokens"] == (3 + 2) * 2 * 16


def test_dynamic_batch_loading_favours_larger_excess_loss(texts):
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    new = update_weights(weights, torch.tensor([3.0, 2.2]), torch.tensor([2.0, 2.0]))
    assert new[0] > new[1] and abs(float(new.sum()) - 1) < 1e-9
    # Below the reference counts as no excess: the weights stay where they were.
    same = update_weights(weights, torch.tensor([1.0, 1.5]), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(same, weights)
    domains = Domains.load(list(texts), tiny_model("llama").tokenizer, 16, 1)
    domains.reference = torch.tensor([1.0, 1.0], dtype=torch.float64)
    domains.update(torch.tensor([1.2, 2.5]))
    assert domains.weights[1] > 0.6
    drawn = domains.sample(400, 16, torch.Generator().manual_seed(0))[1]
    assert (drawn == 1).sum() > (drawn == 0).sum()


def test_one_domain_is_ordinary_training(texts):
    loaded = tiny_model("llama")
    domains = Domains.load([texts[0]], loaded.tokenizer, 16, 1)
    log = pretrain(loaded.model, domains, TrainSettings(steps=3, batch_size=2, seq_len=16, update_every=1),
                   torch.device("cpu"))
    assert log.domain_weights == [[1.0]] and log.domain_tokens == {texts[0]: 3 * 2 * 16}


def test_resume_from_checkpoint(texts, tmp_path):
    def run(steps: int):
        loaded = tiny_model("llama")
        config = ShearConfig(ShearTarget(layers=2, intermediate=64), datasets=[texts[0]], steps=steps,
                             batch_size=2, seq_len=16, eval_windows=1, checkpoint_dir=str(tmp_path / "ckpt"),
                             checkpoint_every=2)
        return shear(loaded, config), loaded

    first, model_a = run(4)
    again, model_b = run(4)
    assert again.prune_log.resumed_from == 4 and again.kept == first.kept
    for a, b in zip(model_a.model.parameters(), model_b.model.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(UsageError, match="other settings"):
        run(6)


@pytest.mark.parametrize("target, message", [
    (ShearTarget(heads=3), "multiple of the 2 query heads"),
    (ShearTarget(heads=2, kv_heads=2), "changes the 2:1"),
    (ShearTarget(layers=9), "between 1 and the source's 3"),
    (ShearTarget(hidden=50), "multiple of heads"),
])
def test_bad_targets(target, message):
    with pytest.raises(UsageError, match=message):
        plan_for(tiny_model("llama"), target)


def test_hidden_refused_where_it_cannot_be_sliced():
    with pytest.raises(UsageError, match="hidden"):
        plan_for(tiny_model("gpt2"), ShearTarget(hidden=32))


def test_target_parsing(tmp_path):
    assert ShearTarget.parse("layers=20, hidden=448,kv_heads=2") == ShearTarget(layers=20, hidden=448, kv_heads=2)
    with pytest.raises(UsageError, match="must be one of"):
        ShearTarget.parse("depth=3")
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"num_hidden_layers": 24, "hidden_size": 528, "num_key_value_heads": 2}))
    assert ShearTarget.from_json(path) == ShearTarget(layers=24, hidden=528, kv_heads=2)


def test_cli_shear_and_bad_input(texts, tmp_path):
    folder = tmp_path / "model"
    loaded = tiny_model("llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["shear", str(folder), "--out", str(out), "--steps", "2", "--data", texts[0], "--batch-size", "2",
            "--seq-len", "16", "--eval-windows", "1", "--device", "cpu"]
    bad = runner.invoke(app, [*args, "--target", "heads=3"])
    assert bad.exit_code == 2 and "multiple" in bad.output and not out.exists()
    both = runner.invoke(app, [*args, "--target", "layers=2", "--target-config", "x.json"])
    assert both.exit_code == 2
    result = runner.invoke(app, [*args, "--target", "layers=2,intermediate=64"])
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_the_same_command_learns_the_same_masks(texts):
    """Seeded and deterministic on the CPU: two fresh runs of one configuration keep the same structures and end
    with the same weights (a GPU run of the same seed was seen to differ, 94.59 vs 81.06 perplexity after slicing,
    which points at non-deterministic CUDA kernels, not at the seeding)."""
    def run():
        loaded = tiny_model("llama")
        config = ShearConfig(ShearTarget(layers=2, hidden=48, heads=2, intermediate=64), datasets=list(texts),
                             steps=6, batch_size=2, seq_len=16, eval_windows=1, lagrangian_warmup=0.0)
        return shear(loaded, config), loaded

    (first, model_a), (again, model_b) = run(), run()
    assert first.kept == again.kept
    for a, b in zip(model_a.model.parameters(), model_b.model.parameters(), strict=True):
        assert torch.equal(a, b)
