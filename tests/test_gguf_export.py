"""GGUF export (issue 33 item 2): what we write reads back through the ``gguf`` package and through
transformers' GGUF loader to the same weights (within the type's rounding), the same logits and the
same token ids, for uniform width-pruned and depth-pruned tiny models; bad input is one line and no file.

llama.cpp itself is measured by benchmarks/gguf_export.py (it needs llama-cpp-python, a long build)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs import stages
from secateurs.errors import UsageError
from secateurs.model.drop_layers import drop_layers
from secateurs.model.gguf_export import export_gguf, interleave_rope
from secateurs.structured.base import WidthConfig, prune_width
from tiny_models import random_ids, tiny_model

TEXT = "the quick brown fox jumps over the lazy dog"
# The largest logit difference allowed against the float32 model: f16 rounds weights to 11 bits,
# q8_0 to 8 bits per block of 32.
LOGIT_TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2}


def width_pruned(model_type: str, target: str = "both"):
    loaded = tiny_model(model_type)
    prune_width(loaded, WidthConfig("magnitude", 0.5, target=target))
    return loaded


def depth_pruned(model_type: str):
    loaded = tiny_model(model_type)
    drop_layers(loaded.model, loaded.spec, [1])
    return loaded


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _load(path):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_width_pruned_llama_reads_back_through_gguf(tmp_path, gguf_type):
    """The sizes llama.cpp reads, every tensor under its llama.cpp name, and the weights (q/k rows in
    llama.cpp's interleaved RoPE order) within the type's rounding."""
    loaded = width_pruned("llama")
    config = loaded.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 64)
    path = export_gguf(loaded, tmp_path / "m.gguf", gguf_type).path
    reader = GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 3
    assert _field(reader, "llama.feed_forward_length") == 64
    assert (_field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")) == (2, 1)
    assert _field(reader, "llama.attention.key_length") == 16  # hidden 64 / 2 heads would say 32
    assert (_field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")  # llama.cpp's names
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and len(tensors) == 2 + 1 + 3 * 9
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == gguf_type.upper()
    block = loaded.model.model.layers[2]
    for name, ours in (("attn_q", interleave_rope(block.self_attn.q_proj.weight, 2)),
                       ("attn_k", interleave_rope(block.self_attn.k_proj.weight, 1)),
                       ("ffn_down", block.mlp.down_proj.weight)):
        stored = tensors[f"blk.2.{name}.weight"]
        theirs = dequantize(stored.data, stored.tensor_type).reshape(ours.shape)
        step = np.abs(ours.numpy()).max() / (127 if gguf_type == "q8_0" else 1000)
        np.testing.assert_allclose(theirs, ours.numpy(), atol=step, rtol=0)


@pytest.mark.parametrize(("build", "model_type"), [
    (lambda: width_pruned("llama"), "llama"),
    (lambda: depth_pruned("llama"), "llama"),
    # transformers' GGUF loader derives Qwen2's head size as hidden / heads: prune its MLP only
    (lambda: width_pruned("qwen2", target="channels"), "qwen2"),
    (lambda: depth_pruned("qwen2"), "qwen2"),
])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_transformers_loads_the_gguf_to_the_same_logits_and_tokens(tmp_path, build, model_type, gguf_type):
    loaded = build()
    path = export_gguf(loaded, tmp_path / "m.gguf", gguf_type).path
    model, tokenizer = _load(path)
    assert model.config.model_type == model_type
    assert model.config.num_hidden_layers == loaded.model.config.num_hidden_layers
    theirs = model.state_dict()
    for name, ours in loaded.model.state_dict().items():
        step = ours.abs().max() / (100 if gguf_type == "q8_0" else 1000)
        torch.testing.assert_close(theirs[name], ours, atol=float(step), rtol=0, msg=name)
    ids = random_ids(2, 16)
    with torch.no_grad():
        difference = (model(ids).logits - loaded.model(ids).logits).abs().max()
    assert difference < LOGIT_TOLERANCE[gguf_type]
    assert tokenizer(TEXT)["input_ids"] == loaded.tokenizer(TEXT)["input_ids"]


def test_gemma2_norms_and_tied_embedding_follow_llama_cpp(tmp_path):
    """Gemma's norms are stored as 1 + w (llama.cpp multiplies by the stored weight), its sliding layers
    listed, a tied LM head not written; transformers reads the file back to the same logits."""
    with pytest.raises(UsageError, match="query_pre_attn_scalar"):  # llama.cpp scales by 1/sqrt(head_dim)
        export_gguf(tiny_model("gemma2", tie_word_embeddings=True, query_pre_attn_scalar=144), tmp_path / "g.gguf")
    # head_dim 256 = the default query_pre_attn_scalar, which transformers' GGUF loader assumes (Gemma 2 2B, 9B)
    loaded = tiny_model("gemma2", tie_word_embeddings=True, head_dim=256)
    path = export_gguf(loaded, tmp_path / "g.gguf", "f16").path
    reader = GGUFReader(path)
    assert _field(reader, "gemma2.attention.sliding_window_pattern") == [True, False, True]
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors
    norm = loaded.model.model.layers[0].input_layernorm.weight
    np.testing.assert_allclose(tensors["blk.0.attn_norm.weight"].data, norm.numpy() + 1, rtol=1e-6)
    model, _ = _load(path)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert (model(ids).logits - loaded.model(ids).logits).abs().max() < LOGIT_TOLERANCE["f16"]


def test_per_layer_llama_is_written_as_deci_with_its_arrays_and_biases(tmp_path):
    """Per-layer widths and FLAP-style output biases: llama.cpp's deci layout, each layer's head, KV-head
    and FFN counts as arrays, the biases under the names deci reads, q/k rows permuted per layer."""
    loaded = tiny_model("llama")
    prune_width(loaded, WidthConfig("magnitude", 0.4, mode="global"))
    layers = loaded.model.model.layers
    torch.manual_seed(1)
    for block in layers:
        block.self_attn.o_proj.bias = torch.nn.Parameter(torch.randn(64), requires_grad=False)
    loaded.model.config.secateurs_shapes = {"model.layers.0.self_attn.o_proj": {"bias": [64]}}
    widths = [(b.self_attn.q_proj.weight.shape[0] // 16, b.self_attn.k_proj.weight.shape[0] // 16,
               b.mlp.gate_proj.weight.shape[0]) for b in layers]
    assert len(set(widths)) > 1
    reader = GGUFReader(export_gguf(loaded, tmp_path / "d.gguf", "f16").path)
    assert _field(reader, "general.architecture") == "deci"
    assert _field(reader, "deci.attention.head_count") == [w[0] for w in widths]
    assert _field(reader, "deci.attention.head_count_kv") == [w[1] for w in widths]
    assert _field(reader, "deci.feed_forward_length") == [w[2] for w in widths]
    tensors = {t.name: t for t in reader.tensors}
    for index, block in enumerate(layers):
        np.testing.assert_allclose(tensors[f"blk.{index}.attn_output.bias"].data, block.self_attn.o_proj.bias.numpy())
        stored = tensors[f"blk.{index}.attn_k.weight"]
        ours = interleave_rope(block.self_attn.k_proj.weight, widths[index][1]).numpy()
        np.testing.assert_allclose(dequantize(stored.data, stored.tensor_type).reshape(ours.shape), ours, atol=1e-3)


def test_sparse_output_is_written_dense_and_said_once(tmp_path):
    loaded = tiny_model("llama")
    for block in loaded.model.model.layers:
        for linear in (block.mlp.up_proj, block.mlp.gate_proj, block.mlp.down_proj, block.self_attn.o_proj):
            linear.weight.view(-1, 4)[:, :2] = 0  # 2:4
    report = export_gguf(loaded, tmp_path / "s.gguf", "f16")
    assert any("zeros, written dense (llama.cpp has no sparse kernels)" in note for note in report.notes)


def test_refusals_name_what_is_possible_and_write_nothing(tmp_path):
    target = tmp_path / "x.gguf"
    with pytest.raises(UsageError, match="it writes llama, mistral, qwen2, qwen3, gemma2"):
        export_gguf(tiny_model("gpt2"), target)
    with pytest.raises(UsageError, match="use one of f16, q8_0, bf16, f32"):
        export_gguf(tiny_model("llama"), target, "q4_0")
    loaded = tiny_model("qwen2")
    prune_width(loaded, WidthConfig("magnitude", 0.5, mode="global", target="channels"))
    assert getattr(loaded.model.config, "secateurs_shapes", None)
    with pytest.raises(UsageError, match="per-layer widths.*only for the Llama family"):
        export_gguf(loaded, target)
    assert list(tmp_path.iterdir()) == []


def test_export_command_writes_the_file_and_refuses_bad_input(tmp_path):
    loaded = depth_pruned("llama")
    folder = tmp_path / "model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    target = tmp_path / "out" / "m.gguf"
    parse = stages.STAGES["export"].parse
    outcome = stages.run(parse(str(folder), gguf=str(target), gguf_type="q8_0"))
    assert outcome.path == target and _field(GGUFReader(target), "llama.block_count") == 2
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        stages.run(parse(str(folder), gguf=str(target)))
    for flags, message in ((dict(gguf=str(target), gguf_type="q4_k"), "use one of f16, q8_0, bf16, f32"),
                           (dict(gguf=str(tmp_path / "m.bin")), "must name a .gguf file")):
        with pytest.raises(UsageError, match=message):
            parse(str(folder), **flags)
    with pytest.raises(UsageError, match="not a model folder .* export takes a secateurs output"):
        parse(str(tmp_path / "out"), gguf=str(tmp_path / "n.gguf"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.gguf"]
