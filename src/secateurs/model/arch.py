"""ArchSpec: the one place that knows where each architecture keeps its blocks and linears.

Methods, the engine and surgery ask the spec (``spec.blocks_of(model)``, ``spec.linears(block)``,
``spec.named_linears(model)``), never ``model.model.layers`` directly, and read what the family
allows from its capability fields (``prunable_heads``, ``prunable_hidden``, ``moe``), so supporting
a new architecture is one entry in ``SPECS``. A mixture-of-experts family's fused expert parameters
appear among a block's linears as one :class:`~secateurs.model.experts.ExpertLinear` view per expert
and matrix (``mlp.experts.gate_up_proj.3``), so every method prunes them like any linear.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..errors import UsageError
from .experts import MoeSpec, RouterLinear, expert_linears


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one decoder-only architecture live, as dotted module paths.

    ``attention`` and ``mlp`` are paths relative to a block, in data-flow order, the output
    projection last. ``qkv_layout`` tells structured pruning how heads sit in the projections:
    ``separate`` (q/k/v linears), ``fused`` (one linear, rows [q; k; v], Phi-3),
    ``conv1d_fused`` (GPT-2 Conv1D, output columns [q | k | v]) or ``interleaved``
    (GPT-NeoX, rows grouped per head as [q_h, k_h, v_h]). ``mlp_layout`` is ``gated``
    (gate/up/down), ``gated_fused`` (gate_up/down, Phi-3) or ``plain`` (fc/proj).

    Width pruning also needs the config keys that size those parts: ``heads_key`` and
    ``kv_heads_key`` (None where every head has its own K/V), ``intermediate_key`` (the MLP width;
    GPT-2's ``n_inner`` may be None, meaning 4 × hidden) and ``head_dim_key``, the key the modeling
    code reads the head size from; where it instead derives it as hidden / heads (GPT-2, OPT,
    GPT-NeoX) it is None, and heads cannot be removed without breaking the reload.

    What can be pruned on the family: layers and MLP channels always; heads where
    :attr:`prunable_heads`, with a different count per layer where :attr:`per_layer_heads`;
    the hidden size (Sheared LLaMA's residual-stream masks) only where ``prunable_hidden`` is set:
    RMSNorm everywhere and no embedding scale (Gemma multiplies embeddings by sqrt(hidden_size),
    which changes when hidden shrinks; GPT-2, OPT and GPT-NeoX use LayerNorm).

    ``moe`` marks a mixture-of-experts family (None: dense): a block whose ``moe.block`` module has
    experts lists its shared expert's linears and a view of every routed expert's matrices in place of
    ``mlp`` (which then names a dense layer's MLP). ``optional``: linears some configs lack (DeepSeek's
    ``q_proj`` or its low-rank ``q_a_proj``/``q_b_proj`` pair).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    norms: tuple[str, ...]
    final_norm: str | None
    embeddings: tuple[str, ...]
    lm_head: str
    num_layers_key: str = "num_hidden_layers"
    qkv_layout: str = "separate"
    mlp_layout: str = "gated"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    intermediate_key: str = "intermediate_size"
    head_dim_key: str | None = "head_dim"
    prunable_hidden: bool = False
    moe: MoeSpec | None = None
    optional: tuple[str, ...] = ()

    @property
    def prunable_heads(self) -> bool:
        """Heads can be removed and the result reloads: the modeling code reads the head size from
        the config rather than deriving it as hidden / heads."""
        return self.head_dim_key is not None

    @property
    def per_layer_heads(self) -> bool:
        """Layers can keep different head counts: separate q/k/v linears (a fused split reads the
        head count from the config, one number for every layer)."""
        return self.qkv_layout == "separate"

    def named_linears(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every block linear of ``model`` by its full module path (``model.layers.3.mlp.up_proj``),
        block by block, each block's in :meth:`linears` order."""
        return {
            f"{self.blocks}.{index}.{path}": module
            for index, block in enumerate(self.blocks_of(model))
            for path, module in self.linears(block).items()
        }

    def blocks_of(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of decoder blocks."""
        return model.get_submodule(self.blocks)

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """Prunable linears of one block (attention first, then MLP: for an MoE block the router's view
        where ``moe.routers``, the shared expert's unless ``moe.prune_shared`` is off, then each routed
        expert's gate/up and down views), by path relative to it."""
        found = {
            path: block.get_submodule(path)
            for path in self.attention
            if path not in self.optional or _has(block, path)
        }
        experts = self.experts_of(block)
        if experts is None:
            return found | {path: block.get_submodule(path) for path in self.mlp}
        assert self.moe is not None
        if self.moe.routers:
            found[f"{self.moe.block}.{self.moe.router}"] = RouterLinear(self.router_of(block))
        for path in self.moe.shared if self.moe.prune_shared else ():
            found[f"{self.moe.block}.{path}"] = block.get_submodule(f"{self.moe.block}.{path}")
        prefix = f"{self.moe.block}.{self.moe.experts}"
        for path, view in expert_linears(experts, self.moe.transposed, self.moe.weighted).items():
            found[f"{prefix}.{path}"] = view
        return found

    def expert_counts(self, config) -> tuple[int, int]:
        """(routed experts per MoE layer, the router's top-k) from a config (the most any layer has)."""
        assert self.moe is not None
        text = self.text_config(config)
        return int(getattr(text, self.moe.experts_key)), int(getattr(text, self.moe.top_k_key))

    def with_moe_choices(self, routers: bool, prune_shared: bool, weighted: bool) -> ArchSpec:
        """This spec with a prune's MoE choices (see :class:`MoeSpec`); a dense family's unchanged."""
        if self.moe is None:
            return self
        return replace(self, moe=replace(self.moe, routers=routers, prune_shared=prune_shared, weighted=weighted))

    def experts_of(self, block: nn.Module) -> nn.Module | None:
        """The block's fused experts module, or None for a dense block (or a dense family)."""
        if self.moe is None or not _has(block, f"{self.moe.block}.{self.moe.experts}"):
            return None
        return block.get_submodule(f"{self.moe.block}.{self.moe.experts}")

    def router_of(self, block: nn.Module) -> nn.Module:
        """The router of an MoE block (its ``weight`` rows are the experts' logits)."""
        assert self.moe is not None
        return block.get_submodule(f"{self.moe.block}.{self.moe.router}")

    @staticmethod
    def text_config(config):
        """The (sub-)config holding the decoder's keys (layers, widths, heads): a multimodal model's
        ``text_config``, else the config itself."""
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def num_layers(self, config) -> int:
        return int(getattr(self.text_config(config), self.num_layers_key))


_LLAMA_LIKE = dict(
    blocks="model.layers",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    final_norm="model.norm",
    embeddings=("model.embed_tokens",),
    lm_head="lm_head",
)
_GEMMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
# DeepSeek's multi-head latent attention: q_proj, or the low-rank q_a_proj/q_b_proj pair, by config.
_MLA = (
    "self_attn.q_proj",
    "self_attn.q_a_proj",
    "self_attn.q_b_proj",
    "self_attn.kv_a_proj_with_mqa",
    "self_attn.kv_b_proj",
    "self_attn.o_proj",
)
_DEEPSEEK_SHARED = ("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj")

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(name="llama", model_types=("llama",), **_LLAMA_LIKE, prunable_hidden=True),
    ArchSpec(name="mistral", model_types=("mistral",), **_LLAMA_LIKE, prunable_hidden=True),
    ArchSpec(name="qwen2", model_types=("qwen2",), **_LLAMA_LIKE, prunable_hidden=True),
    ArchSpec(name="qwen3", model_types=("qwen3",), **_LLAMA_LIKE, prunable_hidden=True),
    ArchSpec(name="gemma2", model_types=("gemma2",), **{**_LLAMA_LIKE, "norms": _GEMMA_NORMS}),
    ArchSpec(
        name="gemma3", model_types=("gemma3_text",), **{**_LLAMA_LIKE, "norms": _GEMMA_NORMS}
    ),
    ArchSpec(
        name="gemma3-multimodal",
        model_types=("gemma3",),
        **{
            **_LLAMA_LIKE,
            "norms": _GEMMA_NORMS,
            "blocks": "model.language_model.layers",
            "final_norm": "model.language_model.norm",
            "embeddings": ("model.language_model.embed_tokens",),
        },
    ),
    ArchSpec(
        name="phi3",
        model_types=("phi3",),
        **{
            **_LLAMA_LIKE,
            "attention": ("self_attn.qkv_proj", "self_attn.o_proj"),
            "mlp": ("mlp.gate_up_proj", "mlp.down_proj"),
        },
        qkv_layout="fused",
        mlp_layout="gated_fused",
        prunable_hidden=True,
    ),
    ArchSpec(name="mixtral", model_types=("mixtral",), **_LLAMA_LIKE,
             moe=MoeSpec(experts_key="num_local_experts")),
    ArchSpec(name="qwen2-moe", model_types=("qwen2_moe",), **_LLAMA_LIKE,
             moe=MoeSpec(shared=("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"))),
    ArchSpec(name="qwen3-moe", model_types=("qwen3_moe",), **_LLAMA_LIKE, moe=MoeSpec()),
    ArchSpec(name="olmoe", model_types=("olmoe",), **_LLAMA_LIKE, head_dim_key=None, moe=MoeSpec()),
    ArchSpec(
        name="deepseek-v2",
        model_types=("deepseek_v2",),
        **{**_LLAMA_LIKE, "attention": _MLA},
        optional=_MLA[:3],
        head_dim_key=None,
        moe=MoeSpec(shared=_DEEPSEEK_SHARED, group_key="n_group"),
    ),
    ArchSpec(
        name="deepseek-v3",
        model_types=("deepseek_v3",),
        **{**_LLAMA_LIKE, "attention": _MLA},
        optional=_MLA[:3],
        head_dim_key=None,
        moe=MoeSpec(shared=_DEEPSEEK_SHARED, experts_key="num_local_experts", group_key="n_group", group_min=2),
    ),
    ArchSpec(
        name="gpt-oss",
        model_types=("gpt_oss",),
        **{**_LLAMA_LIKE, "mlp": ()},
        moe=MoeSpec(router="router", experts_key="num_local_experts", transposed=True),
    ),
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        attention=("attn.c_attn", "attn.c_proj"),
        mlp=("mlp.c_fc", "mlp.c_proj"),
        norms=("ln_1", "ln_2"),
        final_norm="transformer.ln_f",
        embeddings=("transformer.wte", "transformer.wpe"),
        lm_head="lm_head",
        num_layers_key="n_layer",
        qkv_layout="conv1d_fused",
        mlp_layout="plain",
        heads_key="n_head",
        kv_heads_key=None,
        intermediate_key="n_inner",
        head_dim_key=None,
    ),
    ArchSpec(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        mlp=("fc1", "fc2"),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        final_norm="model.decoder.final_layer_norm",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        lm_head="lm_head",
        mlp_layout="plain",
        kv_heads_key=None,
        intermediate_key="ffn_dim",
        head_dim_key=None,
    ),
    ArchSpec(
        name="gpt-neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        attention=("attention.query_key_value", "attention.dense"),
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        norms=("input_layernorm", "post_attention_layernorm"),
        final_norm="gpt_neox.final_layer_norm",
        embeddings=("gpt_neox.embed_in",),
        lm_head="lm_head",
        qkv_layout="interleaved",
        mlp_layout="plain",
        kv_heads_key=None,
        head_dim_key=None,
    ),
)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def supported_model_types() -> list[str]:
    return sorted(t for spec in SPECS for t in spec.model_types)


def moe_model_types() -> list[str]:
    """The mixture-of-experts model_type values we know, for the one line that names them."""
    return sorted(t for spec in SPECS if spec.moe is not None for t in spec.model_types)


def spec_for(model_or_config) -> ArchSpec:
    """The ArchSpec of a model (or its config); a clear error for an unknown architecture."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    moe = " (a mixture-of-experts model?" if _looks_moe(config) else ""
    known = f"; known mixture-of-experts model_type values: {', '.join(moe_model_types())})" if moe else ""
    raise UsageError(
        f"architecture {model_type!r}{moe}{known} is not supported; supported model_type values: "
        f"{', '.join(supported_model_types())}"
    )


def _looks_moe(config) -> bool:
    """The config sizes routed experts (any of the keys the families use)."""
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
    return any(getattr(config, key, None) for key in keys)
