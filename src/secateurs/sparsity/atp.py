"""ATP: per-block sparsity rising in an arithmetic progression with depth, one parameter searched.

Huang et al., "Determining Layer-wise Sparsity for Large Language Models Through a Theoretical
Perspective" (arXiv 2502.14770): early blocks' pruning error is amplified by every later block, so
sparsity should grow with depth; an arithmetic progression s_i = S + d·(i − (L−1)/2) keeps the mean at
the target S and leaves one parameter, the common difference d. Here it is given as the ``spread``
s_{L−1} − s_0 = d·(L−1) (0 is uniform).

With no spread given, a small search in the spirit of EvoPress scores each candidate spread on the
calibration data: the model is pruned with Wanda (a cheap proxy for the final method) on the first
``search_samples`` calibration windows, its language-modelling loss on those windows is measured, the
dense weights are restored, and the lowest loss wins. Only the schedule is kept; the final prune
then runs the requested method once. On a mixture-of-experts model every routed expert's matrices
are pruned (and restored) like the block's other linears, the proxy applying the prune's fallback
rule to experts that saw too few tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.sequential import EngineHooks, EngineOptions, run_blocks
from ..errors import UsageError
from ..evaluate.loss import mean_loss
from ..model.arch import ArchSpec
from ..model.linear import weight_matrix
from .base import SparsityTarget
from .config import AtpOptions, MoeOptions
from .experts import ExpertFallback
from .wanda import Wanda

CANDIDATE_SPREADS = (0.0, 0.1, 0.2, 0.3, 0.4)


def atp_schedule(sparsity: float, n_blocks: int, spread: float) -> list[float]:
    """Sparsities rising linearly with depth, mean ``sparsity``, last minus first = ``spread``."""
    middle = (n_blocks - 1) / 2
    step = spread / (n_blocks - 1) if n_blocks > 1 else 0.0
    schedule = [sparsity + step * (i - middle) for i in range(n_blocks)]
    if schedule[0] < 0.0 or schedule[-1] >= 1.0:
        raise UsageError(
            f"ATP spread {spread:g} at mean sparsity {sparsity:g} puts blocks at "
            f"{schedule[0]:.3f}..{schedule[-1]:.3f}, outside [0, 1); lower --atp-spread"
        )
    return schedule


def _calibration_loss(model: nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    """Mean next-token loss over the windows (the whole model on ``device`` for this pass)."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        return mean_loss(model, ids.split(1), device)
    finally:
        model.to(home)


def atp_target(
    model: nn.Module,
    spec: ArchSpec,
    target: SparsityTarget,
    calib_ids: torch.Tensor,
    engine: EngineOptions,
    options: AtpOptions,
    hooks: EngineHooks | None = None,
    moe: MoeOptions | None = None,
) -> tuple[SparsityTarget, dict[float, float]]:
    """Replace a uniform unstructured target by ATP's schedule; returns it and each searched spread's
    loss. ``moe``: an MoE prune's options (the proxy's fallback rule for starved experts)."""
    if target.pattern.is_nm:
        raise UsageError(f"--allocation atp sets unstructured per-block sparsity; {target.pattern} fixes it, use --pattern unstructured")
    if len(set(target.per_block)) != 1:
        raise UsageError("--allocation atp spreads one --sparsity value over the blocks; pass a single value")
    sparsity, n_blocks = target.per_block[0], len(target.per_block)
    options.validate()
    if options.spread is not None:
        return SparsityTarget(tuple(atp_schedule(sparsity, n_blocks, options.spread)), target.pattern), {}
    ids = calib_ids[: options.search_samples]
    linears = [weight_matrix(m) for m in spec.named_linears(model).values()]
    if any(w.is_meta for w in linears):
        raise UsageError("the ATP search prunes the whole model several times; with --stream give --atp-spread")
    dense = [w.detach().to("cpu", copy=True) for w in linears]
    losses: dict[float, float] = {}
    for spread in CANDIDATE_SPREADS:
        try:
            schedule = atp_schedule(sparsity, n_blocks, spread)
        except UsageError:
            break  # larger spreads leave [0, 1) too
        proxy = Wanda(SparsityTarget(tuple(schedule), target.pattern))
        if moe is not None and spec.moe is not None:
            proxy.expert_fallback = ExpertFallback(moe)
        run_blocks(model, spec, proxy, ids, engine, f"ATP search, spread {spread:g}", hooks)
        losses[spread] = _calibration_loss(model, ids, engine.torch_device())
        with torch.no_grad():
            for weight, saved in zip(linears, dense, strict=True):
                weight.copy_(saved)
    best = min(losses, key=losses.get)
    return SparsityTarget(tuple(atp_schedule(sparsity, n_blocks, best)), target.pattern), losses
