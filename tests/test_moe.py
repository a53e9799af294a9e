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
