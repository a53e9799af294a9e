"""The ``block_configs`` (DeciLM / Nemotron-NAS) export: per-layer widths written in the layout vLLM and
llama.cpp run, read back through secateurs to the same logits, and the config checked field by field.

vLLM cannot be installed here (no GPU build, no network for its wheels), so :func:`vllm_view` restates
what vLLM's ``nemotron_nas.py`` (``DeciLMDecoderLayer``, ``DeciModel.load_weights``) and NVIDIA's
``block_config.py`` / ``configuration_decilm.py`` read from such a folder, from reading them: the
checks below are that definition, applied to our config.json and our safetensors headers.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import secateurs
from secateurs.errors import UsageError
from secateurs.model import deci
from secateurs.model.load import load_model
from secateurs.model.slice import apply_widths
from secateurs.structured import base
from secateurs.structured.base import WidthConfig
from tiny_models import random_ids, tiny_model

# Hidden 64 and MLP 768: 768 and 512 are multiples of 256, so ffn_mult can say them.
DECI_SIZES = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=768)
SUBBLOCK_FIELDS = {"no_op", "replace_with_linear", "sparsify"}  # NVIDIA's SubblockConfig
ATTENTION_FIELDS = SUBBLOCK_FIELDS | {"n_heads_in_group", "window_length", "num_sink_tokens",
                                      "use_prefill_window_in_sink_attention", "unshifted_sink"}
FFN_FIELDS = SUBBLOCK_FIELDS | {"ffn_mult"}


@pytest.fixture
def fake_calibration(monkeypatch):
    """Random token windows instead of text: tiny models have a toy vocabulary."""
    monkeypatch.setattr(base, "calibration_ids", lambda config, tokenizer, model: random_ids(config.n_samples, config.seq_len))


def _width(loaded, config: WidthConfig):
    return secateurs.width(loaded, config, secateurs.CalibConfig("x", 4, 16), secateurs.EngineOptions(device="cpu"))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(random_ids(2, 7, seed=3)).logits


def _notes(capsys) -> list[str]:
    """secateurs' own lines on stderr (transformers adds progress bars)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("secateurs:")]


def _headers(folder) -> dict[str, list[int]]:
    shapes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            shapes.update({name: list(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return shapes


def vllm_view(folder) -> dict[str, list[int]]:
    """Every tensor vLLM's DeciLMForCausalLM builds from this folder's config.json, with its shape,
    after checking each field it reads (asserting where vLLM or NVIDIA's config class would fail)."""
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]  # vLLM's registry key
    assert config["model_type"] == "nemotron-nas"  # vLLM's per-model-type config convertor key
    hidden, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    for key in ("vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "hidden_act"):
        assert key in config, key
    assert "rope_theta" in config or "rope_theta" in config.get("rope_parameters", {})  # vLLM reads either
    assert config["hidden_act"] == "silu"
    head_dim = config.get("head_dim") or hidden // heads  # LlamaAttention: config.head_dim, else hidden / heads
    bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    blocks = config["block_configs"]
    assert isinstance(blocks, list) and len(blocks) == layers  # DeciLMConfig asserts one per layer
    expected = {"model.embed_tokens.weight": [config["vocab_size"], hidden], "model.norm.weight": [hidden]}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = [config["vocab_size"], hidden]
    kv_counts = []
    for index, block in enumerate(blocks):
        assert set(block) == {"attention", "ffn"}
        attention, ffn = block["attention"], block["ffn"]
        assert set(attention) <= ATTENTION_FIELDS and set(ffn) <= FFN_FIELDS  # else "Removed unsupported fields"
        for entry in (attention, ffn):  # SubblockConfig: both default to False
            assert not entry.get("no_op", False) and not entry.get("replace_with_linear", False)
        group = attention["n_heads_in_group"]
        assert isinstance(group, int) and group > 0 and heads % group == 0
        kv = heads // group  # vLLM: num_kv_heads = num_attention_heads // n_heads_in_group
        kv_counts.append(kv)
        assert round(ffn["ffn_mult"], 6) == ffn["ffn_mult"]  # FFNConfig rounds it to 6 decimals on reading
        width = -(-int(2 * ffn["ffn_mult"] * hidden / 3) // 256) * 256  # _ffn_mult_to_intermediate_size
        prefix = f"model.layers.{index}"
        expected |= {f"{prefix}.input_layernorm.weight": [hidden], f"{prefix}.post_attention_layernorm.weight": [hidden]}
        for name, rows, cols in (("q_proj", heads * head_dim, hidden), ("k_proj", kv * head_dim, hidden),
                                 ("v_proj", kv * head_dim, hidden), ("o_proj", hidden, heads * head_dim)):
            expected[f"{prefix}.self_attn.{name}.weight"] = [rows, cols]
            if bias:  # attention_bias: q/k/v biases, and bias_o_proj = attention_bias
                expected[f"{prefix}.self_attn.{name}.bias"] = [rows]
        for name, rows, cols in (("gate_proj", width, hidden), ("up_proj", width, hidden), ("down_proj", hidden, width)):
            expected[f"{prefix}.mlp.{name}.weight"] = [rows, cols]
            if mlp_bias:
                expected[f"{prefix}.mlp.{name}.bias"] = [rows]
    assert kv_counts  # vLLM's convertor takes the KV heads of the first layer with attention
    return expected


def _check_deci(folder, reference: torch.Tensor) -> None:
    """The folder is the format as vLLM reads it, tensor for tensor, and reloads to the same logits."""
    assert json.loads((folder / "secateurs.json").read_text())["save_format"] == "deci"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}  # for --trust-remote-code
    assert "rope_theta" in config and "intermediate_size" not in config and "num_key_value_heads" not in config
    assert _headers(folder) == vllm_view(folder)
    torch.testing.assert_close(_logits(load_model(str(folder)).model), reference)


def test_ffn_mult_gives_back_every_multiple_of_256_and_nothing_else():
    assert deci.ffn_mult_to_intermediate(5.25, 8192) == 28672  # Llama-3.1-70B's width, as Nemotron-51B writes it
    for hidden in (64, 576, 2048, 4096, 8192):
        for width in range(256, 8 * hidden + 1, 256):
            mult = deci.ffn_mult_for(width, hidden)
            assert mult is not None and round(mult, 6) == mult
            assert deci.ffn_mult_to_intermediate(mult, hidden) == width
        assert deci.ffn_mult_for(1536 + 8, hidden) is None
        assert deci.ffn_mult_for(0, hidden) is None


def test_flap_with_biases_exports_and_reloads(fake_calibration, tmp_path, capsys):
    loaded = tiny_model("llama", **DECI_SIZES)
    report = _width(loaded, WidthConfig("flap", 0.34, target="both", round_to=256))
    assert {w["channels"] for w in report.widths} == {512} and report.per_layer_config  # FLAP's biases
    reference = _logits(loaded.model)
    folder = secateurs.save(loaded, tmp_path / "o", [report], save_format="deci")
    err = capsys.readouterr().err
    assert "attention_bias and mlp_bias, with zero biases" in err and "wrote the block_configs layout" in err
    assert not (folder / "modeling_secateurs.py").exists()
    _check_deci(folder, reference)


def test_per_layer_widths_export_and_reload(fake_calibration, tmp_path):
    """Per-layer MLP widths (FLAP with its first layer whole, and widths as a global ranking leaves them)."""
    loaded = tiny_model("llama", **DECI_SIZES)
    report = _width(loaded, WidthConfig("flap", 0.34, target="channels", round_to=256, keep_first=1))
    assert [w["channels"] for w in report.widths] == [768, 512, 512]
    reference = _logits(loaded.model)
    _check_deci(secateurs.save(loaded, tmp_path / "flap", [report], save_format="deci"), reference)

    loaded = tiny_model("llama", **DECI_SIZES)
    keep = [{"channels": torch.arange(n)} for n in (256, 768, 512)]
    apply_widths(loaded.model, loaded.spec, keep)
    reference = _logits(loaded.model)
    folder = secateurs.save(loaded, tmp_path / "global", [{"stage": "width"}], save_format="deci")
    assert [b["ffn"]["ffn_mult"] for b in json.loads((folder / "config.json").read_text())["block_configs"]] == [6.0, 18.0, 12.0]
    _check_deci(folder, reference)


def test_config_class_reads_like_vllm(fake_calibration, tmp_path):
    """Plain transformers runs the config class we write (what vLLM's --trust-remote-code runs):
    every block is attributes, as vLLM's DeciLMDecoderLayer reads them, and it serialises back."""
    loaded = tiny_model("llama", **DECI_SIZES)
    report = _width(loaded, WidthConfig("magnitude", 0.34, target="channels", round_to=256, keep_last=1))
    folder = secateurs.save(loaded, tmp_path / "o", [report], save_format="deci")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.model_type == "nemotron-nas" and config.head_dim == 8
    for block, width in zip(config.block_configs, [512, 512, 768]):
        assert not block.attention.no_op and not block.ffn.no_op and hasattr(block.ffn, "ffn_mult")
        assert config.num_attention_heads // block.attention.n_heads_in_group == 4
        assert deci.ffn_mult_to_intermediate(block.ffn.ffn_mult, config.hidden_size) == width
    assert json.loads(config.to_json_string())["block_configs"] == json.loads((folder / "config.json").read_text())["block_configs"]


def test_reads_per_layer_kv_heads_as_the_format_defines(tmp_path):
    """A folder as NVIDIA writes them, KV heads differing per layer (8 query heads; 4, 2, 8 KV heads),
    reloads to the logits of the same model written with every KV head repeated (plain multi-head)."""
    hidden, heads, head_dim, kv_heads = 64, 8, 8, (4, 2, 8)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, num_attention_heads=8, num_key_value_heads=8,
                                         head_dim=8, intermediate_size=512, num_hidden_layers=3)).eval()
    tensors = {name: tensor.clone() for name, tensor in dense.state_dict().items()}
    for index, kv in enumerate(kv_heads):
        for name in ("k_proj", "v_proj"):
            key = f"model.layers.{index}.self_attn.{name}.weight"
            grouped = torch.randn(kv * head_dim, hidden)
            tensors[key] = grouped
            repeated = grouped.view(kv, 1, head_dim, hidden).expand(kv, heads // kv, head_dim, hidden).reshape(-1, hidden)
            dense.get_submodule(key.removesuffix(".weight")).weight.data.copy_(repeated)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = {**dense.config.to_dict(), "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
              "block_configs": [{"attention": {"n_heads_in_group": heads // kv, "no_op": False},
                                 "ffn": {"ffn_mult": 12.0, "no_op": False}} for kv in kv_heads]}
    for key in ("num_key_value_heads", "intermediate_size"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _headers(tmp_path) == vllm_view(tmp_path)
    torch.testing.assert_close(_logits(load_model(str(tmp_path)).model), _logits(dense))

    config["block_configs"][1]["ffn"] = {"no_op": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="layer 1 has no ffn"):
        load_model(str(tmp_path))


def test_what_the_format_cannot_hold_falls_back_in_one_line(fake_calibration, tmp_path, capsys):
    loaded = tiny_model("llama", **DECI_SIZES)  # query heads differ per layer: layer 0 kept whole
    report = _width(loaded, WidthConfig("wanda-sp", 0.5, target="heads", keep_first=1))
    reference = _logits(loaded.model)
    folder = secateurs.save(loaded, tmp_path / "heads", [report], save_format="deci")
    err = _notes(capsys)
    assert len(err) == 1 and "query heads; block_configs gives every layer" in err[0] and "--save-format hf" in err[0]
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((folder / "secateurs.json").read_text())["save_format"] == "hf"
    torch.testing.assert_close(_logits(load_model(str(folder)).model), reference)

    loaded = tiny_model("llama", **DECI_SIZES)  # a global ranking leaves widths no ffn_mult gives
    report = _width(loaded, WidthConfig("flap", 0.2, mode="global"))
    secateurs.save(loaded, tmp_path / "global", [report], save_format="deci")
    err = _notes(capsys)
    assert len(err) == 1 and "only multiples of 256" in err[0] and "--round-to 256" in err[0]


def test_bad_requests_write_nothing(tmp_path):
    loaded = tiny_model("qwen2")
    with pytest.raises(UsageError, match="Llama-family models") as caught:
        secateurs.save(loaded, tmp_path / "q", [], save_format="deci")
    assert "\n" not in str(caught.value) and not (tmp_path / "q").exists()
    with pytest.raises(UsageError, match="unknown --save-format 'onnx'"):
        secateurs.save(tiny_model("llama"), tmp_path / "x", [], save_format="onnx")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["llm-pruner", "wanda-sp", "flap", "magnitude"])
def test_every_width_method_loads_somewhere_else(method, fake_calibration, tmp_path):
    """Uniform outputs load in plain transformers (no trust_remote_code); per-layer ones (FLAP's biases)
    are written as block_configs, checked against vLLM's reading of the format."""
    loaded = tiny_model("llama", **DECI_SIZES)
    report = _width(loaded, WidthConfig(method, 0.34, target="both", round_to=256))
    reference = _logits(loaded.model)
    if report.per_layer_config:
        _check_deci(secateurs.save(loaded, tmp_path / "o", [report], save_format="deci"), reference)
    else:
        folder = secateurs.save(loaded, tmp_path / "o", [report])
        plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
        torch.testing.assert_close(_logits(plain), reference)


def test_cli_save_format(tmp_path):
    """``secateurs width --save-format deci`` writes the layout; a non-Llama model is refused before it is
    pruned, an unknown format before it loads, each in one line with nothing written."""
    from typer.testing import CliRunner

    from secateurs.cli import app

    runner = CliRunner()
    for arch in ("llama", "qwen2"):
        loaded = tiny_model(arch, **(DECI_SIZES if arch == "llama" else {}))
        loaded.model.save_pretrained(tmp_path / arch)
        loaded.tokenizer.save_pretrained(tmp_path / arch)
    args = ["--method", "magnitude", "--target", "channels", "--ratio", "0.34", "--round-to", "256", "--keep-first", "1",
            "--device", "cpu", "--save-format"]
    result = runner.invoke(app, ["width", str(tmp_path / "llama"), "--out", str(tmp_path / "o"), *args, "deci"])
    assert result.exit_code == 0, result.output
    assert "wrote the block_configs layout" in result.output
    assert vllm_view(tmp_path / "o") == _headers(tmp_path / "o")
    for model, fmt, message in (("qwen2", "deci", "Llama-family models"), ("llama", "onnx", "unknown --save-format")):
        result = runner.invoke(app, ["width", str(tmp_path / model), "--out", str(tmp_path / "bad"), *args, fmt])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "bad").exists()
