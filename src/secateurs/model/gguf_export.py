"""Write a loaded model as one GGUF file, the format llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

Uniform width-pruned and depth-pruned outputs of the Llama, Mistral, Qwen2, Qwen3 and Gemma 2 families
are ordinary models of their architecture with other sizes, so llama.cpp runs them once the file says
those sizes: block count, FFN length, head and KV-head counts, and the head size as ``key_length`` /
``value_length`` (a width-pruned model no longer has hidden = heads × head size). 2:4 and unstructured
outputs are written dense with their zeros, since llama.cpp has no sparse kernels.

What llama.cpp expects and its own converter (``convert_hf_to_gguf.py``) does, kept here:

* tensor names come from the ``gguf`` package's name map (``blk.N.attn_q.weight``, ``token_embd``, ...);
* Llama and Mistral run RoPE on interleaved pairs in llama.cpp, while Hugging Face stores q/k rows as
  two halves: those rows are permuted per head (:func:`interleave_rope`);
* Gemma's RMSNorm multiplies by ``1 + weight``, llama.cpp's by ``weight``: Gemma norms are written + 1;
  Gemma 2's sliding layers are listed per layer, and llama.cpp scales its attention by 1/sqrt(head size),
  so a model whose ``query_pre_attn_scalar`` differs (27B) is refused;
* 1-D tensors (norms, biases) stay f32 whatever the type; a matrix whose rows do not split into
  q8_0 blocks of 32 is written f16;
* the tokenizer goes in as ``tokenizer.ggml.*``: a byte-level BPE vocabulary with its merges, token
  types (normal, control, user-defined, unused), special ids, ``add_bos`` and the chat template.

A Llama-family model whose layers differ (FLAP, global mode, sheared per-layer heads; FLAP's added
output biases) is written in llama.cpp's ``deci`` architecture (NVIDIA's heterogeneous Llama models):
the same tensors, with per-layer arrays for the head count, KV-head count and FFN length, and the
optional ``attn_output`` / ``ffn_down`` biases it reads. A layer left with no heads or no FFN channels
is refused (llama.cpp's ``deci`` then skips that part's bias, or the whole layer), as are per-layer
widths of other families.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..files import write_atomic
from .load import LoadedModel
from .per_layer import SHAPES_KEY

GGUF_TYPES = ("f16", "q8_0", "bf16", "f32")


@dataclass(frozen=True)
class GGUFArch:
    """How one Hugging Face ``model_type`` is written: llama.cpp's architecture name, whether q/k rows
    are permuted for its interleaved RoPE, whether norm weights are stored as ``1 + w``, and the
    config keys only this family writes."""

    name: str
    permute_qk: bool = False
    norm_plus_one: bool = False
    softcapping: bool = False


ARCHES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),  # llama.cpp's converter writes Mistral as llama
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "gemma2": GGUFArch("gemma2", norm_plus_one=True, softcapping=True),
}
# Per-layer widths of a Llama-family model: llama.cpp's heterogeneous Llama (DeciLM / Nemotron-NAS).
DECI = GGUFArch("deci", permute_qk=True)

# Byte-level BPE pre-tokenizers by what tokenizer.json says, named as llama.cpp names them
# (``tokenizer.ggml.pre``): GPT-2's regex alone, SmolLM's digit split before it, Llama 3's and Qwen2's regexes.
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# llama.cpp's token types (``tokenizer.ggml.token_type``).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFReport:
    """What was written: the file, its type, llama.cpp's architecture, sizes, and notes for the user."""

    path: Path
    gguf_type: str
    arch: str
    n_layers: int
    n_tensors: int
    bytes: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_exportable(config) -> GGUFArch:
    """The GGUF architecture of ``config``, or one line naming what can be exported (checked on the
    config alone, before any weight loads)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHES:
        raise UsageError(
            f"GGUF export does not handle architecture {model_type!r}; it writes {', '.join(ARCHES)} "
            "(llama.cpp's llama, qwen2, qwen3 and gemma2)"
        )
    _rope_scaling(config)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if ARCHES[model_type].softcapping and scalar != _head_dim(config):
        raise UsageError(
            f"llama.cpp's gemma2 scales attention by 1/sqrt(head_dim {_head_dim(config)}) but this model by "
            f"1/sqrt({scalar}) (query_pre_attn_scalar); GGUF export takes Gemma 2 models whose two agree (2B, 9B)"
        )
    if not getattr(config, SHAPES_KEY, None):
        return ARCHES[model_type]
    if ARCHES[model_type].name != "llama":
        raise UsageError(
            f"this {model_type} model has per-layer widths or added biases (secateurs_shapes), which GGUF holds only "
            "for the Llama family (llama.cpp's deci); export uniform width-pruned, depth-pruned or sparse outputs"
        )
    return DECI


def check_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--type {gguf_type!r} is not one GGUF export writes; use one of {', '.join(GGUF_TYPES)}")


def _rope(config) -> dict:
    """RoPE parameters wherever this transformers version keeps them (``rope_parameters`` or the older keys)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _rope_scaling(config) -> tuple[str, float]:
    """The RoPE scaling llama.cpp is told (``none`` or ``linear`` and its factor); other kinds are refused."""
    params = _rope(config)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return "none", 1.0
    if kind == "linear":
        return "linear", float(params["factor"])
    raise UsageError(f"GGUF export writes default or linear RoPE; this model's RoPE scaling is {kind!r}")


def interleave_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection from Hugging Face's half-split RoPE order (per head: all first
    halves, then all second halves) to the interleaved pairs llama.cpp's ``llama`` architecture rotates."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(loaded: LoadedModel, path: str | Path, gguf_type: str = "f16") -> GGUFReport:
    """Write ``loaded`` as one GGUF file at ``path`` (a temporary file renamed when complete, so
    ``path`` is whole or untouched). Raises :class:`UsageError` for what the format cannot hold."""
    import gguf

    check_type(gguf_type)
    model = loaded.model
    config = model.config
    arch = check_exportable(config)
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.source} has no tokenizer, and llama.cpp needs one in the GGUF file; copy the "
                         "tokenizer files of the model it came from into the folder")
    writer = gguf.GGUFWriter(None, arch.name)
    _write_config(writer, config, arch, gguf_type, loaded.source, _layer_widths(model, config) if arch is DECI else None)
    _write_tokenizer(writer, loaded.tokenizer, model.get_input_embeddings().weight.shape[0])
    notes = []
    counts, zeros = _add_tensors(writer, model, config, arch, gguf_type)
    if zeros:
        notes.append(f"{zeros:.0%} of the block weights are zeros, written dense (llama.cpp has no sparse kernels)")
    target = Path(path).expanduser().resolve()

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()

    try:
        write_atomic(target, write)
    except OSError as exc:
        raise UsageError(f"could not write --gguf {path}: {exc.strerror or exc}; nothing was written") from None
    n_layers = int(config.num_hidden_layers)
    return GGUFReport(target, gguf_type, arch.name, n_layers, sum(counts.values()), target.stat().st_size, counts, notes)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _layer_widths(model, config) -> tuple[list[int], list[int], list[int]]:
    """Query heads, KV heads and FFN length of every layer, read from the projections' shapes."""
    head_dim = _head_dim(config)
    heads, kv_heads, ffn = [], [], []
    for index, block in enumerate(model.model.layers):
        heads.append(_dense(block.self_attn.q_proj).shape[0] // head_dim)
        kv_heads.append(_dense(block.self_attn.k_proj).shape[0] // head_dim)
        ffn.append(_dense(block.mlp.gate_proj).shape[0])
        if not heads[-1] or not kv_heads[-1] or not ffn[-1]:
            raise UsageError(
                f"layer {index} has no {'FFN channels' if heads[-1] and kv_heads[-1] else 'attention heads'} left, which "
                "llama.cpp's deci runs without that part's bias; prune with --keep-first/--keep-last or a lower ratio"
            )
    return heads, kv_heads, ffn


def _write_config(writer, config, arch: GGUFArch, gguf_type: str, source: str,
                  widths: tuple[list[int], list[int], list[int]] | None) -> None:
    """The sizes and constants llama.cpp reads (``<arch>.block_count``, ``.feed_forward_length``, ...);
    ``widths`` (deci): per-layer query heads, KV heads and FFN lengths, written as arrays."""
    import gguf

    heads = int(config.num_attention_heads)
    head_dim = _head_dim(config)
    writer.add_name(Path(str(getattr(config, "name_or_path", "") or source)).name or "model")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    if widths is None:
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(heads)
        writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    else:
        writer.add_head_count(widths[0])
        writer.add_head_count_kv(widths[1])
        writer.add_feed_forward_length(widths[2])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    kind, factor = _rope_scaling(config)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if arch.softcapping:
        if config.attn_logit_softcapping is not None:
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
        # which layers slide, once depth pruning has broken llama.cpp's default every-other-layer pattern
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError(
            f"GGUF export needs a fast (tokenizer.json) tokenizer; this model has {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def _pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (``tokenizer.ggml.pre``), read from
    tokenizer.json's ``pre_tokenizer``; one line for one it would not split the same way."""
    parts = (spec or {}).get("pretokenizers", [spec] if spec else [])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds[:1] == ["Split"] and kinds[-1:] == ["ByteLevel"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    raise UsageError(
        f"GGUF export writes byte-level BPE tokenizers split as GPT-2, SmolLM, Llama 3 or Qwen2 do; this "
        f"tokenizer's pre-tokenizer is {json.dumps(spec)[:120]}"
    )


def _write_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    """The vocabulary as llama.cpp's converter writes a byte-level BPE one: one token per embedding row
    (rows past the tokenizer's are ``[PAD<id>]``, unused), added tokens as control (special) or
    user-defined, the merges, special ids, whether BOS/EOS are added, and the chat template."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UsageError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2); this one is "
            f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder"
        )
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {item["id"]: item for item in spec.get("added_tokens", [])}
    if max(by_id, default=-1) >= n_vocab:
        raise UsageError(f"the tokenizer has ids up to {max(by_id)} but the embedding only {n_vocab} rows")
    tokens, types = [], []
    for index in range(n_vocab):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append((CONTROL if added[index].get("special") else USER_DEFINED) if index in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if index is not None and 0 <= index < n_vocab:
            add(int(index))
    sample = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bool(sample) and bos is not None and sample[0] == bos)
    writer.add_add_eos_token(bool(sample) and eos is not None and sample[-1] == eos and len(sample) > 1)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


def _dense(module: torch.nn.Module) -> torch.Tensor | None:
    """A linear's weight as one dense matrix: ``weight``, or a sparse-kernel layer's ``dense_weight()``."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    dense = getattr(module, "dense_weight", None)
    return dense() if callable(dense) else None


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by its Hugging Face name, a sparse-kernel layer's weight made dense again."""
    found = {name: p for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if callable(getattr(module, "dense_weight", None)) and f"{name}.weight" not in found:
            found[f"{name}.weight"] = _dense(module)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                found[f"{name}.bias"] = bias
    return found


def _add_tensors(writer, model, config, arch: GGUFArch, gguf_type: str) -> tuple[dict[str, int], float]:
    """Every weight under its GGUF name in ``gguf_type`` (1-D ones f32; a matrix q8_0 cannot block, f16);
    returns tensors per written type and the share of zeros in the block matrices."""
    import gguf

    n_layers = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], n_layers)
    head_dim = _head_dim(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding = model.get_input_embeddings().weight
    counts: dict[str, int] = {}
    zeros = total = 0
    for hf_name, tensor in _named_tensors(model).items():
        if hf_name.startswith("lm_head.") and (tied or torch.equal(tensor, embedding)):
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UsageError(f"GGUF export has no llama.cpp name for tensor {hf_name!r} of a {arch.name} model")
        data = tensor.detach().to(torch.float32).cpu()
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            data = interleave_rope(data, data.shape[0] // head_dim)  # this layer's heads
        if arch.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1
        if ".layers." in hf_name and data.dim() == 2:
            zeros += int((data == 0).sum())
            total += data.numel()
        kind = _add_tensor(writer, name, data.numpy(), gguf_type)
        counts[kind] = counts.get(kind, 0) + 1
    return counts, (zeros / total if total and zeros / total >= 0.01 else 0.0)


def _add_tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> str:
    """Add one tensor; returns the type it was written in."""
    import gguf

    if data.ndim < 2 or gguf_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return "f32"
    if gguf_type == "f16":
        writer.add_tensor(name, data.astype(np.float16))
        return "f16"
    qtype = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        writer.add_tensor(name, data.astype(np.float16))
        return "f16"
    writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    return gguf_type
