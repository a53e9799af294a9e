"""Every stage kind a command writes is read back by ``secateurs report`` under its own label and kind:
a sheared, LoRAPrune, iterative or LoRA-recovered output is never shown as the dense baseline. Each
writer returns the typed record of its kind (``secateurs.record.STAGE_KINDS``), which reads back as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

import secateurs
from secateurs.api import PruneConfig, prune, save, shear
from secateurs.data.calib import CalibConfig
from secateurs.depth.prune import LayerConfig, prune_layers
from secateurs.record import STAGE_KINDS, StageRecord, parse_stage
from secateurs.recover.iterative import prune_iterative
from secateurs.recover.lora import RecoverConfig, recover_lora
from secateurs.recover.loraprune import LoRAPruneConfig, loraprune
from secateurs.runs import load_run
from secateurs.structured.base import WidthConfig, prune_width
from secateurs.structured.shearing import ShearConfig, ShearTarget

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _train(text_file: str, steps: int = 4) -> RecoverConfig:
    return RecoverConfig(steps=steps, lr=1e-2, seq_len=16, batch_size=2, data=text_file, warmup_steps=0)


def _shear(loaded, text_file):
    config = ShearConfig(ShearTarget(layers=2, intermediate=64), datasets=[text_file], steps=2, batch_size=2,
                         seq_len=16, eval_windows=1, update_every=1)
    return [shear(loaded, config).stage_record()]


def _loraprune_heads(loaded, text_file):
    return [loraprune(loaded, LoRAPruneConfig(0.5, "both", 0, 0, prune_every=2), _train(text_file), CPU).stage_record()]


def _loraprune_unstructured(loaded, text_file):
    config = LoRAPruneConfig(0.5, "unstructured", 0, 0, prune_every=2)
    return [loraprune(loaded, config, _train(text_file), CPU).stage_record()]


def _iterative(loaded, text_file):
    config = PruneConfig("magnitude", 0.5, options={"per": "row"})
    return [prune_iterative(loaded, config, 2, _train(text_file, steps=2)).stage_record()]


def _prune_then_lora(loaded, text_file):
    first = prune(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"})).stage_record()
    return [first, recover_lora(loaded, _train(text_file, steps=2), CPU).stage_record()]


def _magnitude(loaded, text_file):
    return [prune(loaded, PruneConfig("magnitude", 0.5, "2:4")).stage_record()]


def _layers(loaded, text_file):
    calib = CalibConfig(text_file, n_samples=2, seq_len=16)
    return [prune_layers(loaded, LayerConfig("angular", remove=1), calib).stage_record()]


def _width(loaded, text_file):
    return [prune_width(loaded, WidthConfig("magnitude", 0.5, target="channels")).stage_record()]


def _layers_then_prune(loaded, text_file):
    return _layers(loaded, text_file) + [prune(loaded, PruneConfig("magnitude", 0.5)).stage_record()]


CASES = {
    "prune": (_magnitude, "magnitude 2:4", "sparsity"),
    "layers": (_layers, "angular", "layers removed"),
    "width": (_width, "magnitude", "width removed"),
    "layers-then-prune": (_layers_then_prune, "magnitude", "sparsity"),
    "shear": (_shear, "llm-shearing", "width removed"),
    "loraprune-structured": (_loraprune_heads, "loraprune", "width removed"),
    "loraprune-unstructured": (_loraprune_unstructured, "loraprune", "sparsity"),
    "prune_iterative": (_iterative, "magnitude iterative", "sparsity"),
    "recover": (_prune_then_lora, "magnitude + lora", "sparsity"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_stage_kind_is_labelled_by_its_method(case, text_file, tmp_path):
    write, method, kind = CASES[case]
    loaded = tiny_model("llama")
    records = write(loaded, str(text_file))
    for record in records:
        assert parse_stage(record.to_dict()) == record
    out = save(loaded, tmp_path / case, records)
    run = load_run(out)
    assert (run.method, run.kind) == (method, kind)
    assert 0.05 < run.removed < 0.95


def test_earlier_curves_stay_beside_later_ones(text_file, tmp_path):
    """Layer importance from a depth stage is still plotted after a later sparsity stage."""
    loaded = tiny_model("llama")
    run = load_run(save(loaded, tmp_path / "chain", _layers_then_prune(loaded, str(text_file))))
    assert set(run.layers) == {"importance", "sparsity"} and len(run.removed_layers) == 1


def test_an_unknown_or_older_stage_entry_still_opens():
    """A kind this version does not know is skipped; a record missing fields takes their defaults."""
    assert parse_stage({"stage": "some_future_kind"}) is None
    assert parse_stage({"stage": "prune", "method": "wanda", "pattern": "2:4"}).achieved_sparsity == {}


def test_every_written_stage_kind_has_a_reader():
    """Writers return their kind's record class rather than a dict spelled by hand (``to_dict`` alone
    writes the ``"stage"`` key), and every record class is read back by its kind."""
    hand_built = [path.name for path in Path(secateurs.__file__).parent.rglob("*.py")
                  if re.search(r'"stage": "[a-z_]+"', path.read_text())]
    assert hand_built == []
    assert set(STAGE_KINDS.values()) == set(StageRecord.__subclasses__())


def test_expert_pruning_is_read_as_experts_removed(tmp_path):
    """An ``experts`` stage is plotted by the fraction of routed experts removed, with the experts
    each MoE layer kept as its per-layer curve."""
    from tiny_models import random_ids

    from secateurs.engine.sequential import EngineOptions
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import prune_experts

    loaded = tiny_model("qwen3_moe")
    report = prune_experts(loaded, ExpertConfig("reap", keep=0.5), CalibConfig("self"), EngineOptions(device="cpu"),
                           calib_ids=random_ids(4, 16, seed=1))
    record = report.stage_record()
    assert parse_stage(record.to_dict()) == record
    run = load_run(save(loaded, tmp_path / "experts", [record]))
    assert (run.method, run.kind, run.removed) == ("reap", "experts removed", 0.5)
    assert run.layers["experts kept"] == {0: 2.0, 1: 2.0, 2: 2.0}
