"""Mixture-of-experts families: fused experts seen as per-expert linears (views), routed-token
statistics, expert pruning that equals the original router never picking the removed experts."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MOE_ARCHS, random_ids, tiny_model

from secateurs.engine.sequential import EngineOptions, run_blocks
from secateurs.errors import UsageError
from secateurs.model.arch import spec_for
from secateurs.model.experts import ExpertLinear
from secateurs.model.linear import weight_matrix


def test_an_unknown_moe_architecture_names_the_known_ones():
    class Config:
        model_type = "jetmoe"
        num_experts = 8

    with pytest.raises(UsageError, match=r"'jetmoe' \(a mixture-of-experts model\?; known .*mixtral.*qwen3_moe") as err:
        spec_for(Config())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_views_share_storage_with_the_fused_parameter(arch):
    """Masking an expert's (out, in) view zeroes exactly that expert's slice of the 3-D parameter."""
    loaded = tiny_model(arch)
    block = loaded.spec.blocks_of(loaded.model)[1]
    views = {n: m for n, m in loaded.spec.linears(block).items() if isinstance(m, ExpertLinear)}
    experts = loaded.spec.experts_of(block)
    assert len(views) == 2 * experts.gate_up_proj.shape[0]
    view = views["mlp.experts.down_proj.2"]
    weight_matrix(view)[0].zero_()
    stored = experts.down_proj.data[2]
    assert (stored.t()[0] if view.transposed else stored[0]).eq(0).all()
    assert experts.down_proj.data[1].ne(0).all()


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_dense_layers_of_an_moe_model_list_their_mlp(arch):
    """Qwen2-MoE's mlp_only_layers and DeepSeek's first dense layers are plain MLPs among MoE blocks."""
    dense = dict(mlp_only_layers=[0]) if arch == "qwen2_moe" else dict(first_k_dense_replace=1)
    loaded = tiny_model(arch, **dense)
    blocks = loaded.spec.blocks_of(loaded.model)
    assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= set(loaded.spec.linears(blocks[0]))
    assert loaded.spec.experts_of(blocks[0]) is None
    assert "mlp.experts.gate_up_proj.0" in loaded.spec.linears(blocks[1])


class _MaskedRouterF:
    """``torch.nn.functional`` for a modeling module, except that the router logits computed from the
    weights in ``masks`` (by storage) get the additive mask: -inf for the removed experts."""

    def __init__(self, masks: dict[int, torch.Tensor]) -> None:
        self.masks = masks

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)

    def linear(self, x, weight, bias=None):
        out = torch.nn.functional.linear(x, weight, bias)
        mask = self.masks.get(weight.data_ptr())
        return out if mask is None else out + mask


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_pruned_model_equals_a_router_that_never_picks_the_removed(arch, tmp_path, monkeypatch):
    import copy
    import sys

    import secateurs
    from secateurs.data.calib import CalibConfig
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import prune_experts

    loaded = tiny_model(arch)
    original = copy.deepcopy(loaded.model)
    report = prune_experts(loaded, ExpertConfig("reap", keep=0.5), CalibConfig("self"), EngineOptions(device="cpu"),
                           calib_ids=random_ids(4, 16, seed=1))
    assert report.n_experts_before == 4 and report.n_experts_after == 2
    masks = {}
    for index, block in enumerate(loaded.spec.blocks_of(original)):
        mask = torch.full((4,), float("-inf"))
        mask[report.kept[index]] = 0.0
        masks[loaded.spec.router_of(block).weight.data_ptr()] = mask
        assert len(report.kept[index]) == 2
    monkeypatch.setattr(sys.modules[type(original).__module__], "F", _MaskedRouterF(masks))
    ids = random_ids(2, 12, seed=2)
    with torch.no_grad():
        expected = original(ids).logits
        got = loaded.model(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        masks.clear()  # the unmasked original differs: the removed experts did matter
        assert not torch.allclose(original(ids).logits, expected, atol=1e-4)
    folder = secateurs.save(loaded, tmp_path / "out", [report])
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert getattr(reloaded.config, loaded.spec.moe.experts_key) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, got, atol=1e-5, rtol=1e-4)



def _folder(tmp_path, arch: str):
    loaded = tiny_model(arch)
    folder = tmp_path / "in"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


CALIB = ["--calib", "wikitext2", "--n-samples", "4", "--seq-len", "32", "--device", "cpu"]


def test_cli_experts_writes_a_folder_plain_transformers_loads(tmp_path):
    import json

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from secateurs.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["experts", str(_folder(tmp_path, "qwen3_moe")), "--method", "frequency",
                                      "--keep", "0.5", "--out", str(out), *CALIB])
    assert result.exit_code == 0, result.output
    stage = json.loads((out / "secateurs.json").read_text())["stages"][-1]
    assert stage["stage"] == "experts" and stage["experts_after"] == 2
    assert all(len(kept) == 2 for kept in stage["kept_experts"].values())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 2 and model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2


@pytest.mark.parametrize(
    "arch, args, message",
    [
        ("qwen3_moe", ["--keep", "0.25"], "keeps 1 of 4 experts, fewer than the router's top-k of 2"),
        ("llama", ["--keep", "0.5"], "llama is a dense model: expert pruning needs a mixture-of-experts model"),
        ("qwen3_moe", ["--method", "nope"], "unknown expert criterion 'nope'"),
        ("qwen3_moe", ["--keep", "1.5"], "--keep is the share of experts kept"),
    ],
)
def test_cli_experts_bad_input_is_one_line_and_writes_nothing(tmp_path, arch, args, message):
    from typer.testing import CliRunner

    from secateurs.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["experts", str(_folder(tmp_path, arch)), "--out", str(out), *CALIB, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_group_limited_routing_is_refused():
    from secateurs.moe.prune import moe_shape

    loaded = tiny_model("deepseek_v3")
    loaded.model.config.n_group = 2
    with pytest.raises(UsageError, match="n_group 1 only"):
        moe_shape(loaded.spec, loaded.model.config)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_four_pruning_reaches_every_expert(arch, method):
    """Every expert's gate/up and down matrix (a view of the fused parameter) has exact 2:4 zeros."""
    from secateurs.api import PruneConfig, prune
    from secateurs.data.calib import CalibConfig
    from secateurs.sparsity.masks import is_nm

    loaded = tiny_model(arch)
    calib = CalibConfig("self", n_samples=4, seq_len=16)
    prune(loaded, PruneConfig(method, pattern="2:4"), calib, EngineOptions(device="cpu"))
    views = [m for m in loaded.spec.named_linears(loaded.model).values() if isinstance(m, ExpertLinear)]
    assert len(views) == 3 * 4 * 2
    for view in views:
        assert is_nm(weight_matrix(view), 2, 4), view


class _Norms:
    """Observe-only method keeping every linear's statistics."""

    needs_calibration = True
    modifies_weights = False
    keeps_dense_outputs = False

    def __init__(self) -> None:
        from secateurs.engine.stats import InputSqNorm

        self.statistics = {"norm": InputSqNorm}
        self.stats = {}

    def observe(self, index, inputs, outputs):
        pass

    def process_block(self, index, block, linears, stats):
        self.stats[index] = stats


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_expert_statistics_use_only_the_tokens_routed_to_it(arch):
    """An expert's gate/up statistics sum exactly the squares of the tokens its router sent it, and its
    down projection's the intermediate activations of those tokens."""
    from secateurs.model.experts import expert_intermediate

    loaded = tiny_model(arch)
    experts = loaded.spec.experts_of(loaded.spec.blocks_of(loaded.model)[0])
    seen = []
    experts.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), args[1].clone())))
    method = _Norms()
    run_blocks(loaded.model, loaded.spec, method, random_ids(2, 16), EngineOptions(device="cpu", batch_size=2))
    (hidden, top_k), = seen
    for e in range(4):
        routed = hidden[(top_k == e).any(dim=-1)]
        gate_up = method.stats[0][f"mlp.experts.gate_up_proj.{e}"]["norm"]
        down = method.stats[0][f"mlp.experts.down_proj.{e}"]["norm"]
        assert gate_up.n_tokens == down.n_tokens == len(routed) < len(hidden)
        torch.testing.assert_close(gate_up.sum_sq, routed.float().pow(2).sum(0), rtol=1e-5, atol=1e-6)
        view = ExpertLinear(experts, "gate_up_proj", e, loaded.spec.moe.transposed)
        inner = expert_intermediate(experts, view(routed))
        torch.testing.assert_close(down.sum_sq, inner.float().pow(2).sum(0), rtol=1e-5, atol=1e-6)
    assert sum(method.stats[0][f"mlp.experts.gate_up_proj.{e}"]["norm"].n_tokens for e in range(4)) == 2 * 16 * 2
