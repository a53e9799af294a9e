"""Channel permutation before N:M masks, folded into the model so the result stays plain N:M.

RIA (Zhang et al., ICLR 2024, §4) observes that which inputs share an N:M group decides how much
score the mask can keep: a group holding two strong inputs must drop a good weight. Permuting the
input channels first (sort by importance and deal them out so every group gets a mix, then improve
the assignment with linear-sum-assignment rounds) keeps more of the score at the same 2:4 pattern.

A permutation of a linear's input channels only leaves the model's function unchanged when the
producer of those channels is permuted the same way. That is exact for the MLP's hidden channels:
the down projection's columns and the rows (and biases) of the up / gate projections that produce
them, so the pruned model is a plain N:M model in its own (permuted) channel order and loads with
``from_pretrained``; nothing has to be permuted at run time. It is *not* done for the other
linears: q/k/v and up/gate read the residual stream, whose channels every block and the embeddings
share (one global order, not one per layer), and the attention output projection reads per-head
value channels that all query heads of a KV group share. Those keep their original order.

Rounds: each round takes one channel out of every group and reassigns the removed channels to the
groups by a maximum-weight assignment (``scipy.optimize.linear_sum_assignment``) of the score each
group keeps; the identity is a feasible assignment, so the kept score never decreases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.sequential import Stats
from ..errors import UsageError
from ..model.arch import ArchSpec
from ..model.linear import weight_matrix
from .masks import Pattern

PERMUTABLE_LAYOUTS = ("gated", "gated_fused", "plain")


@dataclass(frozen=True)
class PermuteOptions:
    """``rounds`` assignment rounds after the initial dealing (the slot taken out cycles over M)."""

    rounds: int = 8


def kept_score(scores: torch.Tensor, n: int, m: int) -> float:
    """Total score the N:M mask keeps: the N best of every group of M consecutive columns."""
    rows, cols = scores.shape
    return float(scores.reshape(rows, cols // m, m).topk(n, dim=2).values.sum(dtype=torch.float64))


def choose_permutation(scores: torch.Tensor, n: int, m: int, rounds: int) -> torch.Tensor:
    """``perm`` with column j of the permuted matrix = column ``perm[j]`` of ``scores`` (rows, cols).

    Channels sorted by their summed score are dealt in snake order over the groups (group g gets one
    of the G strongest, one of the next G, …), then each round removes slot ``r % m`` from every group
    and puts the removed channels back where they add most: with the other M−1 scores of a row
    sorted, a channel x raises the N-best sum by max(0, x − v_N), v_N the N-th best of the rest.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = scores.shape
    g = cols // m
    order = scores.sum(dim=0).argsort(descending=True, stable=True)
    groups = torch.empty(g, m, dtype=torch.long)
    for slot in range(m):
        dealt = order[slot * g : (slot + 1) * g]
        groups[:, slot] = dealt if slot % 2 == 0 else dealt.flip(0)
    chunk = max(1, (1 << 24) // max(rows * g, 1))
    for r in range(rounds):
        slot = r % m
        removed = groups[:, slot].clone()
        rest = torch.cat([groups[:, :slot], groups[:, slot + 1 :]], dim=1)
        rest_scores = scores[:, rest]  # (rows, g, m − 1)
        best = rest_scores.topk(n, dim=2).values
        base = best.sum(dim=(0, 2), dtype=torch.float64)  # (g,)
        nth = best[:, :, -1]  # (rows, g)
        candidates = scores[:, removed]  # (rows, g): candidate c's scores
        gain = torch.empty(g, g, dtype=torch.float64)
        for start in range(0, g, chunk):
            part = nth[:, start : start + chunk].unsqueeze(2)  # (rows, chunk, 1)
            gain[start : start + chunk] = (candidates.unsqueeze(1) - part).clamp_min(0).sum(dim=0, dtype=torch.float64)
        _, assigned = linear_sum_assignment((base.unsqueeze(1) + gain).numpy(), maximize=True)
        groups[:, slot] = removed[torch.from_numpy(assigned)]
    return groups.reshape(-1)


def _permute_accumulators(accumulators: dict, perm: torch.Tensor) -> None:
    """Reorder a linear's input statistics (vectors and the Gram matrix) to the new channel order."""
    for acc in accumulators.values():
        for tensor in acc.tensors():
            index = perm.to(tensor.device)
            tensor.copy_(tensor.index_select(0, index))
            if tensor.dim() == 2:
                tensor.copy_(tensor.index_select(1, index))


class ChannelPermutation:
    """The block-level step ``SparsityMethod`` runs before choosing N:M masks (see the module doc).

    ``kept`` records per block the score the down projection's N:M mask keeps before and after;
    ``perms`` the permutation (new channel j is original channel ``perms[i][j]``).
    """

    def __init__(self, spec: ArchSpec, pattern: Pattern, options: PermuteOptions | None = None) -> None:
        if not pattern.is_nm:
            raise UsageError("--permute reorders channels to choose better N:M groups; it needs --pattern N:M (e.g. 2:4)")
        if spec.mlp_layout not in PERMUTABLE_LAYOUTS:
            raise UsageError(f"--permute does not know the {spec.mlp_layout} MLP layout of {spec.name}")
        self.spec = spec
        self.pattern = pattern
        self.options = options or PermuteOptions()
        if self.options.rounds < 0:
            raise UsageError(f"--permute rounds must be ≥ 0, got {self.options.rounds}")
        self.kept: dict[int, tuple[float, float]] = {}
        self.perms: dict[int, torch.Tensor] = {}

    def __call__(
        self,
        index: int,
        block: nn.Module,
        linears: dict[str, nn.Module],
        stats: Stats,
        score: Callable[[torch.Tensor, dict], torch.Tensor],
    ) -> None:
        *producers, consumer = self.spec.mlp
        down = weight_matrix(linears[consumer])
        scores = score(down, stats.get(consumer, {})).cpu()
        n, m = self.pattern.n, self.pattern.m
        perm = choose_permutation(scores, n, m, self.options.rounds)
        self.kept[index] = (kept_score(scores, n, m), kept_score(scores[:, perm], n, m))
        self.perms[index] = perm
        with torch.no_grad():
            down.copy_(down.index_select(1, perm.to(down.device)))
            for name in producers:
                self._permute_rows(linears[name], perm)
        if consumer in stats:
            _permute_accumulators(stats[consumer], perm)

    def _permute_rows(self, module: nn.Module, perm: torch.Tensor) -> None:
        """Permute the output channels a producer writes (each half of a fused gate/up in turn)."""
        weight = weight_matrix(module)
        width = perm.numel()
        halves = weight.shape[0] // width
        index = torch.cat([perm + h * width for h in range(halves)]).to(weight.device)
        weight.copy_(weight.index_select(0, index))
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_(bias.index_select(0, index.to(bias.device)))
