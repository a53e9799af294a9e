"""Recovery on mixture-of-experts models (issue 32): LoRA on the routed experts' fused parameters keeps
every expert's sparsity mask exactly through training and merge (every MoE family, unstructured and
2:4), lowers the loss, leaves the other adapters' seeded start as it was, distils, recovers an
expert-pruned model that plain transformers then reloads; LoRAPrune prunes each expert through its own
adapter; a decode step through the sparse experts falls back to eager steps instead of a CUDA graph."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import pytest
import torch
from peft.tuners.lora.layer import LoraLayer
from tiny_models import MOE_ARCHS, random_ids, tiny_model

from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import EngineOptions
from secateurs.errors import UsageError
from secateurs.model.experts import DOWN, GATE_UP, ExpertLinear
from secateurs.model.linear import sparsity_of, weight_matrix
from secateurs.recover.adapters import ExpertAdapter, attach, base_weight
from secateurs.recover.config import LoRAPruneConfig, RecoverConfig
from secateurs.recover.lora import recover_lora, train_adapters
from secateurs.recover.loraprune import loraprune
from secateurs.sparsity.masks import is_nm, nm_mask, unstructured_mask
from secateurs.training.config import DistillConfig
from secateurs.training.loop import TrainHook

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def config(**overrides) -> RecoverConfig:
    settings = {"steps": 4, "lr": 1e-2, "seq_len": 16, "batch_size": 2, "data": "self", "warmup_steps": 0}
    return RecoverConfig(**{**settings, **overrides})


def train_ids() -> torch.Tensor:
    return random_ids(1, 600, seed=3).flatten()


def pruned(arch: str, pattern: str = "unstructured", **overrides):
    """A tiny MoE whose every block linear, each expert's matrix included, is 50% or 2:4 sparse by magnitude."""
    loaded = tiny_model(arch, **overrides)
    with torch.no_grad():
        for module in loaded.spec.named_linears(loaded.model).values():
            w = weight_matrix(module)
            w.mul_(unstructured_mask(w.abs(), 0.5) if pattern == "unstructured" else nm_mask(w.abs(), 2, 4))
    return loaded


def expert_views(loaded) -> dict[str, ExpertLinear]:
    return {name: m for name, m in loaded.spec.named_linears(loaded.model).items() if isinstance(m, ExpertLinear)}


def fused(loaded) -> list[torch.Tensor]:
    return [getattr(e, name).detach().clone() for b in loaded.spec.blocks_of(loaded.model)
            if (e := loaded.spec.experts_of(b)) is not None for name in (GATE_UP, DOWN)]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_adapters_keep_every_mask_exactly_through_training_and_merge(arch, pattern):
    """Each expert matrix gets its own masked adapter; after training the merged model computes what the
    adapted one did, every pruned expert weight is still exactly zero (2:4 still 2:4), and the kept
    ones moved (the expert adapters were trained and merged, not skipped)."""
    loaded = pruned(arch, pattern)
    views = expert_views(loaded)
    zeros = {name: weight_matrix(v) == 0 for name, v in views.items()}
    before = fused(loaded)
    cfg = config()
    adapters = attach(loaded, cfg)
    expert_keys = [key for key, layer in adapters.layers.items() if isinstance(layer, ExpertAdapter)]
    assert len(expert_keys) == len(views) and set(expert_keys) <= adapters.masked
    train_adapters(adapters, cfg, train_ids(), CPU)
    assert all(bool(w.lora_B["default"].weight.abs().sum() > 0) for w in adapters.experts.values())
    ids = random_ids(2, 12, seed=5)
    tuned = logits(loaded.model, ids)
    assert adapters.merge()
    torch.testing.assert_close(logits(loaded.model, ids), tuned, rtol=1e-4, atol=1e-5)
    for name, view in expert_views(loaded).items():
        weight = weight_matrix(view)
        assert bool((weight[zeros[name]] == 0).all()), name
        if pattern == "2:4":
            assert is_nm(weight, 2, 4), name
    assert all(not torch.equal(old, new) for old, new in zip(before, fused(loaded)))


def _loss(loaded, ids) -> float:
    with torch.no_grad():
        return float(loaded.model(input_ids=ids, labels=ids).loss)


def test_a_few_steps_of_the_expert_adapters_alone_lower_the_loss_on_random_tokens():
    """With every other adapter frozen, training the masked expert adapters on 64 random tokens lowers
    the merged model's loss on them: gradients flow through the masked per-expert deltas."""
    loaded = pruned("mixtral")
    ids = random_ids(1, 64, seed=9)
    before = _loss(loaded, ids)
    cfg = config(steps=15)
    adapters = attach(loaded, cfg)
    for name, param in adapters.trainable().items():
        param.requires_grad_(".experts." in name)
    assert adapters.trainable() and all(".experts." in name for name in adapters.trainable())
    log = train_adapters(adapters, cfg, ids.flatten(), CPU)
    assert adapters.merge()
    assert _loss(loaded, ids) < before - 0.05
    assert sum(log.losses[-3:]) < sum(log.losses[:3])


def test_experts_off_adds_no_expert_adapter_and_leaves_the_others_seeded_start_unchanged(capsys):
    """``experts=False`` is the recovery before expert adapters: none attached, the experts untouched;
    and turning them on does not move the other adapters' seeded initialisation (the expert adapters,
    which have no dropout, say so in one line)."""
    on = attach(pruned("qwen2_moe"), config(dropout=0.05))
    assert "routed experts' adapters train without dropout" in capsys.readouterr().err
    loaded = pruned("qwen2_moe")
    experts = fused(loaded)
    off = attach(loaded, config(experts=False))
    assert not off.experts and not any(isinstance(layer, ExpertAdapter) for layer in off.layers.values())
    shared = off.trainable()
    assert set(shared) < set(on.trainable())
    for name, value in shared.items():
        assert torch.equal(value, on.trainable()[name]), name
    train_adapters(off, config(experts=False), train_ids(), CPU)
    off.merge()
    assert all(torch.equal(a, b) for a, b in zip(experts, fused(loaded)))


def test_distillation_trains_the_expert_adapters_and_keeps_their_masks():
    teacher = tiny_model("qwen3_moe")
    student = copy.copy(teacher)
    student.model = copy.deepcopy(teacher.model)
    with torch.no_grad():
        for module in student.spec.named_linears(student.model).values():
            w = weight_matrix(module)
            w.mul_(nm_mask(w.abs(), 2, 4))
    zeros = {name: weight_matrix(v) == 0 for name, v in expert_views(student).items()}
    before = fused(student)
    report = recover_lora(student, config(steps=4, distill=DistillConfig("kl")), CPU, teacher=teacher)
    assert report.zeros_kept and report.extra["teacher"] == teacher.source
    assert report.log.losses != report.log.lm_losses
    for name, view in expert_views(student).items():
        assert bool((weight_matrix(view)[zeros[name]] == 0).all()) and is_nm(weight_matrix(view), 2, 4)
    assert all(not torch.equal(old, new) for old, new in zip(before, fused(student)))


def test_an_expert_pruned_and_sparse_model_recovers_and_reloads_in_plain_transformers(tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    import secateurs
    from secateurs.moe.config import ExpertConfig
    from secateurs.moe.prune import prune_experts

    loaded = tiny_model("deepseek_v3")
    removal = prune_experts(loaded, ExpertConfig("reap", keep=0.5), CalibConfig("self"), EngineOptions(device="cpu"),
                            calib_ids=random_ids(4, 16, seed=1))
    assert removal.n_experts_after == 2
    with torch.no_grad():
        for module in loaded.spec.named_linears(loaded.model).values():
            w = weight_matrix(module)
            w.mul_(unstructured_mask(w.abs(), 0.5))
    zeros = {name: weight_matrix(v) == 0 for name, v in expert_views(loaded).items()}
    assert len(zeros) == 2 * 2 * loaded.spec.num_layers(loaded.model.config)
    report = recover_lora(loaded, config(data=str(text_file)), CPU)
    assert report.zeros_kept
    ids = random_ids(2, 12, seed=4)
    got = logits(loaded.model, ids)
    folder = secateurs.save(loaded, tmp_path / "out", [removal, report])
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(reloaded, ids), got, rtol=1e-4, atol=1e-5)
    for name, view in expert_views(loaded).items():
        assert bool((weight_matrix(view)[zeros[name]] == 0).all()), name
    for ours, theirs in zip(loaded.spec.blocks_of(loaded.model), loaded.spec.blocks_of(reloaded)):
        for param in (GATE_UP, DOWN):
            assert torch.equal(getattr(loaded.spec.experts_of(theirs), param), getattr(loaded.spec.experts_of(ours), param))


def test_loraprune_unstructured_prunes_every_expert_through_its_adapter(text_file):
    loaded = tiny_model("gpt_oss")
    report = loraprune(loaded, LoRAPruneConfig(target="unstructured", ratio=0.5, keep_first=0, keep_last=0),
                       config(steps=6, data=str(text_file)), CPU)
    assert report.zeros_kept and report.masked_linears == len(loaded.spec.named_linears(loaded.model))
    for name, view in expert_views(loaded).items():
        weight = weight_matrix(view)
        assert sparsity_of(weight) == pytest.approx(0.5), name
        assert bool(((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()), name  # per row, as for linears


@pytest.mark.parametrize("overrides, message", [
    ({"target": "channels"}, "use --target unstructured"),
    ({"target": "unstructured", "experts": False}, "drop --no-experts"),
])
def test_loraprune_on_an_moe_model_refuses_what_it_cannot_prune_in_one_line(overrides, message):
    loaded = tiny_model("olmoe")
    experts = overrides.pop("experts", True)
    with pytest.raises(UsageError, match=message) as err:
        loraprune(loaded, LoRAPruneConfig(**overrides), config(experts=experts), CPU)
    assert "\n" not in str(err.value)


class _FakeCapture:
    """torch.cuda's stream and graph calls as :meth:`StaticDecoder.capture` makes them, on the CPU:
    inside ``graph(...)`` the sparse experts see a capturing stream."""

    def __init__(self, monkeypatch) -> None:
        import secateurs.kernels.experts as sparse_experts

        self.capturing, self.refused = False, 0
        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
        monkeypatch.setattr(torch.cuda, "graph", self.graph)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(sparse_experts, "_capturing", self.is_capturing)

    @contextlib.contextmanager
    def graph(self, graph):
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False

    def is_capturing(self, x) -> bool:
        self.refused += self.capturing
        return self.capturing


def test_a_decode_step_through_sparse_experts_falls_back_to_eager_steps(monkeypatch):
    """The CUDA-graph method cannot capture a model on SparseExperts (its routing is read on the host):
    the module refuses under capture before any host sync, the decoder reports no graph, and the
    tokens are the eager path's."""
    from secateurs.evaluate.decode import StaticDecoder
    from secateurs.evaluate.generate import generate_tokens
    from secateurs.kernels import sparsify
    from secateurs.kernels.experts import SparseExperts

    loaded = pruned("qwen2_moe", "2:4")
    sparsify(loaded.model, loaded.spec)
    assert any(isinstance(m, SparseExperts) for m in loaded.model.modules())
    prompt = random_ids(1, 6, seed=2)
    eager = generate_tokens(loaded.model, prompt, 5, CPU, "eager", None, set(), lambda token: None)
    fake = _FakeCapture(monkeypatch)
    assert StaticDecoder(loaded.model, 1, 16, CPU, "cuda-graph").capture() is False
    assert fake.refused >= 1
    graphed = generate_tokens(loaded.model, prompt, 5, CPU, "cuda-graph", None, set(), lambda token: None)
    assert graphed.method == "eager" and graphed.tokens == eager.tokens


def test_a_dense_moe_step_is_not_refused_by_the_capture_check(monkeypatch):
    """Only the sparse experts refuse: the same fake capture of the dense model records a graph."""
    from secateurs.evaluate.decode import StaticDecoder

    loaded = tiny_model("qwen2_moe")
    fake = _FakeCapture(monkeypatch)
    assert StaticDecoder(loaded.model, 1, 16, CPU, "cuda-graph").capture() is True
    assert fake.refused == 0


class _StopAt(TrainHook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_backward(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_with_expert_adapters_resumes_to_the_same_weights(text_file, tmp_path):
    """The expert adapters are in the checkpoint (the discarded run leaves the experts as they were),
    the resumed run ends where an uninterrupted one does, and a checkpoint written without expert
    adapters is refused by a run with them in one line."""
    cfg = config(steps=6, save_every=2, data=str(text_file), checkpoint_dir=str(tmp_path / "ckpt"))
    stopped = pruned("olmoe")
    experts = fused(stopped)
    with pytest.raises(KeyboardInterrupt):
        recover_lora(stopped, cfg, CPU, hook=_StopAt(4))
    assert all(torch.equal(a, b) for a, b in zip(experts, fused(stopped)))
    assert all(type(stopped.spec.experts_of(block)).__name__.endswith("Experts")  # the wrappers are gone
               for block in stopped.spec.blocks_of(stopped.model))
    resumed = pruned("olmoe")
    report = recover_lora(resumed, cfg, CPU)
    assert report.log.resumed_from == 4
    straight = pruned("olmoe")
    reference = recover_lora(straight, replace(cfg, checkpoint_dir=None), CPU)
    assert report.log.losses == pytest.approx(reference.log.losses, rel=1e-5)
    for a, b in zip(fused(resumed), fused(straight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    without = replace(cfg, experts=False, checkpoint_dir=str(tmp_path / "without"))
    with pytest.raises(KeyboardInterrupt):
        recover_lora(pruned("olmoe"), without, CPU, hook=_StopAt(2))
    with pytest.raises(UsageError, match="other settings"):
        recover_lora(pruned("olmoe"), replace(without, experts=True), CPU)


@pytest.mark.parametrize("flag, adapted", [([], True), (["--no-experts"], False)])
def test_cli_recover_of_a_sparse_moe_folder_reloads_in_plain_transformers(text_file, tmp_path, flag, adapted):
    """``secateurs recover`` on a saved 2:4 MoE: the record counts every expert matrix as masked (or none
    with ``--no-experts``, whose experts come back bit for bit), and plain transformers loads OUT."""
    import json

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from secateurs.cli import app

    loaded = pruned("qwen2_moe", "2:4")
    loaded.model.save_pretrained(tmp_path / "in")
    loaded.tokenizer.save_pretrained(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["recover", str(tmp_path / "in"), "--out", str(out), "--steps", "2",
                                      "--seq-len", "16", "--batch-size", "2", "--data", str(text_file),
                                      "--device", "cpu", *flag])
    assert result.exit_code == 0, result.output
    stage = json.loads((out / "secateurs.json").read_text())["stages"][-1]
    linears = loaded.spec.named_linears(loaded.model)
    views = expert_views(loaded)
    assert stage["zeros_kept"] and stage["masked_linears"] == len(linears) - (0 if adapted else len(views))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for ours, theirs in zip(loaded.spec.blocks_of(loaded.model), loaded.spec.blocks_of(reloaded)):
        for param in (GATE_UP, DOWN):
            stored = getattr(loaded.spec.experts_of(theirs), param)
            before = getattr(loaded.spec.experts_of(ours), param)
            assert bool((stored[before == 0] == 0).all())
            assert torch.equal(stored, before) is not adapted


def test_iterative_pruning_of_an_moe_model_recovers_its_experts_every_round(text_file):
    """Each round prunes every expert matrix further and recovers it with masked expert adapters: the
    experts reach the target and every round kept its zeros."""
    from secateurs.api import PruneConfig
    from secateurs.recover.iterative import prune_iterative

    loaded = tiny_model("mixtral")
    before = fused(loaded)
    report = prune_iterative(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"}), 2,
                             config(steps=2, data=str(text_file)))
    assert all(r["zeros_kept"] for r in report.rounds) and len(report.rounds) == 2
    for name, view in expert_views(loaded).items():
        assert sparsity_of(weight_matrix(view)) == pytest.approx(0.5), name
    for original, after in zip(before, fused(loaded)):
        kept = after != 0
        assert bool((after[kept] != original[kept]).any())  # the kept expert weights were tuned, not only masked


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_an_expert_adapters_factors_are_its_slice_of_the_fused_update(arch):
    """What LoRAPrune scores an expert matrix from, scaling · Bₑ @ Aₑ, is that expert's (out, in) slice of
    the fused parameter's update in either storage layout (gpt-oss's [E, in, out] transposed)."""
    loaded = tiny_model(arch)
    adapters = attach(loaded, config())
    for wrapper in adapters.experts.values():
        torch.nn.init.normal_(wrapper.lora_B["default"].weight)
    for key, layer in adapters.layers.items():
        if isinstance(layer, ExpertAdapter):
            a, b, scaling = adapters.factors(key)
            with torch.no_grad():
                delta = layer.wrapper.get_delta_weight("default")[layer.index]
            torch.testing.assert_close(scaling * b @ a, delta.t() if layer.transposed else delta)
            assert (scaling * b @ a).shape == base_weight(layer).shape


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_a_bf16_model_with_one_expert_and_dense_experts_trains_fp32_factors_and_keeps_its_masks(arch):
    """On a bf16 model the expert factors are float32, as peft makes the linears' (bf16 factors would round
    AdamW's steps away); a layer of one expert (peft's single-expert delta is 2-D) trains and merges; an
    expert too dense for a mask is adapted whole while a pruned one keeps its zeros, in both layouts."""
    loaded = tiny_model(arch, num_local_experts=1, num_experts_per_tok=1)
    loaded.model.to(torch.bfloat16)
    views = expert_views(loaded)
    pruned_views = {name: view for name, view in views.items() if name.endswith(f".{DOWN}.0")}
    with torch.no_grad():
        for view in pruned_views.values():
            w = weight_matrix(view)
            w.mul_(unstructured_mask(w.abs(), 0.5).to(w.dtype))
    zeros = {name: weight_matrix(view) == 0 for name, view in pruned_views.items()}
    before = {name: weight_matrix(view).clone() for name, view in views.items()}
    cfg = config()
    adapters = attach(loaded, cfg)
    assert {p.dtype for name, p in adapters.trainable().items()} == {torch.float32}
    assert len(adapters.masked & {k for k, v in adapters.layers.items() if isinstance(v, ExpertAdapter)}) == len(zeros)
    train_adapters(adapters, cfg, train_ids(), CPU)
    assert adapters.merge()
    for name, view in expert_views(loaded).items():
        weight = weight_matrix(view)
        assert weight.dtype == torch.bfloat16
        kept = ~zeros[name] if name in zeros else torch.ones_like(weight, dtype=torch.bool)
        assert bool((weight[~kept] == 0).all()), name
        assert float((weight[kept] != before[name][kept]).float().mean()) > 0.5, name  # tuned where kept


def test_a_peft_whose_parameter_lora_differs_is_refused_in_one_line(monkeypatch):
    """The peft internals expert adapters rest on are checked on a toy expert stack before any model is
    wrapped: a peft that lays the experts' factors out otherwise is one line naming the fix."""
    from peft.tuners.lora.layer import ParamWrapper

    from secateurs.recover import adapters as module

    original = ParamWrapper.get_delta_weight

    def reordered(self, adapter_name, *args, **kwargs):  # experts as B's outer index instead of its inner one
        b = self.lora_B[adapter_name].weight
        with torch.no_grad():
            interleaved = b.reshape(b.shape[0], self.num_experts, -1).transpose(1, 2).reshape(b.shape)
        saved = b.data.clone()
        b.data.copy_(interleaved)
        try:
            return original(self, adapter_name, *args, **kwargs)
        finally:
            b.data.copy_(saved)

    monkeypatch.setattr(ParamWrapper, "get_delta_weight", reordered)
    module._check_peft.cache_clear()
    try:
        with pytest.raises(UsageError, match="--no-experts") as err:
            attach(tiny_model("olmoe"), config())
    finally:
        module._check_peft.cache_clear()
    assert "\n" not in str(err.value) and "factors" in str(err.value)


def test_a_peft_that_moves_the_given_targets_onto_the_experts_is_refused_in_one_line(monkeypatch):
    """peft's v4-name rewrite (which would move DeepSeek's shared-expert adapters onto the routed experts) is
    off during get_peft_model; were it to act anyway, attach stops in one line instead of training elsewhere."""
    from secateurs.recover import adapters as module

    monkeypatch.setattr(module, "_targets_as_given", contextlib.nullcontext)
    loaded = tiny_model("deepseek_v3")
    with pytest.raises(UsageError, match="moved the LoRA targets") as err:
        attach(loaded, config(dropout=0.0))
    assert "\n" not in str(err.value) and "shared_experts" in str(err.value)
    assert not any(isinstance(m, LoraLayer) for m in loaded.model.modules())  # the model is left as it came


def test_an_experts_module_that_tells_peft_the_wrong_orientation_is_refused_and_left_unwrapped():
    """peft reads a fused parameter's layout from the module's ``is_transposed``; one that disagrees with the
    family's spec (gpt-oss's [E, in, out]) would train the factors across the wrong dimensions: one line."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    loaded = tiny_model("gpt_oss")
    for block in loaded.spec.blocks_of(loaded.model):
        loaded.spec.experts_of(block).is_transposed = False
    with pytest.raises(UsageError, match="is_transposed.*--no-experts") as err:
        attach(loaded, config())
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, BaseTunerLayer) for m in loaded.model.modules())
