"""Dependency groups: the coupled rows and columns that must be removed together.

Removing one attention head means removing its rows in the query/key/value projections (and their
biases) and its columns in the output projection; with grouped-query attention a key/value head is
shared by several query heads, so the unit is a KV group (one K head, one V head and every query
head that reads them). Removing one MLP channel means removing its rows in gate/up (or fc) and its
column in down (or proj). LLM-Pruner (Ma et al., 2023, §3.1) discovers these groups by tracing the
graph; here they are read off the ArchSpec layouts, so every supported architecture gets them with
no tracing and no per-model code.

A group set lists, for each linear it touches, the indices along one axis of its (out, in) weight
that belong to each group: ``index[g]`` are group ``g``'s rows (``axis='out'``, bias included) or
columns (``axis='in'``). Norms inside a block (Qwen3's per-head q/k norms) act on the head size,
which width pruning never changes, so they need no slicing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from .arch import ArchSpec
from .linear import weight_matrix

KINDS = ("heads", "channels")


@dataclass(frozen=True)
class Slot:
    """One linear's share of a group set: group ``g`` owns ``index[g]`` along ``axis``."""

    path: str
    axis: str
    index: torch.Tensor


@dataclass(frozen=True)
class GroupSet:
    """The groups of one kind in one block; ``consumer`` is the slot whose inputs the groups feed."""

    kind: str
    count: int
    slots: tuple[Slot, ...]

    @property
    def consumer(self) -> Slot:
        """The output projection's columns (o_proj / down_proj): where activation metrics are read."""
        return next(slot for slot in self.slots if slot.axis == "in")

    def params_per_group(self, block: nn.Module) -> int:
        """Weights (and producer biases) removed with one group."""
        total = 0
        for slot in self.slots:
            module = block.get_submodule(slot.path)
            other = weight_matrix(module).shape[1 if slot.axis == "out" else 0]
            has_bias = slot.axis == "out" and getattr(module, "bias", None) is not None
            total += slot.index.shape[1] * (other + int(has_bias))
        return total


@dataclass(frozen=True)
class HeadGeometry:
    """Attention sizes of one block: query heads, KV heads, head size."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def per_group(self) -> int:
        """Query heads that share one KV head."""
        return self.heads // self.kv_heads


def head_geometry(spec: ArchSpec, config, block: nn.Module) -> HeadGeometry:
    """The block's attention sizes, read from its output projection (so already-pruned blocks work)."""
    config = spec.text_config(config)
    config_heads = int(getattr(config, spec.heads_key))
    config_kv = int(getattr(config, spec.kv_heads_key) or config_heads) if spec.kv_heads_key else config_heads
    head_dim = getattr(config, spec.head_dim_key, None) if spec.head_dim_key else None
    hidden = int(config.hidden_size)
    head_dim = int(head_dim or hidden // config_heads)
    o_in = weight_matrix(block.get_submodule(spec.attention[-1])).shape[1]
    heads = o_in // head_dim
    kv = max(heads * config_kv // config_heads, 1)
    return HeadGeometry(heads, kv, head_dim)


def _rows(starts: torch.Tensor, width: int) -> torch.Tensor:
    """(n, width) index rows: row g is starts[g] .. starts[g] + width."""
    return starts[:, None] + torch.arange(width)[None, :]


def head_groups(spec: ArchSpec, config, block: nn.Module) -> GroupSet:
    """KV groups (or single heads without GQA) as coupled q/k/v rows and output-projection columns."""
    geo = head_geometry(spec, config, block)
    g = torch.arange(geo.kv_heads)
    q_width = geo.per_group * geo.head_dim
    q = _rows(g * q_width, q_width)
    kv = _rows(g * geo.head_dim, geo.head_dim)
    out_path = spec.attention[-1]
    layout = spec.qkv_layout
    if layout == "separate":
        q_path, k_path, v_path = spec.attention[:3]
        slots = (Slot(q_path, "out", q), Slot(k_path, "out", kv), Slot(v_path, "out", kv))
    elif layout in ("fused", "conv1d_fused"):
        q_total = geo.heads * geo.head_dim
        kv_total = geo.kv_heads * geo.head_dim
        rows = torch.cat([q, kv + q_total, kv + q_total + kv_total], dim=1)
        slots = (Slot(spec.attention[0], "out", rows),)
    elif layout == "interleaved":
        slots = (Slot(spec.attention[0], "out", _rows(g * 3 * geo.head_dim, 3 * geo.head_dim)),)
    else:
        raise UsageError(f"{spec.name}: qkv_layout {layout!r} has no known head groups; use --target channels")
    return GroupSet("heads", geo.kv_heads, (*slots, Slot(out_path, "in", q)))


def channel_groups(spec: ArchSpec, block: nn.Module) -> GroupSet:
    """MLP channels as coupled gate/up (or fc) rows and down (or proj) columns."""
    down_path = spec.mlp[-1]
    width = weight_matrix(block.get_submodule(down_path)).shape[1]
    c = torch.arange(width)[:, None]
    layout = spec.mlp_layout
    if layout == "gated":
        slots = (Slot(spec.mlp[0], "out", c), Slot(spec.mlp[1], "out", c))
    elif layout == "gated_fused":
        slots = (Slot(spec.mlp[0], "out", torch.cat([c, c + width], dim=1)),)
    elif layout == "plain":
        slots = (Slot(spec.mlp[0], "out", c),)
    else:
        raise UsageError(f"{spec.name}: mlp_layout {layout!r} has no known channel groups; use --target heads")
    return GroupSet("channels", width, (*slots, Slot(down_path, "in", c)))


def refuse_moe(spec: ArchSpec) -> None:
    """Width and hidden-size pruning stop at a mixture-of-experts family in one line."""
    if spec.moe is not None:
        raise UsageError(
            f"{spec.name}: a mixture-of-experts model; width pruning does not slice experts, "
            "use `secateurs experts` to remove whole experts"
        )


def check_target(spec: ArchSpec, kinds: tuple[str, ...]) -> None:
    """Refuse head pruning where the saved model could not be reloaded by its modeling code, and
    any width pruning of an MoE family (its experts' widths are not dependency groups here)."""
    refuse_moe(spec)
    if "heads" in kinds and not spec.prunable_heads:
        raise UsageError(
            f"{spec.name}: its transformers modeling code derives the head size from hidden_size / heads, "
            "so removing heads would not reload; use --target channels"
        )


def block_groups(spec: ArchSpec, config, block: nn.Module, kinds: tuple[str, ...]) -> dict[str, GroupSet]:
    """The group sets of the requested kinds (``heads``, ``channels``) in one block."""
    refuse_moe(spec)
    found = {}
    if "heads" in kinds:
        found["heads"] = head_groups(spec, config, block)
    if "channels" in kinds:
        found["channels"] = channel_groups(spec, block)
    return found
