"""Block reconstruction, RIA and the N:M channel permutation: their defining properties and bad input."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import secateurs.api as api
import secateurs.sparsity.prune as sparsity_prune
import secateurs.model.load as model_load
from secateurs.api import PruneConfig, prune, save
from secateurs.cli import app
from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import BlockData, EngineOptions, capture_inputs
from secateurs.errors import NumericalError, UsageError
from secateurs.model.linear import weight_matrix
from secateurs.sparsity.masks import Pattern, is_nm, nm_mask
from secateurs.sparsity.permute import ChannelPermutation, choose_permutation, kept_score
from secateurs.sparsity.reconstruct import BlockReconstruction, ReconstructOptions

CPU = EngineOptions(device="cpu")


def _prune(loaded, config: PruneConfig, ids: torch.Tensor) -> api.PruneReport:
    with mock.patch.object(sparsity_prune, "calibration_ids", lambda *a, **k: ids):
        return prune(loaded, config, CalibConfig("wikitext2", len(ids), ids.shape[1]), CPU)


def _block_data(loaded, ids: torch.Tensor) -> tuple[torch.nn.Module, BlockData]:
    """Block 0 with its calibration inputs and the dense block's outputs as targets."""
    captured = capture_inputs(loaded.model, loaded.spec, list(ids.split(1)), torch.device("cpu"))
    block = loaded.spec.blocks_of(loaded.model)[0]
    data = BlockData(captured.hidden, captured.block_kwargs[0], [], torch.device("cpu"))
    with torch.no_grad():
        data.targets = [data.output(block, b) for b in range(len(data.inputs))]
    return block, data


def _relative_error(block, data: BlockData) -> float:
    with torch.no_grad():
        error = sum(float((data.output(block, b) - t).square().sum()) for b, t in enumerate(data.targets))
    return error / sum(float(t.square().sum()) for t in data.targets)


def test_reconstruction_lowers_block_error_and_never_changes_a_mask():
    loaded = tiny_model("llama")
    block, data = _block_data(loaded, random_ids(6, 32))
    linears = loaded.spec.linears(block)
    for module in linears.values():  # 2:4 by magnitude, as any method would leave it
        weight = weight_matrix(module)
        weight.mul_(nm_mask(weight.abs(), 2, 4))
    masks = {name: weight_matrix(m).ne(0).clone() for name, m in linears.items()}
    before = _relative_error(block, data)
    step = BlockReconstruction(ReconstructOptions(steps=20, batch=2))
    step(0, block, linears, data)
    after = _relative_error(block, data)
    assert after < 0.7 * before, (before, after)
    for name, module in linears.items():
        assert torch.equal(weight_matrix(module).ne(0), masks[name]), name
        assert not module.weight.requires_grad and module.weight.grad is None
    assert step.errors[0][1] < step.errors[0][0]


@pytest.mark.parametrize("method,pattern,sparsity", [("wanda", "2:4", None), ("sparsegpt", "unstructured", 0.6),
                                                     ("magnitude", "unstructured", 0.5)])
def test_reconstruction_in_the_engine_keeps_every_mask(method, pattern, sparsity):
    """After any method and pattern: the masks the method chose are exactly the masks saved."""
    loaded = tiny_model("llama")
    seen = []
    real = BlockReconstruction.__call__

    def spy(self, index, block, linears, data):
        before = {n: weight_matrix(m).ne(0).clone() for n, m in linears.items()}
        weights = {n: weight_matrix(m).clone() for n, m in linears.items()}
        real(self, index, block, linears, data)
        after = {n: weight_matrix(m).ne(0) for n, m in linears.items()}
        moved = any(not torch.equal(weight_matrix(m), weights[n]) for n, m in linears.items())
        seen.append(all(torch.equal(before[n], after[n]) for n in linears) and moved)

    config = PruneConfig(method, sparsity, pattern, reconstruct={"steps": 3, "lr": 1e-3})
    with mock.patch.object(BlockReconstruction, "__call__", spy):
        report = _prune(loaded, config, random_ids(4, 32))
    assert seen == [True] * 3
    if pattern == "2:4":
        assert all(is_nm(weight_matrix(m), 2, 4) for m in api.prunable_linears(loaded).values())
    else:
        assert abs(report.achieved - sparsity) < 0.02


def test_choose_permutation_never_keeps_less_and_helps_clustered_channels():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 32, generator=g)
    scores[:, :8] += 5  # the strong channels sit together: contiguous groups must drop strong weights
    perm = choose_permutation(scores, 2, 4, rounds=8)
    assert sorted(perm.tolist()) == list(range(32))
    assert kept_score(scores[:, perm], 2, 4) > kept_score(scores, 2, 4) * 1.05
    plain = choose_permutation(scores, 2, 4, rounds=0)
    assert kept_score(scores[:, perm], 2, 4) >= kept_score(scores[:, plain], 2, 4) - 1e-9


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_permuted_2of4_equals_the_unpermuted_computation_and_saves_plain(arch, tmp_path):
    ids = random_ids(4, 32)
    permuted = tiny_model(arch)
    steps = []

    class Recording(ChannelPermutation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            steps.append(self)

    with mock.patch.object(sparsity_prune, "ChannelPermutation", Recording):
        report = _prune(permuted, PruneConfig("ria", None, "2:4", permute=True), ids)
    assert all(after >= before for before, after in report.steps["permute"].values())
    spec = permuted.spec
    *producers, consumer = spec.mlp
    # Undo each block's permutation on the pruned weights: the same masks in the original channel order.
    unpermuted = copy.deepcopy(permuted)
    moved = False
    for i, block in enumerate(spec.blocks_of(unpermuted.model)):
        inverse = torch.argsort(steps[0].perms[i])
        down = weight_matrix(block.get_submodule(consumer))
        down.copy_(down[:, inverse])
        moved |= not is_nm(down, 2, 4)
        for name in producers:
            module = block.get_submodule(name)
            weight = weight_matrix(module)
            halves = weight.shape[0] // inverse.numel()
            index = torch.cat([inverse + h * inverse.numel() for h in range(halves)])
            weight.copy_(weight[index])
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(module.bias[index])
    assert moved, "the permutation changed no group: the test could not see a wrong fold"
    with torch.no_grad():
        a = permuted.model(ids).logits
        b = unpermuted.model(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    out = save(permuted, tmp_path / "out", [report.stage_record()])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    linears = [m for block in spec.blocks_of(reloaded) for m in spec.linears(block).values()]
    assert all(is_nm(weight_matrix(m), 2, 4) for m in linears)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, a, atol=1e-5)


def test_permutation_alone_keeps_the_function():
    loaded = tiny_model("llama")
    ids = random_ids(2, 16)
    with torch.no_grad():
        dense = loaded.model(ids).logits
    step = ChannelPermutation(loaded.spec, Pattern(2, 4))
    g = torch.Generator().manual_seed(1)
    for i, block in enumerate(loaded.spec.blocks_of(loaded.model)):
        step(i, block, loaded.spec.linears(block), {}, lambda w, s: torch.rand(w.shape, generator=g))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, dense, atol=1e-5)


def test_ria_scores_relative_to_row_and_column():
    from secateurs.engine.stats import InputSqNorm
    from secateurs.sparsity.ria import ria_scores

    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    norm = InputSqNorm(2, torch.device("cpu"))
    norm.update(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    got = ria_scores(w, norm, 0.5)
    expected = torch.tensor([[1 / 4 + 1 / 3, 2 / 6 + 2 / 3], [3 / 4 + 3 / 7, 4 / 6 + 4 / 7]])
    expected = expected * torch.tensor([2.0, 3.0]).sqrt()
    assert torch.allclose(got, expected)


def test_nan_reconstruction_loss_names_the_block_and_the_setting():
    loaded = tiny_model("llama")
    nan_output = lambda self, block, b: torch.full_like(self.targets[b], float("nan"), requires_grad=True)  # noqa: E731
    with mock.patch.object(BlockData, "output", nan_output), pytest.raises(NumericalError, match=r"block 0: .*NaN or inf before reconstruction"):
        _prune(loaded, PruneConfig("wanda", 0.5, reconstruct={}), random_ids(2, 16))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    loaded = tiny_model("llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    text = folder / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return folder


@pytest.mark.parametrize("flags,message", [
    (["--method", "wanda", "--reconstruct", "on"], "pass --calib"),
    (["--calib", "CALIB", "--reconstruct", "steps=0"], "steps must be in"),
    (["--calib", "CALIB", "--reconstruct", "steps=20000"], "steps must be in"),
    (["--calib", "CALIB", "--reconstruct", "lr=2"], "lr must be in"),
    (["--calib", "CALIB", "--reconstruct", "lr=0"], "lr must be in"),
    (["--calib", "CALIB", "--reconstruct", "steps=ten"], "expected int"),
    (["--calib", "CALIB", "--reconstruct", "epochs=2"], "unknown --reconstruct option"),
    (["--calib", "CALIB", "--reconstruct", "fast"], "key=value"),
    (["--calib", "CALIB", "--permute"], "--pattern N:M"),
    (["--calib", "CALIB", "--permute", "--sparsity", "0.6"], "--pattern N:M"),
    (["--calib", "CALIB", "--reconstruct", "on", "--nproc", "2"], "drop --nproc"),
])
def test_new_options_are_one_line_errors_before_the_model_loads(tiny_folder, tmp_path, flags, message):
    flags = [str(tiny_folder / "calib.txt") if f == "CALIB" else f for f in flags]
    out = tmp_path / "o"
    with mock.patch.object(model_load, "load_model", side_effect=AssertionError("loaded")) as load:
        result = CliRunner().invoke(app, ["prune", str(tiny_folder), "--out", str(out), "--device", "cpu", *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not load.called and not out.exists()


def test_api_validates_the_new_options():
    with pytest.raises(UsageError, match="lr must be in"):
        PruneConfig("wanda", reconstruct={"lr": 5.0}).check(CalibConfig("wikitext2", 2, 16))
    with pytest.raises(UsageError, match="pass --calib"):
        PruneConfig("magnitude", reconstruct={}).check(None)
    with pytest.raises(UsageError, match="N:M"):
        PruneConfig("ria", 0.5, permute=True).check(None)
    assert PruneConfig("ria", None, "2:4", permute=True).check(None) is None


def test_cli_reconstruct_and_permute_end_to_end(tiny_folder, tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["prune", str(tiny_folder), "--out", str(out), "--device", "cpu",
                                      "--calib", str(tiny_folder / "calib.txt"), "--n-samples", "2", "--seq-len", "16",
                                      "--method", "ria", "--pattern", "2:4", "--permute", "--reconstruct", "steps=2,lr=1e-4"])
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    spec = tiny_model("llama").spec
    assert all(is_nm(weight_matrix(m), 2, 4) for block in spec.blocks_of(reloaded) for m in spec.linears(block).values())


def test_atp_schedule_rises_with_depth_at_the_target_mean():
    from secateurs.sparsity.atp import atp_schedule

    schedule = atp_schedule(0.7, 30, 0.2)
    assert abs(sum(schedule) / 30 - 0.7) < 1e-9 and abs(schedule[-1] - schedule[0] - 0.2) < 1e-9
    assert all(b > a for a, b in zip(schedule, schedule[1:]))
    with pytest.raises(UsageError, match="lower --atp-spread"):
        atp_schedule(0.9, 30, 0.5)


def test_atp_search_restores_the_dense_weights_and_keeps_the_mean():
    from secateurs.sparsity.atp import AtpOptions, atp_target
    from secateurs.sparsity.base import SparsityTarget

    loaded = tiny_model("llama")
    before = {n: weight_matrix(m).clone() for n, m in api.prunable_linears(loaded).items()}
    target = SparsityTarget.build(0.6, "unstructured", 3)
    chosen, losses = atp_target(loaded.model, loaded.spec, target, random_ids(4, 16), CPU, AtpOptions())
    assert len(losses) >= 3 and chosen.per_block == tuple(sorted(chosen.per_block))
    assert abs(chosen.mean - 0.6) < 1e-9
    spread = chosen.per_block[-1] - chosen.per_block[0]
    assert min(losses, key=losses.get) == pytest.approx(spread)
    assert all(torch.equal(weight_matrix(m), before[n]) for n, m in api.prunable_linears(loaded).items())
    report = _prune(loaded, PruneConfig("wanda", 0.6, allocation="atp", allocation_options={"spread": 0.1}), random_ids(4, 16))
    assert report.target.per_block[0] == pytest.approx(0.55) and report.target.per_block[-1] == pytest.approx(0.65)


@pytest.mark.parametrize("flags,message", [
    (["--method", "wanda", "--sparsity", "0.7", "--allocation", "atp"], "pass --calib or --atp-spread"),
    (["--calib", "CALIB", "--pattern", "2:4", "--allocation", "atp"], "use --pattern unstructured"),
    (["--calib", "CALIB", "--sparsity", "0.7", "--allocation", "atp", "--atp-spread", "1.5"], "--atp-spread must be in"),
    (["--calib", "CALIB", "--allocation", "evenly"], "unknown allocation"),
])
def test_allocation_options_are_errors_before_the_model_loads(tiny_folder, tmp_path, flags, message):
    test_new_options_are_one_line_errors_before_the_model_loads(tiny_folder, tmp_path, flags, message)
