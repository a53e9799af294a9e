"""``SparseExperts``: a pruned fused mixture-of-experts module held only in stored formats, each expert
matrix a :class:`~secateurs.kernels.linear.SparseLinear`, so the dispatcher (CUDA, Triton, cuSPARSELt or the
exact reference) runs every expert's product as it runs any linear's.

In ``transformers`` 5 a family's experts module keeps all its experts in two 3-D parameters and is called
as ``experts(hidden, top_k_index, top_k_weights)`` by its sparse MLP, the router having chosen the
experts outside it. :class:`SparseExperts` takes that module's place with the same call: for each expert
the router picked, its gate/up matrix on the tokens routed to it, the family's gate, its down matrix,
each row scaled by that token's routing weight and summed into the token's output in expert order,
which is what the eager forward of every family in :data:`CHECKED` does (gpt-oss: weights stored
[E, in, out] with biases, and its clamped interleaved gate; the others ``act(gate) * up`` over the
chunked halves). A family whose experts forward has not been checked against it stays dense, with the
one-line reason :func:`unsupported` gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

from ..model.experts import DOWN, GATE_UP
from .formats import SparseFormat
from .linear import SparseLinear

# The experts classes of transformers 5.25 whose eager forward SparseExperts reproduces (tested on each):
# Mixtral's, whose copies (Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3) differ only in config keys, and gpt-oss's.
CHECKED = ("MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "DeepseekV2Experts",
           "DeepseekV3Experts", "GptOssExperts")
BIASES = (f"{GATE_UP}_bias", f"{DOWN}_bias")


def unsupported(experts: nn.Module) -> str | None:
    """None when ``experts`` can be run by :class:`SparseExperts` exactly, else why not (one line)."""
    family = type(experts).__name__
    if family not in CHECKED:
        return (f"{family} runs an experts forward the sparse experts module has not been checked against "
                "(transformers 5.25's Mixtral-style and gpt-oss experts): kept dense")
    extra = [name for name, _ in experts.named_parameters(recurse=False) if name not in (GATE_UP, DOWN, *BIASES)]
    extra += [name for name, _ in experts.named_buffers(recurse=False)]
    if extra:
        return f"{family} holds {extra[0]} beside its expert matrices (quantized?): kept dense"
    if not hasattr(type(experts), "_apply_gate") or getattr(experts, "has_post_expert_norm", False):
        return f"{family} has no gate of transformers' experts interface, or a norm after each expert: kept dense"
    return None


def _capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s CUDA stream is being captured into a graph (never on the CPU)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def routed_ranges(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The (token, slot) assignments of ``top_k_index`` (tokens x top-k) as flat positions grouped by expert,
    and each expert's [start, end) range in them; assignments to an index past the last expert (padding)
    come after every range, so they are skipped.

    One read from the device per call: the range bounds, found on the device by a stable sort and a search
    rather than by one ``nonzero`` per expert (64 experts x 16 layers of GPU-to-host syncs per OLMoE prefill).
    The sort being stable keeps each expert's assignments in (token, slot) order, the order ``torch.where``
    gave them, so the sums are added in the same order as that per-expert loop added them."""
    with torch.no_grad():
        flat = top_k_index.reshape(-1)
        experts, order = torch.sort(flat, stable=True)
        bounds = torch.searchsorted(experts, torch.arange(num_experts + 1, device=flat.device, dtype=flat.dtype))
        edges = bounds.tolist()
    return order, list(pairwise(edges))


class SparseExperts(nn.Module):
    """A fused experts module whose every expert matrix is a ``SparseLinear`` (``gate_up_proj[e]``,
    ``down_proj[e]``: (out, in) stored formats, the expert's bias with it where the family has one); no
    dense copy of any expert is kept."""

    def __init__(self, experts: nn.Module, formats: dict[str, Sequence[SparseFormat]], transposed: bool) -> None:
        """``formats[GATE_UP][e]`` / ``formats[DOWN][e]``: expert ``e``'s matrices, (out, in) whatever
        orientation the family stores them in (``transposed``: [E, in, out], gpt-oss's, kept to write
        them back as stored); ``experts``: the dense module replaced (its gate and biases)."""
        super().__init__()
        reason = unsupported(experts)
        if reason is not None:
            raise ValueError(reason)
        self.family = type(experts).__name__
        self.transposed = transposed
        self.num_experts = len(formats[GATE_UP])
        for name in (GATE_UP, DOWN):
            bias = getattr(experts, f"{name}_bias", None)
            layers = [SparseLinear(fmt, None if bias is None else bias.detach()[e]) for e, fmt in enumerate(formats[name])]
            setattr(self, name, nn.ModuleList(layers))
        # The family's own gate (transformers' ``_apply_gate``: gpt-oss's clamped interleaved one, else
        # ``act(gate) * up``) runs on this module, so it keeps the plain settings that gate reads
        # (``alpha``, ``limit``: numbers; the interface's flags, booleans, describe the dense layout) and the activation.
        self.apply_gate: Callable[[nn.Module, torch.Tensor], torch.Tensor] = type(experts)._apply_gate
        for key, value in vars(experts).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "num_experts":
                setattr(self, key, value)
        if hasattr(experts, "act_fn"):
            self.act_fn = experts.act_fn

    def extra_repr(self) -> str:
        kinds = sorted({layer.kind for layer in (*self.gate_up_proj, *self.down_proj)})
        return f"family={self.family}, num_experts={self.num_experts}, format={'/'.join(kinds)}"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Each routed expert on its tokens (an index past the last expert, a padding slot, is skipped as
        the families do), weighted by the router and summed per token in expert order.

        Which experts run, and on how many tokens, is read on the host once per call (:func:`routed_ranges`),
        so a step through this module cannot be captured in a CUDA graph: under capture it raises before
        that read (which would invalidate the capture), and the decode loop falls back to eager steps
        (:meth:`StaticDecoder.capture`)."""
        if _capturing(hidden_states):
            raise RuntimeError(f"{self.family} on sparse kernels picks its routed experts on the host; "
                               "a CUDA graph cannot capture it")
        out = torch.zeros_like(hidden_states)
        order, ranges = routed_ranges(top_k_index, self.num_experts)
        top_k = top_k_index.shape[-1]
        for e, (start, end) in enumerate(ranges):
            if start == end:
                continue
            picked = order[start:end]
            token, slot = picked // top_k, picked % top_k
            y = self.down_proj[e](self.apply_gate(self, self.gate_up_proj[e](hidden_states[token])))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def layers(self) -> dict[str, SparseLinear]:
        """Every expert matrix by its path relative to this module (``gate_up_proj.3``), as the ExpertLinear
        views of the dense module were named."""
        return {f"{name}.{e}": layer for name in (GATE_UP, DOWN) for e, layer in enumerate(getattr(self, name))}
