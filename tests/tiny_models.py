"""Tiny randomly initialised models of every supported architecture, for fast offline tests.

Right for testing mechanics (shapes, masks, surgery, round trips); never for quality claims.
"""

from __future__ import annotations

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from secateurs.model.arch import spec_for
from secateurs.model.load import LoadedModel

VOCAB = 320
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3", "gpt2", "opt", "gpt_neox",
         *MOE_ARCHS)

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
               max_position_embeddings=256, tie_word_embeddings=False)
_OVERRIDES: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
    "mistral": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2, intermediate_size=128),
    "qwen3": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma3_text": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phi3": dict(num_key_value_heads=2, intermediate_size=128, pad_token_id=0),
    # Gemma 3's multimodal model: the text model above inside, a one-layer vision tower beside it.
    "gemma3": dict(mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                   image_token_index=VOCAB - 1,
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14)),
    "gpt2": dict(n_embd=64, n_head=4, n_layer=3, n_positions=256),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1),
    "gpt_neox": dict(intermediate_size=128),
    # Mixture-of-experts: 4 routed experts, 2 per token, every layer sparse (the DeepSeek ones with
    # their shared expert; V2 with q_proj as in V2-Lite, V3 with the low-rank query pair).
    "mixtral": dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=None),
    "qwen2_moe": dict(num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                      num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_key_value_heads=2, intermediate_size=32, num_experts=4, num_experts_per_tok=2, eos_token_id=2),
    "deepseek_v2": dict(num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=None,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0, topk_method="greedy"),
    "deepseek_v3": dict(num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=16,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0, n_group=1, topk_group=1),
    "gpt_oss": dict(num_key_value_heads=2, intermediate_size=32, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer small enough to build in milliseconds."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=VOCAB - 8,
                            min_frequency=1, show_progress=False, special_tokens=["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def tiny_model(model_type: str, seed: int = 0, **overrides) -> LoadedModel:
    if model_type == "gemma3":
        text = {**_COMMON, **_OVERRIDES["gemma3_text"], **overrides}
        config = AutoConfig.for_model(model_type, text_config=text, **_OVERRIDES[model_type])
    else:
        config = AutoConfig.for_model(model_type, **{**_COMMON, **_OVERRIDES[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tiny_tokenizer(), spec_for(model), f"tiny-{model_type}", None)


def random_ids(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def prune_2of4(loaded: LoadedModel) -> LoadedModel:
    """Magnitude 2:4 on every block linear, in place (a stored-dense 2:4 model for kernel and export tests)."""
    from secateurs.model.linear import weight_matrix
    from secateurs.sparsity.masks import nm_mask

    with torch.no_grad():
        for module in loaded.spec.named_linears(loaded.model).values():
            w = weight_matrix(module)
            w.mul_(nm_mask(w.abs(), 2, 4))
    return loaded
