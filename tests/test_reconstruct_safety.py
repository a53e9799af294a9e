"""Block reconstruction never leaves a block worse than the method left it (issue 35), on any weight
scale, and says what it did when it could not help: too little calibration to hold out, a step that
makes every block worse, NaN/inf."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from tiny_models import random_ids, tiny_model
from typer.testing import CliRunner

import secateurs.sparsity.prune as sparsity_prune
from secateurs.api import PruneConfig, prune
from secateurs.cli import app
from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import BlockData, EngineOptions, capture_inputs
from secateurs.errors import NumericalError
from secateurs.model.linear import weight_matrix
from secateurs.sparsity.masks import nm_mask
from secateurs.sparsity.reconstruct import BlockReconstruction, ReconstructOptions, _relative_error, _split

CPU = EngineOptions(device="cpu")


def _pruned_block(scale: float, n: int = 8, arch: str = "llama") -> tuple[torch.nn.Module, dict, BlockData]:
    """Block 0 of a tiny model with its linears scaled by ``scale`` (the dense targets made from the
    scaled weights), then pruned 2:4 by magnitude, as any method might leave it."""
    loaded = tiny_model(arch)
    block = loaded.spec.blocks_of(loaded.model)[0]
    linears = loaded.spec.linears(block)
    with torch.no_grad():
        for module in linears.values():
            weight_matrix(module).mul_(scale)
    captured = capture_inputs(loaded.model, loaded.spec, list(random_ids(n, 32).split(1)), torch.device("cpu"))
    data = BlockData(captured.hidden, captured.block_kwargs[0], [], torch.device("cpu"))
    with torch.no_grad():
        data.targets = [data.output(block, b) for b in range(n)]
        for module in linears.values():
            weight = weight_matrix(module)
            weight.mul_(nm_mask(weight.abs(), 2, 4))
    return block, linears, data


@pytest.mark.parametrize("scale", [1.0, 1 / 50])
def test_small_weights_never_come_out_worse_and_still_improve(scale):
    """Weights 50× smaller stand in for a model whose weights are small. Gemma 3 normalises each
    branch's output, so the branch's direction, not its size, carries the error: the old absolute
    Adam step (lr 1e-3) moved such weights by more than their own size and took this block's
    held-out error from 0.00019 to 0.22; a step relative to the weights' RMS does not."""
    block, linears, data = _pruned_block(scale, arch="gemma3")
    _, held = _split(len(data.inputs), ReconstructOptions().holdout)
    before = _relative_error(block, data, held)
    step = BlockReconstruction(ReconstructOptions())
    step(0, block, linears, data)
    after = _relative_error(block, data, held)
    outcome = step.outcomes[0]
    assert after <= before
    assert outcome.start == pytest.approx(before) and outcome.kept == pytest.approx(after)
    assert outcome.held_out == 2 and outcome.step > 0 and after < 0.9 * before, (before, after)


def test_a_step_that_makes_every_block_worse_leaves_the_model_as_the_method_made_it():
    loaded = tiny_model("llama")
    ids = random_ids(4, 32)
    plain = tiny_model("llama")
    calib = CalibConfig("wikitext2", len(ids), ids.shape[1])
    with mock.patch.object(sparsity_prune, "calibration_ids", lambda *a, **k: ids):
        prune(plain, PruneConfig("wanda", None, "2:4"), calib, CPU)
        report = prune(loaded, PruneConfig("wanda", None, "2:4", reconstruct={"lr": 1.0, "steps": 4, "check": 1}), calib, CPU)
    for (name, a), b in zip(plain.model.named_parameters(), loaded.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    n_blocks = len(report.reconstruction)
    assert n_blocks == loaded.spec.num_layers(loaded.model.config)
    assert all(o["step"] == 0 and o["kept"] == o["start"] for o in report.reconstruction.values())
    assert all(o["train_last"] > o["train_first"] for o in report.reconstruction.values())
    assert report.notes == [f"secateurs: reconstruction skipped for every block ({n_blocks} of {n_blocks}): no step lowered "
                   "the held-out block error, so they keep the method's weights (try a smaller --reconstruct lr, now 1)"]
    record = report.stage_record().reconstruction
    assert record["0"]["step"] == 0 and record["0"]["held_out"] == 1


def test_one_calibration_batch_cannot_hold_out_and_says_what_chooses_instead(capsys):
    block, linears, data = _pruned_block(1.0, n=1)
    before = _relative_error(block, data, [0])
    step = BlockReconstruction(ReconstructOptions(steps=8))
    step(0, block, linears, data)
    step(1, block, linears, data)
    assert step.outcomes[0].held_out == 0 and step.outcomes[0].kept <= before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 calibration batch: no batch is held out" in err[0]


def test_a_loss_that_turns_nan_mid_training_keeps_the_best_weights_seen():
    block, linears, data = _pruned_block(1.0)
    real = BlockData.output
    calls = {"n": 0}

    def late_nan(self, module, b):
        out = real(self, module, b)
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 40 and torch.is_grad_enabled() else out

    before = [weight_matrix(m).clone() for m in linears.values()]
    step = BlockReconstruction(ReconstructOptions(steps=64, check=4))
    with mock.patch.object(BlockData, "output", late_nan):
        step(0, block, linears, data)
    outcome = step.outcomes[0]
    assert outcome.stopped and "NaN/inf" in outcome.stopped
    assert outcome.kept <= outcome.start
    assert all(torch.isfinite(weight_matrix(m)).all() for m in linears.values())
    assert all(torch.equal(weight_matrix(m).ne(0), w.ne(0)) for m, w in zip(linears.values(), before, strict=True))


def test_nan_block_output_is_one_line_naming_the_block_and_nothing_is_saved(tmp_path):
    loaded = tiny_model("llama")
    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    (folder / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    real = BlockData.output

    def nan_in_block_1(self, block, b):
        out = real(self, block, b)
        return out * float("nan") if block is self.nan_block else out

    out = tmp_path / "o"
    blocks = []
    def spy_call(self, index, block, linears, data):
        data.nan_block = block if index == 1 else None
        blocks.append(index)
        return real_call(self, index, block, linears, data)

    real_call = BlockReconstruction.__call__
    with mock.patch.object(BlockData, "output", nan_in_block_1), mock.patch.object(BlockReconstruction, "__call__", spy_call):
        result = CliRunner().invoke(app, ["prune", str(folder), "--out", str(out), "--device", "cpu",
                                          "--calib", str(folder / "calib.txt"), "--n-samples", "4", "--seq-len", "16",
                                          "--method", "wanda", "--pattern", "2:4", "--reconstruct", "steps=2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if "block 1" in line]
    assert len(lines) == 1 and "NaN or inf before reconstruction" in lines[0], result.output
    assert blocks == [0, 1] and not out.exists()


def test_direct_nan_start_raises_numerical_error():
    block, linears, data = _pruned_block(1.0)
    data.targets[-1] = torch.full_like(data.targets[-1], float("inf"))
    with pytest.raises(NumericalError, match=r"^block 3: .*NaN or inf before reconstruction"):
        BlockReconstruction(ReconstructOptions())(3, block, linears, data)


def test_a_half_precision_block_is_judged_in_its_own_dtype_and_stays_in_it():
    """Training runs in float32; the kept weights are rounded back to bfloat16 and re-measured there,
    so rounding cannot hand back a block worse than the method's."""
    block, linears, data = _pruned_block(1.0)
    block.to(torch.bfloat16)
    data.inputs = [x.to(torch.bfloat16) for x in data.inputs]
    half = lambda v: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point()  # noqa: E731
                      else tuple(map(half, v)) if isinstance(v, tuple) else v)
    data.kwargs = [{k: half(v) for k, v in kw.items()} for kw in data.kwargs]
    _, held = _split(len(data.inputs), 0.25)
    before = _relative_error(block, data, held)
    step = BlockReconstruction(ReconstructOptions())
    step(0, block, linears, data)
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())
    assert step.outcomes[0].start == pytest.approx(before)
    assert _relative_error(block, data, held) == pytest.approx(step.outcomes[0].kept) and step.outcomes[0].kept <= before


def test_report_says_per_run_how_many_blocks_kept_trained_weights(tmp_path):
    import json

    from secateurs.record import run_record

    loaded = tiny_model("llama")
    ids = random_ids(4, 32)
    with mock.patch.object(sparsity_prune, "calibration_ids", lambda *a, **k: ids):
        report = prune(loaded, PruneConfig("wanda", None, "2:4", reconstruct={"lr": 1.0, "steps": 2, "check": 1}),
                       CalibConfig("wikitext2", 4, 32), CPU)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"runs": [run_record("wanda 2:4 + rec", "tiny", [report.stage_record()], {"wikitext2": 9.0})]}))
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert ("- wanda 2:4 + rec: reconstruction kept trained weights in 0 of 3 blocks (held-out block error × 1.000 "
            "on average); left as the method made them: blocks 0, 1, 2") in text
