"""Fused mixture-of-experts parameters seen as one linear per expert.

In ``transformers`` 5 an MoE block keeps all its experts in two 3-D parameters (``gate_up_proj``
[E, 2·I, H] and ``down_proj`` [E, H, I]; gpt-oss stores them transposed, [E, in, out], with biases),
so walkers of ``nn.Linear`` modules miss them. :class:`ExpertLinear` is a view of one expert's
matrix: ``.weight`` is ``parameter.data[e]`` (same storage, so in-place masks change the model),
:mod:`secateurs.model.linear` orients it like any linear, and :meth:`ExpertLinear.register_forward_hook`
feeds a hook only the tokens the router sent to that expert, so calibration statistics (Wanda's
norms, SparseGPT's Hessian) come from routed tokens and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

GATE_UP, DOWN = "gate_up_proj", "down_proj"


@dataclass(frozen=True)
class MoeSpec:
    """Where one family keeps its MoE parts, relative to a block.

    ``block``: the sparse MLP module (a block whose module there has no ``experts`` is a dense layer,
    as Qwen2-MoE's ``mlp_only_layers`` and DeepSeek's first dense layers are); ``router`` and
    ``experts`` relative to it; ``shared``: the shared expert's linears (always routed to);
    ``experts_key``: the config key of the routed expert count; ``transposed``: experts stored
    [E, in, out] (gpt-oss); ``group_key``: the config key of group-limited routing's group count,
    whose groups expert removal would reshuffle.
    """

    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared: tuple[str, ...] = ()
    experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    transposed: bool = False
    group_key: str | None = None


class ExpertLinear:
    """One expert's ``gate_up_proj`` or ``down_proj`` as a linear: a view, never a copy."""

    def __init__(self, experts: nn.Module, name: str, index: int, transposed: bool) -> None:
        self.experts, self.name, self.index, self.transposed = experts, name, index, transposed

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
        inputs of this expert's matrix for exactly the tokens routed to it (skipped when none are)."""

        def on_experts(module: nn.Module, args: tuple, kwargs: dict, _output) -> None:
            x = routed_inputs(module, args, kwargs, self.index)
            if x is None:
                return
            if self.name == DOWN:
                gate_up = ExpertLinear(module, GATE_UP, self.index, self.transposed)
                x = expert_intermediate(module, gate_up(x))
            hook(self, (x,), None)

        return self.experts.register_forward_hook(on_experts, with_kwargs=True)


def routed_inputs(experts: nn.Module, args: tuple, kwargs: dict, index: int) -> torch.Tensor | None:
    """The rows of the experts module's input that the router sent to expert ``index`` (None: none)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    top_k = args[1] if len(args) > 1 else next(kwargs[k] for k in ("top_k_index", "router_indices") if k in kwargs)
    tokens = (top_k == index).any(dim=-1).nonzero().flatten()
    return hidden[tokens] if len(tokens) else None


def expert_intermediate(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The down projection's input from the gate/up output: gpt-oss's clamped interleaved gate, else
    the chunked ``act(gate) * up`` every other family uses."""
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def expert_linears(experts: nn.Module, transposed: bool) -> dict[str, ExpertLinear]:
    """Every expert's two matrices by path relative to the experts module (``gate_up_proj.3``)."""
    count = getattr(experts, GATE_UP).shape[0]
    return {
        f"{name}.{e}": ExpertLinear(experts, name, e, transposed) for e in range(count) for name in (GATE_UP, DOWN)
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
