"""Depth pruning: physical layer removal, the five criteria, projection compensation, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from secateurs.cli import app
from secateurs.data.calib import CalibConfig
from secateurs.depth.base import ScoringContext
from secateurs.depth.compensation import CompensationOptions, compensate, fit_projection, fold_projection
from secateurs.depth.prune import LayerConfig, prune_layers
from secateurs.depth.registry import scorer_class, scorer_names
from secateurs.errors import UsageError
from secateurs.model.drop_layers import drop_layers, layers_removed
from secateurs.options import build_options
from tiny_models import random_ids, tiny_model

CPU = torch.device("cpu")


def _skip_hook(module, args, kwargs, output):
    """Make a block an identity: its output becomes its input (reference for a dropped layer)."""
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x


def _layers(arch: str, n: int) -> dict:
    return {"n_layer": n, "num_hidden_layers": n} if arch == "gpt2" else {"num_hidden_layers": n}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "qwen3", "gpt2", "opt", "gpt_neox"])
def test_dropped_model_matches_reference_and_generates(arch, tmp_path):
    gemma = arch in ("gemma2", "gemma3")
    layer_types = {"layer_types": ["sliding_attention", "full_attention"] * 2} if gemma else {}
    loaded = tiny_model(arch, **_layers(arch, 4), **layer_types)
    reference = copy.deepcopy(loaded.model)
    for i in (1, 2):
        loaded.spec.blocks_of(reference)[i].register_forward_hook(_skip_hook, with_kwargs=True)
    ids = random_ids(2, 24)
    kept = drop_layers(loaded.model, loaded.spec, [1, 2])
    model = loaded.model
    assert kept == [0, 3] and len(loaded.spec.blocks_of(model)) == 2
    assert loaded.spec.num_layers(model.config) == 2
    if gemma:
        assert loaded.spec.text_config(model.config).layer_types == ["sliding_attention", "full_attention"]
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        got = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        # Incremental decoding through the KV cache reproduces the full forward.
        past = model(input_ids=ids[:, :16], use_cache=True).past_key_values
        step = model(input_ids=ids[:, 16:], past_key_values=past, use_cache=True).logits
        torch.testing.assert_close(step, got[:, 16:], atol=1e-4, rtol=1e-4)
    prompt = ids[:1, :6]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, got)


def test_layers_removed_restores_the_model():
    loaded = tiny_model("gemma2", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    ids = random_ids(1, 16)
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
        with layers_removed(loaded.model, loaded.spec, [0, 3]) as kept:
            assert kept == [1, 2] and loaded.model.config.num_hidden_layers == 2
            assert loaded.spec.blocks_of(loaded.model)[0].self_attn.layer_idx == 0
        after = loaded.model(input_ids=ids).logits
    assert loaded.model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert [b.self_attn.layer_idx for b in loaded.spec.blocks_of(loaded.model)] == [0, 1, 2, 3]
    torch.testing.assert_close(after, before, atol=0, rtol=0)


@pytest.fixture(scope="module")
def trained_with_identity():
    """A tiny llama fitted to a few sequences (so real layers matter), then layer 2 made an identity."""
    loaded = tiny_model("llama", num_hidden_layers=5)
    ids = random_ids(4, 64, seed=3)
    model = loaded.model
    model.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(25):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.requires_grad_(False)
    block = loaded.spec.blocks_of(model)[2]
    block.self_attn.o_proj.weight.zero_()
    block.mlp.down_proj.weight.zero_()
    return loaded, ids


@pytest.mark.parametrize("method", scorer_names())
def test_each_scorer_ranks_an_identity_layer_least_important(method, trained_with_identity):
    loaded, ids = trained_with_identity
    cls = scorer_class(method)
    scorer = cls(build_options(cls.Options, {}))
    ctx = ScoringContext(loaded.model, loaded.spec, list(ids.split(2)), CPU)
    scorer.check(ctx)
    scores = scorer.score(ctx)
    assert scores.shape == (5,)
    assert int(torch.argmin(scores)) == 2, scores
    assert scorer.choose(ctx, 1).order == [2]


def test_gradmap_gate_grains_are_one_gradient_split_finer(trained_with_identity):
    """One batch: the scalar gate's gradient is the sum of the per-sequence and per-token ones, so
    |batch| ≤ Σ|sequence| ≤ Σ|token| for every layer, with equality only when no signs cancel."""
    loaded, ids = trained_with_identity
    cls = scorer_class("gradmap")
    ctx = ScoringContext(loaded.model, loaded.spec, [ids[:4]], CPU)
    scores = {grain: cls(build_options(cls.Options, {"grain": grain})).score(ctx) for grain in ("batch", "sequence", "token")}
    assert torch.all(scores["batch"] <= scores["sequence"] * (1 + 1e-6) + 1e-12)
    assert torch.all(scores["sequence"] <= scores["token"] * (1 + 1e-6) + 1e-12)
    assert float((scores["token"] - scores["batch"]).sum()) > 0
    with pytest.raises(UsageError, match="grain"):
        cls(build_options(cls.Options, {"grain": "layer"})).check(ctx)


def test_folded_projection_equals_explicit_matrix():
    loaded = tiny_model("llama", num_hidden_layers=3)
    ids = random_ids(2, 16)
    explicit = copy.deepcopy(loaded.model)
    d = torch.randn(200, 64, generator=torch.Generator().manual_seed(1))
    r = d @ torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) * 0.1 + d
    projection = fit_projection(d.T @ d, d.T @ r, alpha=1e-2)
    down = loaded.spec.blocks_of(loaded.model)[1].mlp.down_proj
    fold_projection(down, projection)
    p = projection.float()
    loaded.spec.blocks_of(explicit)[1].mlp.down_proj.register_forward_hook(lambda m, a, o: o @ p.T)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, explicit(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_compensation_reduces_the_drift_it_targets(trained_with_identity):
    loaded, ids = trained_with_identity
    model = copy.deepcopy(loaded.model)
    result = compensate(model, loaded.spec, [1, 2], list(ids.split(2)), CompensationOptions(select=False))
    assert result["layer"] in (0, 3, 4)
    assert result["drift_sq_after"] < result["drift_sq_before"]


def test_drift_from_moments_equals_the_direct_sum():
    from secateurs.depth.compensation import _Moments

    gen = torch.Generator().manual_seed(4)
    d, r, p = torch.randn(50, 8, generator=gen), torch.randn(50, 8, generator=gen), torch.randn(8, 8, generator=gen)
    moments = _Moments()
    moments.add(d[:20], r[:20])
    moments.add(d[20:], r[20:])
    assert moments.drift(p.double()) == pytest.approx(float((d @ p.T - r).pow(2).sum()), rel=1e-5)
    assert moments.identity == pytest.approx(float((r - d).pow(2).sum()), rel=1e-6)


def test_compensation_folds_only_what_helps_on_held_out_tokens(trained_with_identity):
    """Eight small batches in four folds, each held out once; a projection that does not lower the
    cross-validated loss below leaving the layer alone must not be folded, and the loss it reports is real."""
    from secateurs.depth.compensation import _loss

    loaded, _ = trained_with_identity
    model = copy.deepcopy(loaded.model)
    weights = [b.mlp.down_proj.weight.clone() for b in loaded.spec.blocks_of(model)]
    batches = list(random_ids(8, 8, seed=5).split(1))
    result = compensate(model, loaded.spec, [1, 2], batches, CompensationOptions(accept="mean"))
    held = result["held_out_loss"]
    assert set(held) == {"identity", "0.01", "0.1", "1", "10"}
    assert held["identity"] == pytest.approx(_loss(loaded.model, loaded.spec, [1, 2], batches), rel=1e-6)
    changed = [i for i, b in enumerate(loaded.spec.blocks_of(model)) if not torch.equal(b.mlp.down_proj.weight, weights[i])]
    if result["folded"]:
        assert held[f"{result['alpha']:g}"] == min(held.values()) < held["identity"] and changed == [result["layer"]]
    else:
        assert min(held.values()) == held["identity"] and changed == []
    no_select = compensate(copy.deepcopy(loaded.model), loaded.spec, [1, 2], batches, CompensationOptions(select=False))
    assert no_select["folded"] and no_select["held_out_loss"] is None and no_select["alpha"] == 0.01


@pytest.mark.parametrize("accept, folded", [("mean", True), ("every_fold", False)])
def test_compensation_every_fold_rule_refuses_a_gain_one_fold_contradicts(trained_with_identity, monkeypatch, accept, folded):
    """A projection that lowers the held-out loss on three folds and raises it on the fourth, with a
    lower mean: the mean rule folds it, the default per-fold rule leaves the model untouched."""
    import secateurs.depth.compensation as compensation

    loaded, _ = trained_with_identity
    model = copy.deepcopy(loaded.model)
    originals = [b.mlp.down_proj.weight.clone() for b in loaded.spec.blocks_of(model)]
    batches = list(random_ids(8, 8, seed=5).split(1))
    fold_of = {id(b): i % 4 for i, b in enumerate(batches)}

    def scripted_loss(model, spec, removed, fold_batches):
        projected = any(not torch.equal(b.mlp.down_proj.weight, w) for b, w in zip(spec.blocks_of(model), originals))
        if not projected:
            return 1.0
        return 1.1 if fold_of[id(fold_batches[0])] == 3 else 0.5

    monkeypatch.setattr(compensation, "_loss", scripted_loss)
    result = compensate(model, loaded.spec, [1, 2], batches, CompensationOptions(accept=accept))
    assert result["held_out_loss"]["identity"] == pytest.approx(1.0)
    assert result["held_out_loss"]["0.01"] == pytest.approx(0.65)
    assert result["folded"] is folded
    changed = [not torch.equal(b.mlp.down_proj.weight, w) for b, w in zip(loaded.spec.blocks_of(model), originals)]
    assert any(changed) is folded


def _tiny_folder(tmp_path):
    loaded = tiny_model("llama", num_hidden_layers=4)
    folder = tmp_path / "in"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


CALIB = ["--calib", "wikitext2", "--n-samples", "4", "--seq-len", "64"]


def test_cli_removes_layers_and_records_scores(tmp_path):
    folder = _tiny_folder(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["layers", str(folder), "--method", "gradmap", "--remove", "2", "--compensate", "--out", str(out), *CALIB]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "secateurs.json").read_text())
    stage = record["stages"][-1]
    assert len(stage["removed_layers"]) == 2 and stage["layers_after"] == 2
    assert stage["compensation"]["layer"] not in stage["removed_layers"]
    assert (out / "layer_scores.png").stat().st_size > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--remove", "4"], "--remove"),
        (["--remove", "0"], "--remove"),
        (["--remove", "1", "--method", "nope"], "unknown layer-pruning method"),
        (["--remove", "1", "--n-samples", "1", "--seq-len", "32"], "calibration tokens"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    folder = _tiny_folder(tmp_path)
    out = tmp_path / "out"
    base = ["layers", str(folder), "--out", str(out), "--calib", "wikitext2", "--n-samples", "4", "--seq-len", "64"]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compensation-option", "accept=bogus"], "accept='bogus'"),
        (["--compensation-option", "alpha=-1"], "alpha must be >= 0"),
        (["--method", "nope"], "unknown layer-pruning method"),
    ],
)
def test_cli_bad_options_fail_before_the_model_loads(tmp_path, args, message):
    """A model path that does not exist would be the error if the options were checked after loading."""
    out = tmp_path / "out"
    base = ["layers", str(tmp_path / "no-such-model"), "--remove", "1", "--compensate", "--out", str(out), *CALIB]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_api_refuses_compensation_it_cannot_fold():
    loaded = tiny_model("gemma2", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    with pytest.raises(UsageError, match="--compensate"):
        prune_layers(loaded, LayerConfig("block-influence", 1, compensate=True), CalibConfig("wikitext2", 2, 32))
