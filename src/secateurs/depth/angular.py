"""Angular distance over n consecutive layers (Gromov et al., "The Unreasonable Ineffectiveness of
the Deeper Layers", arXiv 2403.17887).

For a removal of n layers, the distance between the hidden state entering layer l and the one
leaving layer l+n−1 is arccos(cos)/π, averaged over calibration sequences at the **last token**
(the paper's choice; ``tokens="all"`` averages every token). The span with the smallest distance
is removed as one block of n consecutive layers, so this criterion does not rank layers one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .base import LayerScorer, ScoringContext, Selection, observe_blocks


@dataclass
class AngularOptions:
    """``tokens``: ``last`` (paper) or ``all`` positions of each calibration sequence."""

    tokens: str = "last"


class Angular(LayerScorer):
    name = "angular"
    Options = AngularOptions

    def _states(self, ctx: ScoringContext) -> list[torch.Tensor]:
        """Hidden states entering each layer plus the last layer's output, on the CPU in float32."""
        if self.options.tokens not in ("last", "all"):
            raise UsageError(f"angular option tokens={self.options.tokens!r}: use last or all")
        n = len(ctx.spec.blocks_of(ctx.model))
        states: list[list[torch.Tensor]] = [[] for _ in range(n + 1)]

        def pick(hidden: torch.Tensor) -> torch.Tensor:
            flat = hidden[:, -1] if self.options.tokens == "last" else hidden.reshape(-1, hidden.shape[-1])
            return flat.float().cpu()

        def keep(index: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
            states[index].append(pick(inputs))
            if index == n - 1:
                states[n].append(pick(outputs))

        observe_blocks(ctx, self, keep)
        return [torch.cat(s) for s in states]

    def span_distances(self, ctx: ScoringContext, span: int) -> torch.Tensor:
        """Mean angular distance between the input of layer l and the output of layer l+span−1."""
        states = self._states(ctx)
        out = []
        for start in range(len(states) - span):
            cos = F.cosine_similarity(states[start], states[start + span], dim=-1).clamp(-1, 1)
            out.append(float((torch.arccos(cos) / torch.pi).mean()))
        return torch.tensor(out, dtype=torch.float64)

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        return self.span_distances(ctx, 1)

    def choose(self, ctx: ScoringContext, n_remove: int) -> Selection:
        distances = self.span_distances(ctx, n_remove)
        start = int(torch.argmin(distances))
        return Selection(list(range(start, start + n_remove)), [dict(enumerate(distances.tolist()))], dict(self.passes))
