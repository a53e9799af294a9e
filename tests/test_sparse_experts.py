"""Fused MoE experts on the sparse kernels: a SparseExperts module holds every expert matrix in a stored
format (each a SparseLinear, so the dispatcher runs it), equals the masked dense model, and a sparse
export writes the experts as the checkpoint stores them (one compressed linear per expert matrix) and
reloads onto it. On CPU the dispatcher runs the exact reference, so logits agree to fp32 rounding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import MOE_ARCHS, random_ids, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import secateurs
from secateurs.api import export_sparse
from secateurs.errors import UsageError
from secateurs.kernels import SparseLinear, sparsify
from secateurs.kernels.experts import SparseExperts
from secateurs.model.linear import weight_matrix
from secateurs.sparsity.masks import nm_mask, unstructured_mask

FP32 = {"rtol": 1e-5, "atol": 1e-5}


def pruned(arch: str, pattern: str = "2:4", **overrides):
    """A tiny MoE whose every block linear (experts included) is 2:4, 4:8 or 60% unstructured sparse."""
    loaded = tiny_model(arch, **overrides)
    with torch.no_grad():
        for module in loaded.spec.named_linears(loaded.model).values():
            w = weight_matrix(module)
            if pattern == "unstructured":
                w.mul_(unstructured_mask(w.abs(), 0.6))
            else:
                n, m = map(int, pattern.split(":"))
                w.mul_(nm_mask(w.abs(), n, m))
    return loaded


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def experts_of(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def stored_keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_sparse_experts_equal_the_masked_model_and_survive_export_and_reload(arch, tmp_path):
    """Per family: the swapped model's logits are the masked dense model's; every experts module holds its
    experts only in the stored format; the export reloads to the same logits (gpt-oss, whose checkpoint
    keeps its experts fused, saves them dense and says so)."""
    loaded = pruned(arch)
    ids = random_ids(2, 12)
    expected = logits(loaded.model, ids)
    dense_bytes = sum(p.numel() * p.element_size() for e in experts_of(loaded.model) for p in e.parameters())
    record = export_sparse(loaded)
    swapped = experts_of(loaded.model)
    assert swapped and all(isinstance(m, SparseExperts) for m in swapped)
    torch.testing.assert_close(logits(loaded.model, ids), expected, **FP32)
    for module in swapped:
        held = [*module.parameters(), *module.buffers()]
        assert all(t.dim() <= 2 for t in held)  # no fused 3-D copy
        formats = [layer.format() for layer in module.layers().values()]
        assert {f.kind for f in formats} == {"2:4"}
        bias_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        assert sum(t.numel() * t.element_size() for t in held) == sum(f.nbytes() for f in formats) + bias_bytes
    assert sum(t.numel() * t.element_size() for m in swapped for t in [*m.parameters(), *m.buffers()]) < 0.6 * dense_bytes

    secateurs.save(loaded, tmp_path / "out", [record])
    keys = stored_keys(tmp_path / "out")
    reloaded = secateurs.load_model(str(tmp_path / "out"))
    torch.testing.assert_close(logits(reloaded.model, ids), expected, **FP32)
    if arch == "gpt_oss":
        assert "model.layers.0.mlp.experts.gate_up_proj" in keys
        assert record.kept_dense["model.layers.0.mlp.experts.down_proj.1"].startswith("saved dense")
        assert not any(isinstance(m, SparseExperts) for m in reloaded.model.modules())
        return
    assert not any(k.endswith(("gate_up_proj", "down_proj", ".weight")) and ".experts." in k for k in keys)
    assert all(isinstance(m, SparseExperts) for m in experts_of(reloaded.model))
    assert not record.kept_dense and record.storage == "sparse-24-bitmask"


@pytest.mark.parametrize(("arch", "pattern", "kind", "sizes"), [
    ("mixtral", "unstructured", "banded", {"hidden_size": 128, "intermediate_size": 128}),  # 60% zeros: banded
    ("qwen3_moe", "4:8", "4:8", {"moe_intermediate_size": 32}),
])
def test_other_formats_write_gate_and_up_apart_and_reload(arch, pattern, kind, sizes, tmp_path):
    """Banded and 4:8 experts: the fused gate/up matrix is written as the checkpoint's two linears (gate rows,
    then up rows, each with its own row offsets), and read back into one stored-format matrix."""
    loaded = pruned(arch, pattern, **sizes)
    ids = random_ids(2, 12)
    expected = logits(loaded.model, ids)
    record = export_sparse(loaded)
    assert record.storage == "sparse-bitmask"
    assert {info["kind"] for name, info in record.layers.items() if ".experts." in name} == {kind}
    torch.testing.assert_close(logits(loaded.model, ids), expected, **FP32)
    secateurs.save(loaded, tmp_path / "out", [record])
    gate = "model.layers.1.block_sparse_moe.experts.2.w1" if arch == "mixtral" else "model.layers.1.mlp.experts.2.gate_proj"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        intermediate, hidden = loaded.model.model.layers[1].mlp.experts.down_proj[2].in_features, loaded.model.config.hidden_size
        assert handle.get_tensor(f"{gate}.shape").tolist() == [intermediate, hidden]
        assert handle.get_tensor(f"{gate}.row_offsets").shape == (intermediate,)
    reloaded = secateurs.load_model(str(tmp_path / "out"))
    experts = experts_of(reloaded.model)[1]
    assert isinstance(experts, SparseExperts) and experts.gate_up_proj[2].kind == kind
    torch.testing.assert_close(experts.gate_up_proj[2].dense_weight(), loaded.model.model.layers[1].mlp.experts.gate_up_proj[2].dense_weight())
    torch.testing.assert_close(logits(reloaded.model, ids), expected, **FP32)


def test_an_expert_too_dense_keeps_its_whole_module_dense_in_one_line():
    """A module is sparse whole: one dense expert matrix keeps all of its experts dense, each listed with why."""
    loaded = pruned("qwen3_moe")
    loaded.model.model.layers[0].mlp.experts.down_proj.data[3].normal_()
    report = sparsify(loaded.model, loaded.spec)
    reasons = {why for name, why in report.kept_dense.items() if name.startswith("model.layers.0.mlp.experts.")}
    assert len(reasons) == 1 and reasons.pop().startswith("down_proj.3: sparsity 0.00 < 0.50")
    assert len([n for n in report.kept_dense if n.startswith("model.layers.0.")]) == 8
    assert type(loaded.model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert isinstance(loaded.model.model.layers[1].mlp.experts, SparseExperts)


def test_an_experts_forward_not_checked_stays_dense_with_one_line():
    """An experts class whose forward SparseExperts was not checked against is refused, never guessed at."""
    loaded = pruned("mixtral")
    block = loaded.model.model.layers[0].mlp
    odd = type("OddExperts", (type(block.experts),), {})
    block.experts.__class__ = odd
    report = sparsify(loaded.model, loaded.spec)
    reason = report.kept_dense["model.layers.0.mlp.experts.gate_up_proj.0"]
    assert reason.startswith("OddExperts runs an experts forward") and "\n" not in reason
    assert type(block.experts) is odd
    assert isinstance(loaded.model.model.layers[1].mlp.experts, SparseExperts)


def test_a_sparse_moe_cannot_be_sparsified_again():
    loaded = pruned("olmoe")
    sparsify(loaded.model, loaded.spec)
    with pytest.raises(UsageError, match="is already sparse"):
        sparsify(loaded.model, loaded.spec)


def test_each_expert_matrix_runs_through_its_sparse_linear(monkeypatch):
    """The experts' products go through SparseLinear.matmul (the dispatcher), once per routed expert and
    matrix, on exactly the tokens routed to it."""
    loaded = pruned("qwen2_moe")
    sparsify(loaded.model, loaded.spec)
    calls: list[int] = []
    original = SparseLinear.matmul
    monkeypatch.setattr(SparseLinear, "matmul", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    experts = loaded.model.model.layers[0].mlp.experts
    hidden = torch.randn(5, 64)
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [1, 0], [2, 1]])
    weights = torch.rand(5, 2)
    out = experts(hidden, index, weights)
    assert sorted(calls) == [3, 3, 3, 3, 4, 4]  # experts 0 (3 tokens), 1 (4), 2 (3); expert 3 unrouted
    expected = torch.zeros_like(hidden)
    for t in range(5):
        for slot in range(2):
            e = int(index[t, slot])
            h = experts.gate_up_proj[e].dense_weight() @ hidden[t]
            gate, up = h.chunk(2)
            expected[t] += weights[t, slot] * (experts.down_proj[e].dense_weight() @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(out, expected, **FP32)


def test_cli_prune_export_sparse_says_what_gpt_oss_saved(tmp_path):
    """gpt-oss's checkpoint keeps its experts fused: the export says in one line that they are saved dense."""
    from typer.testing import CliRunner

    from secateurs.cli import app

    folder = tmp_path / "in"
    loaded = tiny_model("gpt_oss")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prune", str(folder), "--method", "magnitude", "--pattern", "2:4", "--export",
                                      "sparse", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "24 expert matrices: saved dense" in " ".join(result.output.split())
    export = json.loads((out / "secateurs.json").read_text())["stages"][-1]
    assert "model.layers.0.self_attn.q_proj" in export["layers"]
    assert not any(".experts." in name for name in export["layers"])


def test_a_checkpoint_missing_one_experts_linear_is_one_usage_line(tmp_path):
    from safetensors.torch import save_file

    loaded = pruned("qwen3_moe")
    secateurs.save(loaded, tmp_path / "out", [export_sparse(loaded)])
    file = tmp_path / "out" / "model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys() if ".layers.1.mlp.experts.2.up_proj." not in k}
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"experts\.2\.up_proj is not stored compressed while other experts") as err:
        secateurs.load_model(str(tmp_path / "out"))
    assert "\n" not in str(err.value)


def _per_expert_loop(experts: SparseExperts, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The families' eager experts loop (and SparseExperts' before it read its routing once): each routed
    expert, in expert order, on the (token, slot) pairs ``torch.where`` finds for it, added per token."""
    out = torch.zeros_like(hidden)
    for e in torch.unique(index[index < experts.num_experts]).tolist():
        token, slot = torch.where(index == e)
        y = experts.down_proj[e](experts.apply_gate(experts, experts.gate_up_proj[e](hidden[token])))
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
def test_sparse_experts_add_in_the_per_expert_loops_order_bit_for_bit(arch):
    """Random routing with padding slots (indices 4 and 6, past the 4 experts) and an expert no token picks:
    the output is the per-expert loop's exactly (same rows, same order of additions), not just close."""
    loaded = pruned(arch)
    sparsify(loaded.model, loaded.spec)
    experts = experts_of(loaded.model)[0]
    gen = torch.Generator().manual_seed(3)
    choices = torch.tensor([0, 1, 3, 4, 6])  # expert 2 unrouted; 4 and 6 are padding
    index = choices[torch.randint(0, len(choices), (97, 2), generator=gen)]
    hidden, weights = torch.randn(97, 64, generator=gen), torch.rand(97, 2, generator=gen)
    with torch.no_grad():
        got = experts(hidden, index, weights)
        assert torch.equal(got, _per_expert_loop(experts, hidden, index, weights))
        assert not torch.equal(got, experts(hidden, index.clamp(max=3), weights))  # padding really skipped


class _SyncProneOps(TorchDispatchMode):
    """Counts the ops whose output size (or value on the host) depends on tensor data: on a GPU each one waits
    for the device (nonzero, unique, masked select, boolean indexing, ``.item()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if bool_index or any(s in name for s in ("nonzero", "unique", "masked_select", "_local_scalar_dense")):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_sparse_experts_read_their_routing_on_the_host_once_per_call(monkeypatch):
    """A layer's forward reads the device once (one ``tolist`` of the experts' ranges) however many experts
    are hit, and runs no data-dependent op (the old loop ran one ``nonzero`` per hit expert, each a
    GPU-to-host sync: 64 per OLMoE layer at a long prompt)."""
    loaded = pruned("qwen2_moe")
    sparsify(loaded.model, loaded.spec)
    experts = loaded.model.model.layers[0].mlp.experts
    reads: list[int] = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or tolist(self))
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [1, 0], [2, 4]])  # experts 0-2 hit, one padding slot
    with torch.no_grad(), _SyncProneOps() as ops:
        experts(torch.randn(5, 64), index, torch.rand(5, 2))
    assert ops.seen == []
    assert reads == [experts.num_experts + 1]
