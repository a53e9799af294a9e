"""Width pruning: dependency groups, physical slicing vs. a masked forward, reload, generation, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import secateurs
from secateurs.errors import UsageError
from secateurs.model.arch import SPECS, spec_for
from secateurs.model.per_layer import load_sliced
from secateurs.model.slice import apply_widths, mask_groups
from secateurs.structured import base
from secateurs.structured.base import WidthConfig, model_groups
from secateurs.structured.select import kept_count, select_global, select_uniform
from tiny_models import MOE_ARCHS, random_ids, tiny_model

# 8 query heads in 4 KV groups, so layers can keep different head counts.
GQA = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
WIDE = {
    "llama": GQA, "mistral": GQA, "qwen2": dict(num_attention_heads=8, num_key_value_heads=4),
    "qwen3": GQA, "gemma2": GQA, "gemma3_text": GQA, "gemma3": GQA,
    "phi3": dict(num_attention_heads=8, num_key_value_heads=4),
    "gpt2": dict(n_head=8), "opt": dict(num_attention_heads=8), "gpt_neox": dict(num_attention_heads=8),
}


def _random_keep(loaded, kinds, uniform: bool, seed: int = 0):
    """Random kept groups per block, and the complementary removed ones."""
    gen = torch.Generator().manual_seed(seed)
    keep, removed = [], []
    for index, per in enumerate(model_groups(loaded, kinds)):
        k, r = {}, {}
        for kind, gs in per.items():
            n_keep = gs.count // 2 if uniform else gs.count - 1 - index % 2
            order = torch.randperm(gs.count, generator=gen)
            k[kind], r[kind] = order[:n_keep], order[n_keep:]
        keep.append(k)
        removed.append(r)
    return keep, removed


def _masked(loaded, kinds, removed):
    ref = copy.deepcopy(loaded.model)
    blocks = loaded.spec.blocks_of(ref)
    for block, per, rem in zip(blocks, model_groups(loaded, kinds), removed):
        for kind, gs in per.items():
            mask_groups(block, gs, rem[kind])
    return ref


CASES = [(arch, False) for arch in WIDE] + [(arch, True) for arch in ("llama", "qwen2", "gemma3", "phi3", "gpt2")]


@pytest.mark.parametrize("arch,uniform", CASES)
def test_sliced_equals_masked_and_reloads(arch, uniform, tmp_path):
    loaded = tiny_model(arch, **WIDE[arch])
    spec = loaded.spec
    kinds = ("heads", "channels") if spec.prunable_heads and (uniform or spec.per_layer_heads) else ("channels",)
    keep, removed = _random_keep(loaded, kinds, uniform)
    reference = _masked(loaded, kinds, removed)
    before = sum(p.numel() for p in loaded.model.parameters())
    apply_widths(loaded.model, loaded.spec, keep)
    assert sum(p.numel() for p in loaded.model.parameters()) < before
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)
    folder = secateurs.save(loaded, tmp_path / "out", [{"stage": "width"}])
    reloaded = load_sliced(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)
    generated = reloaded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 8)
    if uniform and arch in ("llama", "qwen2", "gpt2"):
        # Uniform widths a stock config can express load with no custom code at all.
        assert "auto_map" not in json.loads((folder / "config.json").read_text())
        AutoModelForCausalLM.from_pretrained(folder)
    if not uniform:
        assert (folder / "modeling_secateurs.py").is_file()
        assert secateurs.load_model(str(folder)).model.config.secateurs_shapes


def test_surgery_covers_every_arch_spec():
    """The sliced == masked test above runs a tiny model of every dense ArchSpec entry."""
    dense = {spec.name for spec in SPECS if spec.moe is None}
    assert {spec_for(tiny_model(arch).model).name for arch in WIDE} == dense


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_width_refuses_a_mixture_of_experts_in_one_line(arch):
    """Experts' widths are no dependency group: width pruning says so and points at `experts`."""
    loaded = tiny_model(arch)
    before = [p.clone() for p in loaded.model.parameters()]
    with pytest.raises(UsageError, match="mixture-of-experts.*secateurs experts"):
        apply_widths(loaded.model, loaded.spec, [{"channels": torch.tensor([0, 1])} for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters(), strict=True))


@pytest.mark.parametrize("arch", list(WIDE))
def test_head_pruning_follows_the_capability(arch):
    """Heads are refused exactly where the spec says they cannot be removed and reloaded."""
    loaded = tiny_model(arch, **WIDE[arch])
    keep = [{"heads": torch.tensor([0, 1])} for _ in range(3)]
    if loaded.spec.prunable_heads:
        apply_widths(loaded.model, loaded.spec, keep)
    else:
        with pytest.raises(UsageError, match="removing heads would not reload"):
            apply_widths(loaded.model, loaded.spec, keep)


def test_head_count_not_dividing_hidden_still_reloads(tmp_path):
    """Llama configs insist hidden % heads == 0: 8 -> 6 heads of a 64-wide model must still reload."""
    loaded = tiny_model("llama", **GQA)
    keep = [{"heads": torch.tensor([0, 1, 3])} for _ in range(3)]
    apply_widths(loaded.model, loaded.spec, keep)
    folder = secateurs.save(loaded, tmp_path / "out", [])
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(load_sliced(folder)(ids).logits, loaded.model(ids).logits)


@pytest.fixture
def fake_calibration(monkeypatch):
    """Random token windows instead of text: tiny models have a toy vocabulary."""
    monkeypatch.setattr(base, "calibration_ids", lambda config, tokenizer, model: random_ids(config.n_samples, config.seq_len))


@pytest.mark.parametrize("method,importance,mode", [
    ("llm-pruner", "taylor", "uniform"), ("llm-pruner", "vector", "global"), ("llm-pruner", "hessian", "uniform"),
    ("wanda-sp", None, "uniform"), ("flap", None, "global"), ("magnitude", "l1", "global"),
])
def test_methods_shrink_and_keep_working(method, importance, mode, fake_calibration, tmp_path):
    loaded = tiny_model("llama", **GQA)
    config = WidthConfig(method, 0.25, importance=importance, mode=mode, bias_compensation=True)
    report = secateurs.width(loaded, config, secateurs.CalibConfig("x", 4, 16), secateurs.EngineOptions(device="cpu"))
    assert report.params_after < report.params_before
    if mode == "uniform":
        assert report.achieved() == {"heads": 0.25, "channels": 0.25}
        assert {w["channels"] for w in report.widths} == {96}
    else:
        targeted = report.params_before - report.params_after
        assert targeted > 0
    with torch.no_grad():
        assert torch.isfinite(loaded.model(random_ids(1, 8)).logits).all()
    folder = secateurs.save(loaded, tmp_path / "o", [report.stage_record()])
    assert json.loads((folder / "secateurs.json").read_text())["stages"][0]["method"] == method


def test_taylor_keeps_the_groups_that_matter(fake_calibration):
    """A channel whose weights were scaled up 100x must survive LLM-Pruner and magnitude alike."""
    for method in ("llm-pruner", "magnitude"):
        loaded = tiny_model("llama", **GQA)
        blocks = loaded.spec.blocks_of(loaded.model)
        with torch.no_grad():
            for block in blocks:
                block.mlp.down_proj.weight[:, 5] *= 100
                block.mlp.up_proj.weight[5] *= 100
        report = secateurs.width(loaded, WidthConfig(method, 0.9, target="channels"),
                                 secateurs.CalibConfig("x", 2, 16), secateurs.EngineOptions(device="cpu"))
        assert all(w["channels"] == 13 for w in report.widths)
        for block in blocks:
            assert block.mlp.down_proj.weight[:, :].abs().max(dim=0).values.max() > 1.0


def test_flap_bias_compensation_keeps_mean_output(fake_calibration):
    """Removing a constant input feature from down_proj: compensation restores the output exactly."""
    loaded = tiny_model("llama", **GQA)
    block = loaded.spec.blocks_of(loaded.model)[0]
    from secateurs.structured.flap import compensate

    down = block.mlp.down_proj
    x = torch.randn(5, down.in_features)
    x[:, [3, 7]] = torch.tensor([0.5, -2.0])
    full = down(x)
    compensate(down, torch.tensor([3, 7]), x.mean(dim=0))
    x_cut = x.clone()
    x_cut[:, [3, 7]] = 0
    torch.testing.assert_close(down(x_cut), full, atol=1e-5, rtol=1e-5)


def test_selection_rules():
    scores = [{"heads": torch.tensor([3.0, 1.0, 2.0]), "channels": torch.arange(10.0)} for _ in range(2)]
    keep = select_uniform(scores, 0.34, [0, 1])
    assert keep[0]["heads"].tolist() == [0, 2] and keep[0]["channels"].tolist() == list(range(3, 10))
    with pytest.raises(UsageError, match="removes all"):
        select_uniform([{"heads": torch.tensor([1.0, 2.0])}], 0.9, [0])
    with pytest.raises(UsageError, match="removing nothing"):
        select_uniform([{"heads": torch.tensor([1.0, 2.0, 3.0])}], 0.1, [0])
    costs = [{"heads": 10, "channels": 1} for _ in range(2)]
    kept = select_global(scores, costs, 0.99, [0, 1])
    assert all(k["heads"].numel() >= 1 and k["channels"].numel() >= 1 for k in kept)


def test_round_to_keeps_a_multiple_of_channels():
    scores = [{"heads": torch.tensor([3.0, 1.0, 2.0]), "channels": torch.arange(100.0).flip(0)}]
    keep = select_uniform(scores, 0.3, [0], round_to=16)
    assert keep[0]["channels"].tolist() == list(range(64))  # 70 rounds to 64: the 64 best scores
    assert keep[0]["heads"].tolist() == [0, 2]  # heads are whole KV groups already: not rounded
    assert kept_count(100, 0.3) == 70 and kept_count(100, 0.3, 8) == 72 and kept_count(10, 0.9, 8) == 8
    loaded = tiny_model("llama", **WIDE["llama"])
    config = WidthConfig("magnitude", 0.3, target="channels", round_to=8)
    secateurs.width(loaded, config, None, secateurs.EngineOptions(device="cpu"))
    widths = {b.mlp.down_proj.in_features for b in loaded.model.model.layers}
    assert all(w % 8 == 0 for w in widths), widths


@pytest.mark.parametrize("config,match", [
    (WidthConfig("magnitude", 0.2, round_to=0), "round-to"),
    (WidthConfig("magnitude", 0.2, mode="global", round_to=8), "round-to"),
    (WidthConfig("magnitude", 1.0), "ratio"),
    (WidthConfig("magnitude", 0.2, target="rows"), "target"),
    (WidthConfig("magnitude", 0.2, keep_first=2, keep_last=1), "leave none"),
    (WidthConfig("magnitude", 0.2, importance="taylor"), "importance"),
    (WidthConfig("nope", 0.2), "unknown width method"),
    (WidthConfig("magnitude", 0.2, target="heads", mode="global"), None),
])
def test_bad_requests_change_nothing(config, match):
    loaded = tiny_model("gpt2", **WIDE["gpt2"])
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(UsageError, match=match or "head size"):
        secateurs.width(loaded, config, None, secateurs.EngineOptions(device="cpu"))
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in state.items())


def test_cli_width_writes_nothing_on_bad_input(tmp_path, smollm2_folder):
    from typer.testing import CliRunner

    from secateurs.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["width", str(smollm2_folder), "--out", str(out), "--method", "magnitude",
                                      "--target", "heads", "--ratio", "0.1", "--device", "cpu"])
    assert result.exit_code == 2 and "removing nothing" in result.output
    assert not out.exists()
