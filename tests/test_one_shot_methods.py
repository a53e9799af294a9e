"""Wanda, SparseGPT and OWL: each method's defining property, N:M validity, and the edge cases."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from tiny_models import random_ids, tiny_model
from typer.testing import CliRunner

import secateurs.api as api
import secateurs.sparsity.prune as sparsity_prune
from secateurs.api import PruneConfig, prune
from secateurs.cli import app
from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import EngineOptions
from secateurs.engine.stats import Hessian, InputSqNorm
from secateurs.errors import NumericalError, UsageError
from secateurs.model.linear import sparsity_of, weight_matrix
from secateurs.sparsity.base import SparsityTarget
from secateurs.sparsity.masks import Pattern, is_nm
from secateurs.sparsity.owl import owl_schedule
from secateurs.sparsity.registry import method_names
from secateurs.sparsity.sparsegpt import SparseGPTOptions, reconstruct
from secateurs.sparsity.wanda import Wanda, wanda_scores

CPU = EngineOptions(device="cpu")


def _inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few large-norm features, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    x = torch.randn(tokens, features, generator=g) @ mix
    x[:, :3] *= 8
    return x


def _stats(x: torch.Tensor) -> dict:
    norm, hessian = InputSqNorm(x.shape[1], x.device), Hessian(x.shape[1], x.device)
    norm.update(x)
    hessian.update(x)
    return {"norm": norm, "hessian": hessian}


def _prune(loaded, config: PruneConfig, ids: torch.Tensor) -> api.PruneReport:
    with mock.patch.object(sparsity_prune, "calibration_ids", lambda *a, **k: ids):
        return prune(loaded, config, CalibConfig("wikitext2", len(ids), ids.shape[1]), EngineOptions(device="cpu"))


def test_wanda_keeps_top_scores_per_row():
    x, weight = _inputs(256, 48), torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    stats = _stats(x)
    method = Wanda(SparsityTarget.build(0.5, "unstructured", 1))
    keep = method.prune_matrix(weight.clone(), stats, 0.5)
    scores = weight.abs() * x.norm(dim=0)
    assert (keep.sum(dim=1) == 24).all()
    for row in range(16):
        assert scores[row][keep[row]].min() >= scores[row][~keep[row]].max()
    torch.testing.assert_close(wanda_scores(weight, stats["norm"]), scores, rtol=1e-4, atol=1e-4)
    layer = Wanda(SparsityTarget.build(0.5, "unstructured", 1), Wanda.Options(per="layer"))
    keep_layer = layer.prune_matrix(weight.clone(), stats, 0.5)
    assert keep_layer.sum() == 16 * 24 and scores[keep_layer].min() >= scores[~keep_layer].max()
    assert not torch.equal(keep_layer, keep)


def _output_error(x: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor) -> float:
    return float((x @ (dense - pruned).t()).square().sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better_than_wanda_with_same_budget(pattern):
    x, weight = _inputs(512, 64), torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    stats = _stats(x)
    target = SparsityTarget.build(None if ":" in pattern else 0.5, pattern, 1)  # block 12: 4:8 groups round it to 8
    wanda = weight * Wanda(target).prune_matrix(weight.clone(), stats, 0.5)
    sparsegpt = reconstruct(
        weight.clone(), stats["hessian"].matrix(), 0.5, target.pattern, SparseGPTOptions(block_size=12), [32], "test"
    )
    assert sparsity_of(sparsegpt) == pytest.approx(0.5, abs=1e-9)
    if target.pattern.is_nm:
        assert is_nm(sparsegpt, target.pattern.n, target.pattern.m)
    assert _output_error(x, weight, sparsegpt) < 0.9 * _output_error(x, weight, wanda)


def test_sparsegpt_stacked_rows_equal_separate_solves():
    """q/k/v share a Hessian and are solved together; that must equal solving each alone."""
    x = _inputs(256, 32)
    hessian = _stats(x)["hessian"].matrix()
    a, b = torch.randn(8, 32), torch.randn(4, 32)
    pattern, opts = Pattern.parse("unstructured"), SparseGPTOptions(block_size=8)
    together = reconstruct(torch.cat([a, b]), hessian.clone(), 0.5, pattern, opts, [8, 4], "t")
    alone = torch.cat([reconstruct(w.clone(), hessian.clone(), 0.5, pattern, opts, [len(w)], "t") for w in (a, b)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_valid_on_a_model(method, pattern):
    loaded = tiny_model("llama")
    report = _prune(loaded, PruneConfig(method, None, pattern), random_ids(4, 16))
    n, m = Pattern.parse(pattern).n, Pattern.parse(pattern).m
    for name, module in api.prunable_linears(loaded).items():
        assert is_nm(weight_matrix(module), n, m), name
    assert report.achieved == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("method", method_names())
def test_sparsity_zero_leaves_model_bit_identical(method):
    loaded = tiny_model("qwen2")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    _prune(loaded, PruneConfig(method, 0.0), random_ids(2, 16))
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("method", method_names())
def test_nm_on_a_subset_of_blocks(method):
    """A per-block schedule of 0 and 1 − N/M puts 2:4 on some blocks and leaves the others bit-identical."""
    loaded = tiny_model("llama")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    report = _prune(loaded, PruneConfig(method, [0.0, 0.5, 0.0], "2:4"), random_ids(4, 16))
    for name, module in api.prunable_linears(loaded).items():
        weight = weight_matrix(module)
        if name.startswith("model.layers.1."):
            assert is_nm(weight, 2, 4) and sparsity_of(weight) == pytest.approx(0.5), name
        else:
            assert torch.equal(weight, before[f"{name}.weight"]), name
    assert report.target.mean == pytest.approx(0.5 / 3)
    with pytest.raises(UsageError, match="fixes the sparsity"):
        SparsityTarget.build([0.0, 0.3, 0.5], "2:4", 3)


def test_sparsity_near_one_and_out_of_range():
    loaded = tiny_model("llama")
    report = _prune(loaded, PruneConfig("sparsegpt", 0.97), random_ids(2, 16))
    assert report.achieved == pytest.approx(0.97, abs=0.02)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=random_ids(1, 8)).logits).all()
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        _prune(tiny_model("llama"), PruneConfig("wanda", 1.0), random_ids(2, 16))


def test_nm_on_indivisible_dimension_is_a_usage_error():
    with pytest.raises(UsageError, match="multiple of 3"):
        _prune(tiny_model("llama"), PruneConfig("sparsegpt", None, "2:3"), random_ids(2, 16))
    with pytest.raises(UsageError, match="dampening"):
        _prune(tiny_model("llama"), PruneConfig("sparsegpt", None, "4:8", {"dampening": "0"}), random_ids(2, 16))


def test_sparsegpt_singular_nan_and_dead_inputs():
    pattern, opts = Pattern.parse("unstructured"), SparseGPTOptions()
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    x = _inputs(64, 16)
    x[:, 8:] = x[:, :8]  # rank 8 of 16: singular until damped
    out = reconstruct(weight.clone(), _stats(x)["hessian"].matrix(), 0.5, pattern, opts, [8], "t")
    assert torch.isfinite(out).all() and sparsity_of(out) == 0.5
    dead = torch.zeros(64, 16)  # a layer whose inputs are all zero: pruned by magnitude, exact budget
    out = reconstruct(weight.clone(), _stats(dead)["hessian"].matrix(), 0.5, pattern, opts, [8], "t")
    assert sparsity_of(out) == 0.5
    kept, dropped = weight[out != 0], weight[out == 0]
    assert torch.equal(out[out != 0], kept) and kept.abs().min() >= dropped.abs().max()
    nan = torch.zeros(16, 16)
    nan[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="NaN"):
        reconstruct(weight.clone(), nan, 0.5, pattern, opts, [8], "t")


def test_sparsegpt_retries_with_more_damping():
    hessian = torch.diag(torch.tensor([1.0, 1.0, -0.05, 1.0]))  # fails at 1% damping, passes at 10%
    weight = torch.randn(4, 4)
    pattern = Pattern.parse("unstructured")
    out = reconstruct(weight.clone(), hessian.clone(), 0.5, pattern, SparseGPTOptions(), [4], "layer x")
    assert torch.isfinite(out).all()
    with pytest.raises(NumericalError, match="layer x.*dampening"):
        reconstruct(weight.clone(), hessian.clone(), 0.5, pattern, SparseGPTOptions(retries=0), [4], "layer x")


def test_owl_schedule_mean_range_and_direction():
    ratios = [0.01, 0.05, 0.02, 0.03]
    schedule = owl_schedule(ratios, 0.7, 0.08)
    assert sum(schedule) / 4 == pytest.approx(0.7, abs=1e-12)
    assert max(schedule) - min(schedule) == pytest.approx(0.16)
    assert schedule.index(min(schedule)) == ratios.index(max(ratios))
    assert owl_schedule([0.02] * 3, 0.5, 0.08) == [0.5] * 3
    with pytest.raises(UsageError, match="owl-lambda"):
        owl_schedule(ratios, 0.95, 0.08)


@pytest.mark.parametrize("method", method_names())
def test_owl_allocation_keeps_mean_sparsity(method):
    loaded = tiny_model("llama", num_hidden_layers=4)
    report = _prune(loaded, PruneConfig(method, 0.7, allocation="owl", allocation_options={"lam": "0.1"}), random_ids(4, 16))
    assert report.target.mean == pytest.approx(0.7, abs=1e-9)
    assert len(set(report.target.per_block)) > 1 and max(report.target.per_block) <= 0.8 + 1e-9
    assert report.achieved == pytest.approx(0.7, abs=0.01)
    assert report.stage_record().allocation == "owl"
    with pytest.raises(UsageError, match="unstructured"):
        _prune(tiny_model("llama"), PruneConfig(method, None, "2:4", allocation="owl"), random_ids(2, 16))
    with pytest.raises(UsageError, match="allocation"):
        _prune(tiny_model("llama"), PruneConfig(method, 0.5, allocation="even"), random_ids(2, 16))


def test_calibration_order_and_dtype_change_results_only_by_rounding():
    ids = random_ids(6, 16)
    first, reordered = tiny_model("llama"), tiny_model("llama")
    _prune(first, PruneConfig("sparsegpt", 0.5), ids)
    _prune(reordered, PruneConfig("sparsegpt", 0.5), ids.flip(0))
    for (name, a), b in zip(api.prunable_linears(first).items(), api.prunable_linears(reordered).values(), strict=True):
        wa, wb = weight_matrix(a), weight_matrix(b)
        assert ((wa == 0) == (wb == 0)).float().mean() > 0.99, name
        torch.testing.assert_close(wa, wb, rtol=1e-3, atol=1e-3)
    half = tiny_model("llama")
    half.model.to(torch.bfloat16)
    dense = tiny_model("llama")
    _prune(half, PruneConfig("wanda", 0.5), ids)
    _prune(dense, PruneConfig("wanda", 0.5), ids)
    for (name, a), b in zip(api.prunable_linears(half).items(), api.prunable_linears(dense).values(), strict=True):
        assert ((weight_matrix(a) == 0) == (weight_matrix(b) == 0)).float().mean() > 0.97, name


def test_shared_inputs_get_equal_but_separate_statistics():
    from test_arch_engine import Recorder

    from secateurs.engine.sequential import run_blocks

    loaded = tiny_model("llama")
    recorder = Recorder()
    run_blocks(loaded.model, loaded.spec, recorder, random_ids(2, 8), CPU)
    stats = recorder.stats[0]
    q, k = stats["self_attn.q_proj"]["hessian"], stats["self_attn.k_proj"]["hessian"]
    assert q is not k and torch.equal(q.xtx, k.xtx) and q.n_tokens == k.n_tokens == 16
    assert not torch.equal(q.xtx, stats["self_attn.o_proj"]["hessian"].xtx)


def test_cli_allocation_flag(tmp_path):
    loaded = tiny_model("llama")
    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = [str(folder), "--calib", str(text), "--n-samples", "2", "--seq-len", "16", "--device", "cpu"]
    result = CliRunner().invoke(app, ["prune", *common, "--out", str(tmp_path / "o"), "--method", "wanda",
                                      "--sparsity", "0.6", "--allocation", "owl", "--owl-lambda", "0.05"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, ["prune", *common, "--out", str(tmp_path / "b"), "--allocation", "spread"])
    assert bad.exit_code == 2 and not (tmp_path / "b").exists()


def test_half_precision_norm_path_equals_the_float32_sums():
    """The CUDA fp16/bf16 shortcut of Wanda's norms (run here on CPU tensors) adds what the float32 path adds."""
    x = (_inputs(512, 64) * 4).to(torch.bfloat16)
    direct, cast = InputSqNorm(64, x.device), InputSqNorm(64, x.device)
    assert direct._add_half(x)
    cast.update(x)
    torch.testing.assert_close(direct.sum_sq, cast.sum_sq, rtol=1e-5, atol=0)
    assert cast.n_tokens == 512
