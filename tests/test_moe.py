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
    """A tiny model of ``arch`` saved with a tokenizer; ``qwen3_moe-8`` has 8 experts; ``granitemoe`` is
    an MoE family secateurs does not know (built from its transformers config, a known tokenizer)."""
    if arch == "granitemoe":
        from transformers import AutoModelForCausalLM, GraniteMoeConfig

        model = AutoModelForCausalLM.from_config(GraniteMoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
        folder = tmp_path / "in"
        model.save_pretrained(folder)
        tiny_model("llama").tokenizer.save_pretrained(folder)
        return folder
    loaded = tiny_model("qwen3_moe", num_experts=8) if arch == "qwen3_moe-8" else tiny_model(arch)
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
        ("qwen3_moe", ["--mode", "by-layer"], "--mode 'by-layer' is not known"),
        ("qwen3_moe-8", ["--seq-len", "2", "--n-samples", "1"],
         "calibration of 2 tokens routes 4 token slots (top-2), fewer than 8 experts × 1 tokens"),
        ("granitemoe", ["--keep", "0.5"], "'granitemoe' (a mixture-of-experts model?; known"),
    ],
)
def test_cli_experts_bad_input_is_one_line_and_writes_nothing(tmp_path, no_loading, arch, args, message):
    from typer.testing import CliRunner

    from secateurs.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["experts", str(_folder(tmp_path, arch)), "--out", str(out), *CALIB, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


GROUPED = {
    "deepseek_v3": dict(n_routed_experts=8, n_group=2, topk_group=1),
    "deepseek_v2": dict(n_routed_experts=8, n_group=2, topk_group=1, topk_method="group_limited_greedy"),
}


@pytest.mark.parametrize("arch", sorted(GROUPED))
def test_group_limited_routing_keeps_each_group_whole_and_equals_the_masked_router(arch, monkeypatch):
    """DeepSeek's router scores groups of experts, picks the best ``topk_group`` groups, then its top-k
    among their experts; keeping the same count in every group leaves that choice, for the kept
    experts, what it was: the pruned model equals the original whose removed experts can never win
    (V3: their score-correction bias −inf; V2: their logits −inf)."""
    import copy
    import sys

    from secateurs.data.calib import CalibConfig
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import prune_experts

    loaded = tiny_model(arch, **GROUPED[arch])
    blocks = loaded.spec.blocks_of(loaded.model)
    if arch == "deepseek_v3":  # a random correction bias, so that it matters which rows are kept
        for block in blocks:
            loaded.spec.router_of(block).e_score_correction_bias.normal_(0, 0.1)
    original = copy.deepcopy(loaded.model)
    report = prune_experts(loaded, ExpertConfig("frequency", keep=0.5), CalibConfig("self"), EngineOptions(device="cpu"),
                           calib_ids=random_ids(4, 16, seed=1))
    masks = {}
    for index, block in enumerate(loaded.spec.blocks_of(original)):
        kept = report.kept[index]
        assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept) == 2  # two in each group of four
        mask = torch.full((8,), float("-inf"))
        mask[kept] = 0.0
        router = loaded.spec.router_of(block)
        if arch == "deepseek_v3":
            router.e_score_correction_bias += mask
        else:
            masks[router.weight.data_ptr()] = mask
    monkeypatch.setattr(sys.modules[type(original).__module__], "F", _MaskedRouterF(masks))
    ids = random_ids(2, 12, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-4)
    assert loaded.model.config.n_group == 2 and getattr(loaded.model.config, loaded.spec.moe.experts_key) == 4


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(keep=0.25), "keeps 1 of 4 experts in each of 2 expert groups; the router needs 2 per group"),
        (dict(keep=0.5, mode="global"), "needs the same count in every group: use --mode uniform"),
    ],
)
def test_group_limited_routing_refuses_what_the_router_cannot_route(config, message):
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import moe_shape

    loaded = tiny_model("deepseek_v3", **GROUPED["deepseek_v3"])
    with pytest.raises(UsageError, match=message):
        moe_shape(loaded.spec, loaded.model.config).kept(ExpertConfig("reap", **config))


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


# --- unstructured / N:M on experts: starved experts, routers, shared experts, weighted statistics ---


def _routed_counts(loaded, ids) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert of each MoE block of the dense model (the routing a prune sees
    in its first block; later blocks see pruned inputs, so only block 0's counts are exact)."""
    from secateurs.model.experts import routing

    counts = {}
    for index, block in enumerate(loaded.spec.blocks_of(loaded.model)):
        experts = loaded.spec.experts_of(block)
        n = experts.gate_up_proj.shape[0]

        def count(module, args, kwargs, out, index=index, n=n):
            top_k = routing(args, kwargs)[1]
            counts[index] = counts.get(index, 0) + torch.bincount(top_k.flatten(), minlength=n)

        experts.register_forward_hook(count, with_kwargs=True)
    with torch.no_grad():
        loaded.model(ids)
    return counts


def _starve_expert(loaded, expert: int) -> None:
    """gpt-oss's router has a bias: a very negative one keeps the router from ever picking ``expert``."""
    for block in loaded.spec.blocks_of(loaded.model):
        loaded.spec.router_of(block).bias.data[expert] = -1e4


def _prune_moe(loaded, method="wanda", moe=None, pattern="unstructured", **config):
    from secateurs.api import PruneConfig, prune
    from secateurs.data.calib import CalibConfig

    calib = CalibConfig("self", n_samples=4, seq_len=16)
    return prune(loaded, PruneConfig(method, pattern=pattern, moe=moe or {}, **config), calib,
                 EngineOptions(device="cpu"))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_an_expert_no_token_reached_is_pruned_by_magnitude_and_listed(method):
    """Not one calibration token reaches expert 3: its statistics are empty (Wanda's scores would all
    tie), so it is pruned by |W| to the block's sparsity (Wanda per row; SparseGPT, whose identity
    Hessian makes no update, over each block of 128 columns, here the whole matrix) and named in the record."""
    from secateurs.model.linear import sparsity_of
    from secateurs.sparsity.masks import Pattern, select

    loaded = tiny_model("gpt_oss")
    _starve_expert(loaded, 3)
    blocks = loaded.spec.blocks_of(loaded.model)
    views = [loaded.spec.linears(b)["mlp.experts.down_proj.3"] for b in blocks]
    per = "row" if method == "wanda" else "layer"
    expected = [select(weight_matrix(v).abs().float(), 0.5, Pattern.parse("unstructured"), per) for v in views]
    before = [weight_matrix(v).clone() for v in views]
    report = _prune_moe(loaded, method)
    assert report.expert_fallback == {i: ["mlp.experts.gate_up_proj.3", "mlp.experts.down_proj.3"] for i in range(3)}
    for view, keep, dense in zip(views, expected, before, strict=True):
        assert torch.equal(weight_matrix(view) != 0, keep)
        assert torch.equal(weight_matrix(view)[keep], dense[keep])  # no SparseGPT update from an identity Hessian
        assert sparsity_of(weight_matrix(view)) == 0.5
    record = report.stage_record().to_dict()
    assert record["expert_fallback"]["0"] == ["mlp.experts.gate_up_proj.3", "mlp.experts.down_proj.3"]
    assert record["moe"]["fallback"] == "magnitude"
    assert any("pruned by weight magnitude" in note for note in report.notes)


def test_starved_experts_are_exactly_those_under_min_tokens_and_pooled_uses_the_layers_sums():
    """With min_tokens above some experts' share, exactly those fall back; under ``pooled`` a starved
    expert's Wanda mask is the one the layer's summed expert norms give."""
    from secateurs.engine.stats import InputSqNorm
    from secateurs.sparsity.masks import Pattern, select

    ids_count = _routed_counts(tiny_model("mixtral"), _self_ids())
    starved = [e for e in range(4) if ids_count[0][e] < 30]
    assert 0 < len(starved) < 4, ids_count[0]  # the seed gives both kinds
    loaded = tiny_model("mixtral")
    method = _Norms()
    run_blocks(loaded.model, loaded.spec, method, _self_ids(), EngineOptions(device="cpu"))
    view = {e: loaded.spec.linears(loaded.spec.blocks_of(loaded.model)[0])[f"mlp.experts.gate_up_proj.{e}"] for e in starved}
    pooled = sum(method.stats[0][f"mlp.experts.gate_up_proj.{e}"]["norm"].sum_sq for e in range(4))
    norm = InputSqNorm(64, torch.device("cpu"))
    norm.sum_sq = pooled
    expected = {e: select(weight_matrix(v).abs().float() * norm.norm, 0.5, Pattern.parse("unstructured"), "row")
                for e, v in view.items()}
    report = _prune_moe(loaded, moe={"fallback": "pooled", "min_tokens": "30"})
    fallen = [name for name in report.expert_fallback[0] if name.startswith("mlp.experts.gate_up_proj")]
    assert fallen == [f"mlp.experts.gate_up_proj.{e}" for e in starved]
    for e, keep in expected.items():
        assert torch.equal(weight_matrix(view[e]) != 0, keep)


def _self_ids() -> torch.Tensor:
    """The calibration windows ``_prune_moe`` builds (CalibConfig('self', 4, 16) on a tiny model)."""
    from secateurs.data.calib import CalibConfig, calibration_ids

    loaded = tiny_model("mixtral")
    return calibration_ids(CalibConfig("self", n_samples=4, seq_len=16), loaded.tokenizer, loaded.model)


def test_routers_stay_dense_by_default_and_are_pruned_on_request():
    from secateurs.model.linear import sparsity_of

    loaded = tiny_model("qwen2_moe")
    router = loaded.spec.router_of(loaded.spec.blocks_of(loaded.model)[0])
    report = _prune_moe(loaded)
    assert sparsity_of(router.weight.data) == 0.0
    assert not any(name.endswith("mlp.gate") for name in report.per_layer)
    loaded = tiny_model("qwen2_moe")
    router = loaded.spec.router_of(loaded.spec.blocks_of(loaded.model)[0])
    report = _prune_moe(loaded, moe={"routers": "true"}, pattern="2:4")
    from secateurs.sparsity.masks import is_nm

    assert is_nm(router.weight.data, 2, 4)
    assert report.per_layer["model.layers.0.mlp.gate"] == 0.5


def test_shared_experts_are_pruned_unless_asked_not_to():
    from secateurs.model.linear import sparsity_of

    for shared, expected in (("true", 0.5), ("false", 0.0)):
        loaded = tiny_model("qwen2_moe")
        shared_up = loaded.spec.blocks_of(loaded.model)[0].mlp.shared_expert.up_proj
        _prune_moe(loaded, moe={"shared": shared})
        assert sparsity_of(shared_up.weight.data) == expected


def test_weighted_statistics_scale_each_routed_token_by_its_routing_weight():
    """With ``weighted`` an expert's gate/up norms are Σ (g·x)² over its routed tokens, g the weight
    the block multiplies that expert's output by."""
    from secateurs.model.experts import routing

    loaded = tiny_model("qwen3_moe")
    spec = loaded.spec.with_moe_choices(routers=False, prune_shared=True, weighted=True)
    experts = spec.experts_of(spec.blocks_of(loaded.model)[0])
    seen = []
    experts.register_forward_hook(lambda m, a, k, o: seen.append(routing(a, k)), with_kwargs=True)
    method = _Norms()
    run_blocks(loaded.model, spec, method, random_ids(2, 16), EngineOptions(device="cpu", batch_size=2))
    (hidden, top_k, weights), = seen
    for e in range(4):
        tokens, slot = (top_k == e).nonzero(as_tuple=True)
        expected = (hidden[tokens] * weights[tokens, slot, None]).float().pow(2).sum(0)
        got = method.stats[0][f"mlp.experts.gate_up_proj.{e}"]["norm"]
        torch.testing.assert_close(got.sum_sq, expected, rtol=1e-5, atol=1e-7)
        assert got.n_tokens == len(tokens)


def test_calibration_too_short_for_every_expert_is_one_line_and_writes_nothing(tmp_path, no_loading):
    from typer.testing import CliRunner

    from secateurs.cli import app

    out = tmp_path / "out"
    args = ["prune", str(_folder(tmp_path, "qwen3_moe")), "--method", "wanda", "--out", str(out), "--calib",
            "wikitext2", "--n-samples", "1", "--seq-len", "8", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "fewer than 4 experts × 16 tokens" in text and "magnitude fallback rule" in text
    assert "Traceback" not in result.output and not out.exists()
    result = CliRunner().invoke(app, [*args, "--moe", "fallback=pooled,min_tokens=5"])
    assert result.exit_code == 2 and "pooled fallback rule" in " ".join(result.output.split())


def test_a_bad_moe_option_is_one_line():
    from secateurs.api import PruneConfig

    with pytest.raises(UsageError, match="fallback='median' is not known"):
        PruneConfig("wanda", moe={"fallback": "median"}).check(None)
    with pytest.raises(UsageError, match="unknown option 'router'"):
        PruneConfig("wanda", moe={"router": "true"}).check(None)


# --- OWL / ATP budgets over experts ---


def test_owl_counts_every_expert_matrix_and_gives_it_its_blocks_sparsity():
    from secateurs.model.linear import sparsity_of

    loaded = tiny_model("mixtral")
    report = _prune_moe(loaded, sparsity=0.5, allocation="owl", allocation_options={"lam": 0.1})
    schedule = report.target.per_block
    assert len(set(schedule)) > 1 and abs(sum(schedule) / 3 - 0.5) < 1e-9
    for index, block in enumerate(loaded.spec.blocks_of(loaded.model)):
        for name, view in loaded.spec.linears(block).items():
            weight = weight_matrix(view)  # Wanda per row: the row's share rounds down to whole columns
            assert 0 <= schedule[index] - sparsity_of(weight) < 1 / weight.shape[1], name


def test_owl_puts_an_experts_norms_on_the_scale_of_the_blocks_other_linears():
    """An expert's ‖X_j‖ sums fewer tokens than attention's; OWL rescales by √(n_max / n), so an
    expert whose every routed token is a copy of one vector scores like a linear fed that vector
    every time: the outlier ratio of a block does not depend on how tokens split between experts."""
    from secateurs.engine.stats import InputSqNorm
    from secateurs.sparsity.owl import OutlierRatios

    x = torch.randn(8)
    weight = torch.randn(6, 8)
    weight[0, 0] = 40.0  # one outlier

    class View(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(weight.clone())

    def stats(n):
        acc = InputSqNorm(8, torch.device("cpu"))
        acc.update(x.expand(n, 8))
        return {"norm": acc}

    linears = {"a": torch.nn.Linear(8, 6), "b": torch.nn.Linear(8, 6)}
    for module in linears.values():
        module.weight.data.copy_(weight)
    even, uneven = OutlierRatios(3.0), OutlierRatios(3.0)
    even.process_block(0, None, linears, {"a": stats(64), "b": stats(64)})
    uneven.process_block(0, None, linears, {"a": stats(64), "b": stats(4)})
    assert even.ratios == uneven.ratios == [2 / 96]


def test_atp_search_restores_every_expert_and_the_schedule_reaches_them():
    from secateurs.data.calib import CalibConfig, calibration_ids
    from secateurs.sparsity.atp import atp_target
    from secateurs.sparsity.base import SparsityTarget
    from secateurs.sparsity.config import AtpOptions, MoeOptions
    from secateurs.sparsity.masks import Pattern

    loaded = tiny_model("qwen3_moe")
    dense = {n: weight_matrix(m).clone() for n, m in loaded.spec.named_linears(loaded.model).items()}
    ids = calibration_ids(CalibConfig("self", n_samples=4, seq_len=16), loaded.tokenizer, loaded.model)
    target = SparsityTarget((0.5,) * 3, Pattern.parse("unstructured"))
    found, losses = atp_target(loaded.model, loaded.spec, target, ids, EngineOptions(device="cpu"),
                               AtpOptions(search_samples=2), None, MoeOptions())
    assert len(losses) > 1 and (found.per_block[-1] - found.per_block[0]) == pytest.approx(min(losses, key=losses.get))
    for name, module in loaded.spec.named_linears(loaded.model).items():
        assert torch.equal(weight_matrix(module), dense[name]), name


# --- per-layer keep counts (--mode global) and merging ---


def _gpt_oss_with_a_starved_layer():
    """gpt-oss whose block 1 router never picks experts 2 and 3: a global budget gives that layer
    only its top-k and the other layers more."""
    loaded = tiny_model("gpt_oss")
    router = loaded.spec.router_of(loaded.spec.blocks_of(loaded.model)[1])
    router.bias.data[2:] = -1e4
    return loaded


def test_global_mode_spreads_the_budget_by_score_and_reloads_through_secateurs_class(tmp_path):
    import json

    import secateurs
    from secateurs.data.calib import CalibConfig
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import prune_experts

    loaded = _gpt_oss_with_a_starved_layer()
    report = prune_experts(loaded, ExpertConfig("frequency", keep=0.75, mode="global"), CalibConfig("self"),
                           EngineOptions(device="cpu"), calib_ids=random_ids(4, 16, seed=1))
    counts = [len(report.kept[i]) for i in range(3)]
    assert sum(counts) == 9 and counts[1] == 2 and sorted(counts) == [2, 3, 4]
    assert report.kept[1] == [0, 1]
    assert loaded.model.config.num_local_experts == 4 == report.n_experts_after
    ids = random_ids(2, 12, seed=2)
    with torch.no_grad():
        expected = loaded.model(ids).logits
    folder = secateurs.save(loaded, tmp_path / "out", [report])
    config = json.loads((folder / "config.json").read_text())
    short = next(i for i in range(3) if counts[i] < 4)
    assert config["secateurs_shapes"][f"model.layers.{short}.mlp.experts"]["gate_up_proj"][0] == counts[short]
    assert (folder / "modeling_secateurs.py").exists()
    reloaded = secateurs.load_model(str(folder)).model.eval()
    for i, block in enumerate(reloaded.model.layers):
        assert block.mlp.experts.num_experts == block.mlp.router.num_experts == counts[i]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-4)
    stage = json.loads((folder / "secateurs.json").read_text())["stages"][-1]
    assert stage["mode"] == "global" and [len(v) for v in stage["kept_experts"].values()] == counts
    from transformers import AutoModelForCausalLM  # a plain transformers user who opts in to the saved file

    opted_in = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(opted_in(ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_global_mode_keeps_plain_transformers_when_every_layer_keeps_the_same_count(tmp_path):
    import secateurs
    from secateurs.data.calib import CalibConfig
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import prune_experts

    loaded = tiny_model("qwen3_moe")
    report = prune_experts(loaded, ExpertConfig("reap", keep=0.5, mode="global"), CalibConfig("self"),
                           EngineOptions(device="cpu"), calib_ids=random_ids(4, 16, seed=1))
    assert all(len(v) == 2 for v in report.kept.values())  # top-2 each fills a budget of 2 per layer
    folder = secateurs.save(loaded, tmp_path / "out", [report])
    assert not (folder / "modeling_secateurs.py").exists()
    assert "secateurs_shapes" not in (folder / "config.json").read_text()


def test_deepseek_v3_per_layer_counts_resize_the_score_correction_buffer(tmp_path):
    """DeepSeek-V3 keeps a per-expert buffer in its router; per-layer counts record and rebuild it."""
    import secateurs
    from secateurs.data.calib import CalibConfig
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import prune_experts

    loaded = tiny_model("deepseek_v3")
    for block in loaded.spec.blocks_of(loaded.model):
        loaded.spec.router_of(block).e_score_correction_bias.normal_(0, 0.1)
    router = loaded.spec.router_of(loaded.spec.blocks_of(loaded.model)[1])
    router.e_score_correction_bias[2:] = -1e4  # never chosen in block 1
    report = prune_experts(loaded, ExpertConfig("frequency", keep=0.75, mode="global"), CalibConfig("self"),
                           EngineOptions(device="cpu"), calib_ids=random_ids(4, 16, seed=1))
    counts = [len(report.kept[i]) for i in range(3)]
    assert counts[1] == 2 and sum(counts) == 9
    ids = random_ids(2, 12, seed=2)
    with torch.no_grad():
        expected = loaded.model(ids).logits
    folder = secateurs.save(loaded, tmp_path / "out", [report])
    reloaded = secateurs.load_model(str(folder)).model.eval()
    assert reloaded.model.layers[1].mlp.gate.e_score_correction_bias.shape == (2,)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_merge_folds_each_removed_expert_into_its_nearest_kept_one_by_routing_frequency(tmp_path):
    """Each kept expert becomes the frequency-weighted mean of itself and the removed experts nearest
    to it (cosine of their weights); the folder still loads in plain transformers."""
    import copy

    import secateurs
    from secateurs.data.calib import CalibConfig
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import prune_experts

    loaded = tiny_model("mixtral")
    experts = loaded.spec.experts_of(loaded.spec.blocks_of(loaded.model)[0])
    experts.gate_up_proj.data[3] = experts.gate_up_proj.data[0] + 1e-3 * torch.randn_like(experts.gate_up_proj.data[0])
    experts.down_proj.data[3] = experts.down_proj.data[0] + 1e-3 * torch.randn_like(experts.down_proj.data[0])
    dense = copy.deepcopy(experts)
    counts = _routed_counts(copy.deepcopy(loaded), random_ids(4, 16, seed=1))[0].double()
    report = prune_experts(loaded, ExpertConfig("frequency", keep=0.5, merge=True), CalibConfig("self"),
                           EngineOptions(device="cpu"), calib_ids=random_ids(4, 16, seed=1))
    kept, folded = report.kept[0], report.merged[0]
    assert sorted([*kept, *(e for group in folded.values() for e in group)]) == [0, 1, 2, 3]
    if 0 in kept and 3 not in kept:
        assert 3 in folded[0]  # its near copy is its nearest kept expert
    for new, k in enumerate(kept):
        members = [k, *folded.get(k, [])]
        w = counts[members] / counts[members].sum()
        for name in ("gate_up_proj", "down_proj"):
            stacked = getattr(dense, name).data[members].double()
            expected = (stacked * w.view(-1, 1, 1)).sum(0).float()
            torch.testing.assert_close(getattr(experts, name).data[new], expected, atol=1e-6, rtol=1e-5)
    record = report.stage_record().to_dict()
    assert record["merge"] is True and record["merged"]["0"] == {str(k): v for k, v in folded.items()}
    folder = secateurs.save(loaded, tmp_path / "out", [report])
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2


# --- streaming, recipes, eval and report on MoE models ---


def _sharded(folder, arch: str):
    """A tiny MoE of ``arch`` saved in several safetensors shards (random router correction bias where
    it has one), and a calibration text beside it."""
    loaded = tiny_model(arch)
    for block in loaded.spec.blocks_of(loaded.model):
        bias = getattr(loaded.spec.router_of(block), "e_score_correction_bias", None)
        if bias is not None:
            bias.normal_(0, 0.1)
    loaded.model.save_pretrained(folder, max_shard_size="100KB")
    loaded.tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    (folder.parent / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return folder


@pytest.fixture(scope="module")
def sharded_moe(tmp_path_factory):
    """A tiny DeepSeek-V3 (routed + shared experts, a per-expert router buffer; experts stored one
    tensor per expert, fused by transformers while loading) in several shards, and a text."""
    return _sharded(tmp_path_factory.mktemp("moe") / "tiny-moe", "deepseek_v3")


def _text_calib(folder):
    from secateurs.data.calib import CalibConfig

    return CalibConfig(str(folder.parent / "calib.txt"), n_samples=4, seq_len=16, seed=0)


@pytest.mark.parametrize("config", [dict(keep=0.5), dict(keep=0.75, mode="global", merge=True)],
                         ids=["uniform", "global-merge"])
def test_streamed_expert_pruning_equals_in_memory(sharded_moe, tmp_path, config):
    from test_stream import assert_same_folder

    import secateurs
    from secateurs.api import experts, experts_streamed
    from secateurs.moe.config import ExpertConfig

    request = ExpertConfig("reap", **config)
    loaded = secateurs.load_model(str(sharded_moe))
    report = experts(loaded, request, _text_calib(sharded_moe), "cpu")
    secateurs.save(loaded, tmp_path / "memory", [report])
    streamed, path = experts_streamed(sharded_moe, tmp_path / "stream", request, _text_calib(sharded_moe),
                                      EngineOptions(device="cpu"))
    assert streamed.kept == report.kept and streamed.merged == report.merged
    assert_same_folder(tmp_path / "memory", path)
    assert not list(tmp_path.glob(".*partial"))
    secateurs.load_model(str(path))


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral", "gpt_oss"])
def test_streamed_prune_of_an_moe_model_equals_in_memory(tmp_path, arch):
    """Experts stored per expert (DeepSeek; Mixtral's also renamed, block_sparse_moe.experts.N.w1) are
    read, fused, pruned and written back per expert; gpt-oss's are stored fused."""
    from test_stream import assert_same_folder

    import secateurs
    from secateurs.api import PruneConfig, prune, prune_streamed

    folder = _sharded(tmp_path / "in" / "model", arch)
    config = PruneConfig("sparsegpt", pattern="2:4", moe={"fallback": "pooled", "min_tokens": "12"})
    loaded = secateurs.load_model(str(folder))
    report = prune(loaded, config, _text_calib(folder), "cpu")
    secateurs.save(loaded, tmp_path / "memory", [report])
    streamed, path = prune_streamed(folder, tmp_path / "stream", config, _text_calib(folder),
                                    EngineOptions(device="cpu"))
    assert streamed.expert_fallback == report.expert_fallback
    assert_same_folder(tmp_path / "memory", path)


def test_recipe_eval_and_report_on_an_moe_model(sharded_moe, tmp_path):
    """experts → prune (Wanda 2:4, starved experts listed) → eval as one recipe; the report then
    reads the chain and says which experts the fallback pruned."""
    import json

    from typer.testing import CliRunner

    from secateurs.cli import app
    from secateurs.recipe import run

    text = str(sharded_moe.parent / "calib.txt")
    recipe = {
        "model": str(sharded_moe),
        "calib": {"source": text, "n_samples": 4, "seq_len": 16, "seed": 0},
        "stages": [
            {"experts": {"method": "frequency", "keep": 0.75, "mode": "global", "device": "cpu"}},
            {"prune": {"method": "wanda", "pattern": "2:4", "moe": "min_tokens=32", "device": "cpu"}},
            {"eval": {"ppl": [text], "seq_len": 16, "device": "cpu"}},
        ],
        "out": str(tmp_path / "run"),
    }
    record = run(recipe, echo=lambda _: None)
    assert [s["stage"] for s in record["stages"]] == ["experts", "prune", "eval"]
    prune_stage = record["stages"][1]["record"]
    assert prune_stage["moe"]["min_tokens"] == 32 and prune_stage["expert_fallback"]
    assert json.loads((tmp_path / "run" / "secateurs.json").read_text())["stages"][2]["results"]["perplexity"][text]["ppl"] > 1
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--ppl", text, "--seq-len", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    block, names = next(iter(prune_stage["expert_fallback"].items()))
    assert "pruned by the magnitude fallback" in report and f"block {block}: {names[0]}" in report


def test_cli_experts_stream_writes_the_folder_and_refuses_ppl(sharded_moe, tmp_path):
    import json

    from typer.testing import CliRunner

    from secateurs.cli import app

    text = str(sharded_moe.parent / "calib.txt")
    args = ["experts", str(sharded_moe), "--keep", "0.5", "--stream", "--calib", text, "--n-samples", "4",
            "--seq-len", "16", "--device", "cpu"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--ppl", text])
    assert result.exit_code == 2 and "--stream writes OUT block by block" in result.output and not out.exists()
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == 2


def test_prune_export_sparse_on_an_moe_model_stores_every_expert_compressed(tmp_path):
    """--export sparse stores each expert matrix as the checkpoint's own per-expert linears, compressed
    (tests/test_sparse_experts.py checks the logits and every family); the reload runs them sparse."""
    import json

    from typer.testing import CliRunner

    import secateurs
    from secateurs.cli import app
    from secateurs.kernels.experts import SparseExperts
    from secateurs.sparsity.masks import is_nm

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prune", str(_folder(tmp_path, "qwen2_moe")), "--method", "wanda", "--pattern",
                                      "2:4", "--export", "sparse", "--out", str(out), *CALIB])
    assert result.exit_code == 0, result.output
    export = json.loads((out / "secateurs.json").read_text())["stages"][-1]
    assert export["layers"]["model.layers.0.mlp.experts.down_proj.3"]["kind"] == "2:4" and not export["kept_dense"]
    assert "model.layers.0.mlp.shared_expert.up_proj" in export["layers"]
    reloaded = secateurs.load_model(str(out))
    experts = reloaded.model.model.layers[0].mlp.experts
    assert isinstance(experts, SparseExperts)
    assert all(is_nm(experts.down_proj[e].dense_weight(), 2, 4) for e in range(4))
    with torch.no_grad():
        assert torch.isfinite(reloaded.model(random_ids(1, 8)).logits).all()


def test_lora_recovery_adapts_attention_and_shared_experts_and_keeps_the_experts(tmp_path):
    """With expert adapters off (``experts=False``) recovery adapts the other linears, leaves every
    routed expert exactly as pruned, and says so (expert adapters: tests/test_moe_recover.py)."""
    import copy

    from secateurs.api import recover
    from secateurs.recover.config import RecoverConfig

    loaded = tiny_model("qwen2_moe")
    _prune_moe(loaded)
    experts = loaded.spec.experts_of(loaded.spec.blocks_of(loaded.model)[0])
    before = copy.deepcopy(experts)
    attention = loaded.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    report = recover(loaded, RecoverConfig(steps=2, seq_len=16, batch_size=1, data="wikitext2", lr=1e-2,
                                           experts=False), "cpu")
    assert torch.equal(experts.gate_up_proj, before.gate_up_proj) and torch.equal(experts.down_proj, before.down_proj)
    assert not torch.equal(loaded.model.model.layers[0].self_attn.q_proj.weight, attention)
    assert report is not None


@pytest.mark.parametrize("flags, message", [
    (["--target", "channels"], "use --target unstructured"),
    (["--target", "unstructured", "--no-experts"], "drop --no-experts"),
])
def test_loraprune_an_moe_model_cannot_take_is_one_line_before_loading(tmp_path, no_loading, flags, message):
    """Structured targets, and unstructured without the expert adapters it prunes through, are refused
    from the config and the model's skeleton, before any weight loads."""
    from typer.testing import CliRunner

    from secateurs.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["recover", str(_folder(tmp_path, "qwen3_moe")), "--method", "loraprune",
                                      *flags, "--steps", "2", "--seq-len", "16", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and not out.exists()


def test_interrupted_streamed_expert_pruning_resumes_to_the_in_memory_folder(sharded_moe, tmp_path, monkeypatch):
    """A full disk after one block is one line; the rerun scores again, keeps the block already cut
    (read back in its stored, per-expert layout) and ends equal to the in-memory result."""
    from test_stream import assert_same_folder

    import secateurs
    import secateurs.engine.stream as stream
    from secateurs.api import experts, experts_streamed
    from secateurs.moe.config import ExpertConfig

    request = ExpertConfig("ean", keep=0.75, mode="global")
    real, written = stream.write_tensors, []

    def fills_up(path, entries):
        if len(written) == 1:
            raise OSError(28, "No space left on device")
        written.append(str(path))
        real(path, entries)

    monkeypatch.setattr(stream, "write_tensors", fills_up)
    with pytest.raises(UsageError, match="disk full"):
        experts_streamed(sharded_moe, tmp_path / "out", request, _text_calib(sharded_moe), EngineOptions(device="cpu"))
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out.partial"))
    monkeypatch.setattr(stream, "write_tensors", real)
    _, path = experts_streamed(sharded_moe, tmp_path / "out", request, _text_calib(sharded_moe),
                               EngineOptions(device="cpu"))
    loaded = secateurs.load_model(str(sharded_moe))
    secateurs.save(loaded, tmp_path / "memory", [experts(loaded, request, _text_calib(sharded_moe), "cpu")])
    assert_same_folder(tmp_path / "memory", path)


def test_stored_layout_needs_newer_transformers_only_for_converted_checkpoints(monkeypatch):
    """transformers 5.17 (the GPU image's) lacks apply_converters: importing secateurs and streaming a
    checkpoint stored as the model names it still work; one stored per expert is one line, not an ImportError."""
    import transformers.core_model_loading as loading

    from secateurs.model.stored import StoredLayout

    monkeypatch.delattr(loading, "apply_converters")
    dense = tiny_model("llama").model
    assert StoredLayout(dense).identity
    with pytest.raises(UsageError, match="newer transformers"):
        StoredLayout(tiny_model("mixtral").model)
