"""Every architecture's tiny model: ArchSpec finds its parts, the engine reproduces the full model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, random_ids, tiny_model

from secateurs.api import PruneConfig, prune
from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import BlockMethod, EngineOptions, run_blocks
from secateurs.engine.stats import Hessian, InputSqNorm
from secateurs.errors import UsageError
from secateurs.model.arch import SPECS, spec_for
from secateurs.model.experts import ExpertLinear
from secateurs.model.linear import in_features, oriented, out_features, sync_features, weight_dim, weight_matrix


class Recorder(BlockMethod):
    """Observe-only method: keeps every block's input and output, and the statistics it saw."""

    needs_calibration = True
    modifies_weights = False
    statistics = {"norm": InputSqNorm, "hessian": Hessian}

    def __init__(self) -> None:
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.stats = {}

    def observe(self, index, inputs, outputs):
        self.inputs.setdefault(index, []).append(inputs.clone())
        self.outputs.setdefault(index, []).append(outputs.clone())

    def process_block(self, index, block, linears, stats):
        self.stats[index] = stats


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_finds_blocks_and_linears(arch):
    loaded = tiny_model(arch)
    spec = loaded.spec
    blocks = spec.blocks_of(loaded.model)
    assert len(blocks) == spec.num_layers(loaded.model.config) == 3
    linears = spec.linears(blocks[0])
    assert len(linears) >= 4
    for path in spec.norms:
        blocks[0].get_submodule(path)
    for name, module in linears.items():
        assert weight_matrix(module).ndim == 2, name
    loaded.model.get_submodule(spec.lm_head)
    if spec.final_norm:
        loaded.model.get_submodule(spec.final_norm)


@pytest.mark.parametrize("arch", ARCHS)
def test_named_linears_and_orientation(arch):
    """``named_linears`` lists every block linear once by a path that resolves to it, and the (out, in)
    view, the stored dimension surgery cuts and ``sync_features`` agree for Linear and Conv1D alike."""
    loaded = tiny_model(arch)
    spec = loaded.spec
    named = spec.named_linears(loaded.model)
    blocks = spec.blocks_of(loaded.model)
    assert len(named) == len(blocks) * len(spec.linears(blocks[0]))
    for path, module in named.items():
        if isinstance(module, ExpertLinear):  # a view of one expert of a fused 3-D parameter
            parent, name, index = path.rsplit(".", 2)
            fused = getattr(loaded.model.get_submodule(parent), name)
            assert (module.experts, module.name, module.index) == (loaded.model.get_submodule(parent), name, int(index))
            assert module.weight.data_ptr() == fused[int(index)].data_ptr()
        else:
            assert loaded.model.get_submodule(path) is module
        weight = weight_matrix(module)
        assert weight.data_ptr() == module.weight.data_ptr()
        assert module.weight.shape[weight_dim(module, "out")] == weight.shape[0] == out_features(module)
        assert module.weight.shape[weight_dim(module, "in")] == weight.shape[1] == in_features(module)
        torch.testing.assert_close(oriented(module, module.weight.data), weight)
        assert (module.weight.data.index_select(weight_dim(module, "out"), torch.tensor([1])).flatten()
                == weight[1]).all()
    first = next(iter(named.values()))
    first.weight = torch.nn.Parameter(first.weight.data.narrow(weight_dim(first, "out"), 0, 2))
    sync_features(first)
    assert out_features(first) == 2 and "2" in repr(first)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_by_block_equals_full_model(arch):
    loaded = tiny_model(arch)
    ids = random_ids(3, 24)
    with torch.no_grad():
        full = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    recorder = Recorder()
    run_blocks(loaded.model, loaded.spec, recorder, ids, EngineOptions(device="cpu", batch_size=2))
    n = len(loaded.spec.blocks_of(loaded.model))
    for i in range(n):
        got_in = torch.cat(recorder.inputs[i])
        torch.testing.assert_close(got_in, full[i], rtol=1e-5, atol=1e-5)
    for i in range(n - 1):
        torch.testing.assert_close(torch.cat(recorder.outputs[i]), full[i + 1], rtol=1e-5, atol=1e-5)
    stats = recorder.stats[0]
    name, first = next(iter(stats.items()))
    assert first["norm"].n_tokens == 3 * 24
    assert first["norm"].sum_sq.shape[0] == first["hessian"].xtx.shape[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_sparsity_prune_leaves_outputs_unchanged(arch):
    loaded = tiny_model(arch)
    ids = random_ids(2, 16)
    with torch.no_grad():
        before = loaded.model(input_ids=ids, use_cache=False).logits
    report = prune(loaded, PruneConfig("magnitude", 0.0), None, EngineOptions(device="cpu"))
    with torch.no_grad():
        after = loaded.model(input_ids=ids, use_cache=False).logits
    assert report.achieved < 0.05
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_reaches_exact_sparsity_and_changes_outputs(arch):
    loaded = tiny_model(arch)
    ids = random_ids(2, 16)
    with torch.no_grad():
        before = loaded.model(input_ids=ids, use_cache=False).logits
    report = prune(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"}), None, EngineOptions(device="cpu"))
    for name, value in report.per_layer.items():
        assert value == pytest.approx(0.5, abs=1e-9), name
    with torch.no_grad():
        after = loaded.model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(before, after)
    assert torch.isfinite(after).all()


def test_statistics_are_exact_sums():
    loaded = tiny_model("llama")
    ids = random_ids(4, 8)
    whole, halves = Recorder(), [Recorder(), Recorder()]
    run_blocks(loaded.model, loaded.spec, whole, ids, EngineOptions(device="cpu"))
    for half, part in zip(halves, ids.split(2), strict=True):
        run_blocks(loaded.model, loaded.spec, half, part, EngineOptions(device="cpu"))
    for name, accs in whole.stats[1].items():
        merged = halves[0].stats[1][name]
        for kind, acc in merged.items():
            acc.merge(halves[1].stats[1][name][kind])
            for a, b in zip(acc.tensors(), accs[kind].tensors(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        x_norm = merged["norm"]
        torch.testing.assert_close(x_norm.sum_sq, torch.diagonal(merged["hessian"].xtx), rtol=1e-5, atol=1e-4)


def test_unknown_architecture_names_supported():
    class Config:
        model_type = "mamba"

    with pytest.raises(UsageError, match="supported model_type values: .*llama"):
        spec_for(Config())


def test_nan_weights_reported_with_block():
    from secateurs.errors import NumericalError

    loaded = tiny_model("llama")
    blocks = loaded.spec.blocks_of(loaded.model)
    blocks[2].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="block 2"):
        prune(loaded, PruneConfig("magnitude", 0.5), None, EngineOptions(device="cpu"))


def test_nan_activations_reported_with_block():
    from secateurs.errors import NumericalError

    loaded = tiny_model("llama")
    blocks = loaded.spec.blocks_of(loaded.model)
    blocks[1].post_attention_layernorm.weight.data[:] = float("inf")
    with pytest.raises(NumericalError, match="block 1"):
        run_blocks(loaded.model, loaded.spec, Recorder(), random_ids(2, 8), EngineOptions(device="cpu"))


def test_method_needing_data_says_so():
    loaded = tiny_model("llama")
    with pytest.raises(UsageError, match="calibration"):
        run_blocks(loaded.model, loaded.spec, Recorder(), None, EngineOptions(device="cpu"))


def test_text_calibration_is_seeded(tmp_path):
    loaded = tiny_model("llama")
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    a = CalibConfig(str(text), n_samples=4, seq_len=16, seed=3)
    from secateurs.data.calib import calibration_ids

    first, again = calibration_ids(a, loaded.tokenizer), calibration_ids(a, loaded.tokenizer)
    other = calibration_ids(CalibConfig(str(text), 4, 16, seed=4), loaded.tokenizer)
    assert first.shape == (4, 16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_in_half_precision_matches_full_model(dtype):
    loaded = tiny_model("llama")
    loaded.model.to(dtype)
    ids = random_ids(2, 16)
    with torch.no_grad():
        full = loaded.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    recorder = Recorder()
    run_blocks(loaded.model, loaded.spec, recorder, ids, EngineOptions(device="cpu"))
    assert recorder.outputs[0][0].dtype == dtype
    torch.testing.assert_close(torch.cat(recorder.outputs[1]), full[2])
    assert recorder.stats[0]["self_attn.q_proj"]["hessian"].xtx.dtype == torch.float32


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    from secateurs.model.load import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="hub is not reachable.*pass a local folder"):
        load_model("someorg/some-model-that-is-not-cached")


def test_every_arch_spec_has_a_tiny_model():
    """Each ArchSpec entry is exercised by the engine and surgery tests above through a tiny model."""
    covered = {spec_for(tiny_model(arch).model).name for arch in ARCHS}
    assert covered == {spec.name for spec in SPECS}


def test_engine_refuses_a_zero_batch_size():
    loaded = tiny_model("llama")
    with pytest.raises(UsageError, match="batch size must be at least 1"):
        run_blocks(loaded.model, loaded.spec, Recorder(), random_ids(2, 8), EngineOptions(device="cpu", batch_size=0))
