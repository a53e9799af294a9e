"""One real-model check: SmolLM2-135M, magnitude 50%, WikiText-2 perplexity, reload in plain transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs.api import PruneConfig, evaluate_perplexity, prune, save
from secateurs.engine.sequential import EngineOptions
from secateurs.model.load import load_model

pytestmark = pytest.mark.slow


def test_magnitude_50_on_smollm2(tmp_path, smollm2_folder, data_dir):
    loaded = load_model("smollm2-135m")
    assert loaded.spec.num_layers(loaded.model.config) == 30
    dense = evaluate_perplexity(loaded, ["wikitext2"], seq_len=256, limit_windows=4, device="cpu")["wikitext2"]
    report = prune(loaded, PruneConfig("magnitude", 0.5), None, EngineOptions(device="cpu"))
    pruned = evaluate_perplexity(loaded, ["wikitext2"], seq_len=256, limit_windows=4, device="cpu")["wikitext2"]
    assert report.achieved == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(pruned.ppl) and pruned.ppl > dense.ppl > 1
    out = save(loaded, tmp_path / "smol-mag50", [report.stage_record()])
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    q = plain.model.layers[7].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(q, loaded.model.model.layers[7].self_attn.q_proj.weight)
