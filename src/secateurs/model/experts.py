"""Fused mixture-of-experts parameters seen as one linear per expert.

In ``transformers`` 5 an MoE block keeps all its experts in two 3-D parameters (``gate_up_proj``
[E, 2·I, H] and ``down_proj`` [E, H, I]; gpt-oss stores them transposed, [E, in, out], with biases),
so walkers of ``nn.Linear`` modules miss them. :class:`ExpertLinear` is a view of one expert's
matrix: ``.weight`` is ``parameter.data[e]`` (same storage, so in-place masks change the model),
:mod:`secateurs.model.linear` orients it like any linear, and :meth:`ExpertLinear.register_forward_hook`
feeds a hook only the tokens the router sent to that expert, so calibration statistics (Wanda's
norms, SparseGPT's Hessian) come from routed tokens and nothing else; with ``weighted`` each routed
token's input is scaled by its routing weight, the factor the block applies to that expert's output.
:class:`RouterLinear` is the router's weight seen the same way, for a prune that includes routers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UsageError

GATE_UP, DOWN = "gate_up_proj", "down_proj"


@dataclass(frozen=True)
class MoeSpec:
    """Where one family keeps its MoE parts, relative to a block.

    ``block``: the sparse MLP module (a block whose module there has no ``experts`` is a dense layer,
    as Qwen2-MoE's ``mlp_only_layers`` and DeepSeek's first dense layers are); ``router`` and
    ``experts`` relative to it; ``shared``: the shared expert's linears (always routed to);
    ``experts_key``: the config key of the routed expert count; ``transposed``: experts stored
    [E, in, out] (gpt-oss); ``group_key``: the config key of group-limited routing's group count
    (DeepSeek's ``n_group``: the router scores contiguous groups of experts, keeps the best
    ``group_top_key`` groups, then picks its top-k among their experts), and ``group_min`` the experts
    a group's score reads (DeepSeek-V3 sums each group's top 2; V2 takes its max): expert removal then
    keeps the same count in every group, at least that many.
    """

    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared: tuple[str, ...] = ()
    experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    transposed: bool = False
    group_key: str | None = None
    group_top_key: str = "topk_group"
    group_min: int = 1
    # Pruning choices, not facts of the family: the prune verb sets them on a copy of the spec
    # (:meth:`ArchSpec.with_moe_choices`); ``SPECS`` keeps the defaults. ``routers``: the router's
    # weight is among the block's linears; ``prune_shared``: so are the shared expert's linears;
    # ``weighted``: expert statistics scale each routed token by its routing weight.
    routers: bool = False
    prune_shared: bool = True
    weighted: bool = False


class ExpertLinear:
    """One expert's ``gate_up_proj`` or ``down_proj`` as a linear: a view, never a copy."""

    def __init__(self, experts: nn.Module, name: str, index: int, transposed: bool, weighted: bool = False) -> None:
        self.experts, self.name, self.index, self.transposed = experts, name, index, transposed
        self.weighted = weighted

    @property
    def weight(self) -> torch.Tensor:
        """This expert's matrix as stored (sharing storage with the fused parameter)."""
        return getattr(self.experts, self.name).data[self.index]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.experts, f"{self.name}_bias", None)
        return None if bias is None else bias.data[self.index]

    def __repr__(self) -> str:
        return f"ExpertLinear({self.name}[{self.index}], weight={tuple(self.weight.shape)})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The expert matrix applied to ``x`` (bias included), as the experts module does."""
        weight = self.weight
        out = x @ weight if self.transposed else nn.functional.linear(x, weight)
        return out if self.bias is None else out + self.bias

    __call__ = forward

    def register_forward_hook(self, hook: Callable) -> RemovableHandle:
        """Call ``hook(self, (x,), out)`` after each forward of the experts module with ``x`` the
        inputs of this expert's matrix for exactly the tokens routed to it (skipped when none are),
        each row scaled by that token's routing weight when ``weighted``: the block multiplies the
        expert's output by it, so an error on a token counts in proportion (MoE-Pruner's router hint)."""

        def on_experts(module: nn.Module, args: tuple, kwargs: dict, _output) -> None:
            hidden, top_k, weights = routing(args, kwargs)
            tokens, slot = (top_k == self.index).nonzero(as_tuple=True)
            if not len(tokens):
                return
            x = hidden[tokens]
            if self.name == DOWN:
                gate_up = ExpertLinear(module, GATE_UP, self.index, self.transposed)
                x = expert_intermediate(module, gate_up(x))
            if self.weighted:
                x = x * weights[tokens, slot].to(x.dtype).unsqueeze(-1)
            hook(self, (x,), None)

        return self.experts.register_forward_hook(on_experts, with_kwargs=True)


class RouterLinear:
    """An MoE block's router weight ([experts, hidden]) as a linear: a view, never a copy. Routers are
    not ``nn.Linear`` (they compute logits with ``F.linear`` of their own ``weight``), so a prune that
    includes them sees them through this view; every token reaches the router, so its statistics are
    the block's input."""

    def __init__(self, router: nn.Module) -> None:
        self.router = router

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight.data

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.router, "bias", None)
        return None if bias is None else bias.data

    def __repr__(self) -> str:
        return f"RouterLinear({type(self.router).__name__}, weight={tuple(self.weight.shape)})"

    def register_forward_hook(self, hook: Callable) -> RemovableHandle:
        """Call ``hook(self, (x,), out)`` with the router's input (every token) after each forward."""
        return self.router.register_forward_hook(lambda _module, args, out: hook(self, args[:1], out))


def routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens × hidden input, tokens × top-k expert indices, tokens × top-k routing weights) of one
    call of an experts module, whichever names the family gives them (gpt-oss: ``router_indices``,
    ``routing_weights``)."""
    def arg(position: int, names: tuple[str, ...]) -> torch.Tensor:
        return args[position] if len(args) > position else next(kwargs[k] for k in names if k in kwargs)

    return (arg(0, ("hidden_states",)), arg(1, ("top_k_index", "router_indices")),
            arg(2, ("top_k_weights", "routing_weights")))


def expert_intermediate(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The down projection's input from the gate/up output: gpt-oss's clamped interleaved gate, else
    the chunked ``act(gate) * up`` every other family uses."""
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def expert_linears(experts: nn.Module, transposed: bool, weighted: bool = False) -> dict[str, ExpertLinear]:
    """Every expert's two matrices by path relative to the experts module (``gate_up_proj.3``)."""
    count = getattr(experts, GATE_UP).shape[0]
    return {
        f"{name}.{e}": ExpertLinear(experts, name, e, transposed, weighted)
        for e in range(count) for name in (GATE_UP, DOWN)
    }


def keep_experts(experts: nn.Module, router: nn.Module, kept: torch.Tensor) -> None:
    """Keep only experts ``kept`` (ascending) of one MoE block, in place: every fused parameter's and
    the router's per-expert rows (weight, bias, DeepSeek-V3's score-correction bias) are sliced, so
    each kept expert keeps its own logit and the softmax/top-k then runs over the kept ones only."""
    count = getattr(experts, GATE_UP).shape[0]
    for module in (experts, router):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.shape[0] == count:
                setattr(module, name, nn.Parameter(param.data[kept.to(param.device)].clone(), param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.ndim and buffer.shape[0] == count:
                setattr(module, name, buffer[kept.to(buffer.device)].clone())
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)


def check_routed_coverage(n_tokens: int, n_experts: int, top_k: int, min_tokens: int, consequence: str, fix: str) -> None:
    """One line when calibration cannot give each of ``n_experts`` routed experts ``min_tokens``
    tokens even if the router spread its ``n_tokens × top_k`` token slots evenly: some experts would
    then certainly be judged without data (``consequence``); ``fix`` names the flags that change it."""
    if n_tokens * top_k < n_experts * min_tokens:
        raise UsageError(
            f"calibration of {n_tokens} tokens routes {n_tokens * top_k} token slots (top-{top_k}), fewer than "
            f"{n_experts} experts × {min_tokens} tokens, so {consequence}; pass {fix}"
        )


def fold_experts(experts: nn.Module, kept: torch.Tensor, counts: torch.Tensor) -> dict[int, list[int]]:
    """Merge every expert not in ``kept`` into its most similar kept one, in place, before the removed
    ones are sliced away (:func:`keep_experts`); returns kept expert → the removed experts folded in.

    Similarity is the cosine of the experts' flattened matrices (gate/up and down together); a kept
    expert's matrices (and biases) become the average of its own and its removed neighbours', each
    weighted by how many calibration tokens the router sent it (MC-SMoE's frequency weighting), so an
    expert the router never picked adds nothing. Neurons are not aligned first (MC-SMoE permutes
    them): experts upcycled from one dense MLP (Mixtral, Qwen-MoE) share it; others merge less well.
    The router keeps the kept expert's row.
    """
    count = getattr(experts, GATE_UP).shape[0]
    params = [p for p in experts.parameters(recurse=False) if p.shape[0] == count]
    flat = torch.cat([getattr(experts, name).data.reshape(count, -1).float() for name in (GATE_UP, DOWN)], dim=1)
    flat = nn.functional.normalize(flat, dim=1)
    kept_list = kept.tolist()
    removed = [e for e in range(count) if e not in set(kept_list)]
    folded: dict[int, list[int]] = {}
    if removed:
        nearest = (flat[removed] @ flat[kept_list].T).argmax(dim=1).tolist()
        for e, k in zip(removed, nearest, strict=True):
            folded.setdefault(kept_list[k], []).append(e)
    weights = counts.to(torch.float64)
    for k, group in folded.items():
        members = [k, *group]
        w = weights[members]
        if w.sum() == 0:
            continue
        w = (w / w.sum()).to(torch.float32)
        for param in params:
            stacked = param.data[members].float()
            param.data[k] = (stacked * w.view(-1, *([1] * (stacked.ndim - 1)))).sum(0).to(param.dtype)
    return {k: sorted(v) for k, v in sorted(folded.items())}
