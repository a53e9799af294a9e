"""What every layer-pruning criterion shares: the scorer contract, the removal loop, the passes.

A scorer gives one number per current decoder layer, lower meaning "remove first". The loop
either ranks once (one-shot) or removes the lowest layer, rescores the smaller model and repeats
(iterative, as SLEB and GradMAP do). "The smaller model" is the same model with
:func:`~secateurs.model.drop_layers.layers_removed` applied, so nothing is copied.

The three passes scorers are built from live here too: the calibration loss (forward only),
gradients reduced to one scalar per layer the moment each exists (never a full gradient copy in the
default per-batch mode), and block inputs/outputs observed through the shared engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..engine.sequential import BlockMethod, EngineOptions, run_blocks
from ..errors import UsageError
from ..evaluate.loss import gradient_pass, mean_loss
from ..model.arch import ArchSpec
from ..model.drop_layers import layers_removed

# A gradient over fewer tokens than this is too noisy to rank layers: an error, not a bad result.
MIN_GRADIENT_TOKENS = 256


@dataclass
class ScoringContext:
    """The model being pruned, its ArchSpec, calibration batches already on ``device``."""

    model: nn.Module
    spec: ArchSpec
    batches: list[torch.Tensor]
    device: torch.device
    engine: EngineOptions = field(default_factory=EngineOptions)

    @property
    def n_tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    def calib_ids(self) -> torch.Tensor:
        return torch.cat(self.batches)


@dataclass
class Selection:
    """Which layers (original indices) a criterion removes, in removal order, and its scores per round.

    ``round_seconds[k]`` is the time from the start to the end of round k (iterative criteria),
    so one run to n removals also times every smaller count. ``rounds[k]`` maps original layer index to score in round k (layers still present then);
    one-shot criteria have a single round. A criterion that scores spans of consecutive layers
    (angular distance) keys its round by the span's first layer.
    """

    order: list[int]
    rounds: list[dict[int, float]]
    passes: dict[str, int] = field(default_factory=dict)
    round_seconds: list[float] = field(default_factory=list)

    @property
    def removed(self) -> list[int]:
        return sorted(self.order)


class LayerScorer:
    """One layer-importance criterion. Subclasses set ``name``, ``Options`` and :meth:`score`."""

    name: ClassVar[str]
    Options: ClassVar[type]
    needs_gradients: ClassVar[bool] = False

    def __init__(self, options) -> None:
        self.options = options
        self.passes = {"forward": 0, "backward": 0}

    @property
    def one_shot(self) -> bool:
        return bool(getattr(self.options, "one_shot", True))

    def check(self, ctx: ScoringContext) -> None:
        """Refuse calibration too small for this criterion, before any work."""
        if self.needs_gradients and ctx.n_tokens < MIN_GRADIENT_TOKENS:
            raise UsageError(
                f"{self.name} needs at least {MIN_GRADIENT_TOKENS} calibration tokens for its gradient, "
                f"got {ctx.n_tokens}; raise --n-samples or --seq-len"
            )

    def score(self, ctx: ScoringContext) -> torch.Tensor:
        """One score per current layer of ``ctx.model``; lower means less important."""
        raise NotImplementedError

    def choose(self, ctx: ScoringContext, n_remove: int) -> Selection:
        """Remove ``n_remove`` layers: lowest scores at once, or one by one with rescoring."""
        if self.one_shot:
            scores = self.score(ctx)
            order = torch.argsort(scores, stable=True)[:n_remove].tolist()
            return Selection(order, [dict(enumerate(scores.tolist()))], dict(self.passes))
        order: list[int] = []
        rounds = []
        elapsed = []
        start = time.perf_counter()
        for _ in range(n_remove):
            with layers_removed(ctx.model, ctx.spec, order) as kept:
                scores = self.score(ctx)
            rounds.append(dict(zip(kept, scores.tolist())))
            order.append(kept[int(torch.argmin(scores))])
            elapsed.append(time.perf_counter() - start)
        return Selection(order, rounds, dict(self.passes), elapsed)


def calibration_loss(ctx: ScoringContext, scorer: LayerScorer) -> float:
    """Mean calibration loss of the current model (forward only); inf when it is not finite."""
    loss = mean_loss(ctx.model, ctx.batches, ctx.device)
    scorer.passes["forward"] += len(ctx.batches)
    return loss if math.isfinite(loss) else float("inf")


GradientReduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gradient_scores(ctx: ScoringContext, scorer: LayerScorer, reduce: GradientReduce, per_batch: bool) -> torch.Tensor:
    """Σ over each layer's linear weights of ``reduce(grad, weight)``, one backward per batch.

    ``per_batch=True`` reduces each batch's gradient as soon as autograd has accumulated it and
    frees it, so memory never holds a gradient of the whole model; the score is then a sum over
    batches of per-batch magnitudes. ``per_batch=False`` reduces the gradient of the whole
    calibration loss (summed over batches) at the end, which keeps every linear's gradient alive
    until then.
    """
    blocks = ctx.spec.blocks_of(ctx.model)
    layers, params = zip(*[(i, lin.weight) for i, block in enumerate(blocks) for lin in ctx.spec.linears(block).values()])
    scores = torch.zeros(len(blocks), dtype=torch.float64)
    summed: dict[int, torch.Tensor] = {}

    def add(i: int, grad: torch.Tensor) -> None:
        scores[layers[i]] += float(reduce(grad.float(), params[i].detach().float()))

    def accumulate(i: int, grad: torch.Tensor) -> None:
        summed[i] = summed[i] + grad if i in summed else grad

    gradient_pass(ctx.model, ctx.batches, params, add if per_batch else accumulate, ctx.device,
                  f"{scorer.name}: layer scores (gradients)")
    scorer.passes["forward"] += len(ctx.batches)
    scorer.passes["backward"] += len(ctx.batches)
    for i in sorted(summed):
        add(i, summed.pop(i))
    return scores


class _Observer(BlockMethod):
    """Forward-only engine method: hands each block's input and output to a callback."""

    needs_calibration = True
    modifies_weights = False

    def __init__(self, callback: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        self.callback = callback

    def process_block(self, index, block, linears, stats) -> None:
        """Observe-only: nothing to change."""

    def observe(self, index: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        self.callback(index, inputs, outputs)


def observe_blocks(ctx: ScoringContext, scorer: LayerScorer, callback: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
    """Run the calibration batches block by block through the shared engine, calling ``callback``."""
    engine = EngineOptions(ctx.engine.device, ctx.batches[0].shape[0], ctx.engine.offload_activations)
    run_blocks(ctx.model, ctx.spec, _Observer(callback), ctx.calib_ids(), engine, f"{scorer.name} scores")
    scorer.passes["forward"] += len(ctx.batches)
