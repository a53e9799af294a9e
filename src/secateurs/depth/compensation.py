"""GradMAP stage 2: projection compensation of the mean shift that removing layers causes.

GradMAP as described in the abstract: find the layer whose output mean drifts most once layers are
removed, and correct that drift in one step with a projection matrix folded into existing weights.
Our reading, with the unknowns as options (defaults are readings, not yet measured: see
benchmarks/sections/layer_pruning.md):

1. Run the calibration batches through the full model and through the model without the removed
   layers; compare the mean hidden state (over all calibration tokens) leaving each kept layer with
   the one leaving the same layer in the full model. ``shift="relative"`` divides ‖Δμ‖ by ‖μ_full‖
   (``absolute`` does not); the kept layer with the largest shift is compensated.
2. With D the output of that layer's MLP output projection in the pruned model and R = D + (T − Y)
   the value D should have had for the layer's output Y to reach the full model's T, fit
   P = argmin ‖P·D − R‖² + λ‖P − I‖² in closed form (the "one step"): Pᵀ = (DᵀD + λI)⁻¹(DᵀR + λI),
   with λ = ``alpha`` × mean diagonal of DᵀD.
3. Fold: W_out ← P·W_out (and b ← P·b) in float32, so the pruned model has no new module.

The full (hidden × hidden) P lowers the drift it is fitted to, but that drift is dominated by a few
massive-activation dimensions and need not track the language-model loss: removing 9 consecutive
layers of SmolLM2 by angular distance, the fit cut the held-out drift 4× and still took WikiText-2
perplexity from 286 to 1,300–1,600. So when there are two or more batches, λ is chosen by
cross-validation (``select=True``, the default): the batches are dealt into up to four folds; for
λ = ``alpha`` × 1, 10, 100, 1000, P is fitted without each fold, folded in turn and scored by the
pruned model's next-token loss on that fold, so every batch is held out once. The λ with the lowest
mean held-out loss is refitted on every batch and folded only if it beats leaving the layer alone on
every fold (``accept="every_fold"``, the default; ``"mean"`` asks only that the mean be lower);
otherwise nothing is folded. (A single held-out quarter, then the mean rule, each folded projections
that raised test perplexity by 1–2%. One such row, SLEB removing 3 layers, passes even the per-fold
rule: its calibration loss falls on every fold while the WikiText-2 test text disagrees.)

Works on the result of any criterion; it must run while the removed layers still exist (the full
model's activations are its target), i.e. before :func:`~secateurs.model.drop_layers.drop_layers`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce

import torch
from torch import nn

from ..errors import UsageError
from ..model.arch import ArchSpec
from ..model.drop_layers import layers_removed
from ..model.linear import weight_matrix


@dataclass
class CompensationOptions:
    shift: str = "relative"
    alpha: float = 1e-2
    select: bool = True
    accept: str = "every_fold"

    def validate(self) -> None:
        """One-line errors for bad values, before any model is loaded or layer scored."""
        if self.shift not in ("relative", "absolute"):
            raise UsageError(f"compensation shift={self.shift!r}: use relative or absolute")
        if self.alpha < 0:
            raise UsageError(f"compensation alpha must be >= 0, got {self.alpha}")
        if self.accept not in ("every_fold", "mean"):
            raise UsageError(f"compensation accept={self.accept!r}: use every_fold or mean")


ALPHA_STEPS = (1.0, 10.0, 100.0, 1000.0)


@dataclass
class _Moments:
    """DᵀD, DᵀR and ‖R‖², ‖R − D‖² over some tokens: enough to fit P and report its drift."""

    dtd: torch.Tensor | None = None
    dtr: torch.Tensor | None = None
    rr: float = 0.0
    identity: float = 0.0

    def add(self, d: torch.Tensor, r: torch.Tensor) -> None:
        self.dtd = d.T @ d if self.dtd is None else self.dtd + d.T @ d
        self.dtr = d.T @ r if self.dtr is None else self.dtr + d.T @ r
        self.rr += float(r.pow(2).sum())
        self.identity += float((r - d).pow(2).sum())

    def merged(self, other: _Moments) -> _Moments:
        return _Moments(self.dtd + other.dtd, self.dtr + other.dtr, self.rr + other.rr, self.identity + other.identity)

    def drift(self, p: torch.Tensor) -> float:
        """‖P·D − R‖² over these tokens, from the moments alone."""
        p = p.to(self.dtd.device)
        dtd, dtr = self.dtd.double(), self.dtr.double()
        return max(self.rr - 2 * float((p * dtr.T).sum()) + float((p @ dtd @ p.T).trace()), 0.0)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def mean_outputs(model: nn.Module, spec: ArchSpec, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean hidden state leaving each current layer over every calibration token: (layers, hidden)."""
    blocks = spec.blocks_of(model)
    sums: list[torch.Tensor | None] = [None] * len(blocks)
    count = 0

    def hook(index: int, _module, _args, out) -> None:
        flat = _output(out).detach().float().reshape(-1, _output(out).shape[-1]).sum(0)
        sums[index] = flat if sums[index] is None else sums[index] + flat

    handles = [b.register_forward_hook(lambda m, a, o, i=i: hook(i, m, a, o)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch, use_cache=False)
                count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(sums).cpu().double() / count


def fit_projection(dtd: torch.Tensor, dtr: torch.Tensor, alpha: float) -> torch.Tensor:
    """P minimising ‖P·D − R‖² + λ‖P − I‖², from DᵀD and DᵀR (tokens as rows), in float64."""
    dtd, dtr = dtd.double(), dtr.double()
    eye = torch.eye(dtd.shape[0], dtype=torch.float64, device=dtd.device)
    lam = alpha * dtd.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(dtd + lam * eye, dtr + lam * eye).T


@torch.no_grad()
def fold_projection(linear: nn.Module, projection: torch.Tensor) -> None:
    """W ← P·W and b ← P·b in place, so the linear's output becomes P times the old output."""
    weight = weight_matrix(linear)
    p = projection.to(weight.device, torch.float32)
    weight.copy_((p @ weight.float()).to(weight.dtype))
    bias = getattr(linear, "bias", None)
    if bias is not None:
        bias.copy_((p @ bias.float()).to(bias.dtype))


def compensate(
    model: nn.Module,
    spec: ArchSpec,
    removed: Sequence[int],
    batches: Sequence[torch.Tensor],
    options: CompensationOptions | None = None,
) -> dict:
    """Fit and fold the projection for the kept layer that drifts most; returns what was done."""
    options = options or CompensationOptions()
    options.validate()
    full_means = mean_outputs(model, spec, batches)
    with layers_removed(model, spec, removed) as kept:
        pruned_means = mean_outputs(model, spec, batches)
    reference = full_means[kept]
    shifts = (pruned_means - reference).norm(dim=1)
    if options.shift == "relative":
        shifts = shifts / reference.norm(dim=1).clamp_min(1e-12)
    position = int(torch.argmax(shifts))
    target_layer = kept[position]
    out_linear = spec.blocks_of(model)[target_layer].get_submodule(spec.mlp[-1])
    n_folds = min(4, len(batches)) if options.select and len(batches) >= 2 else 1
    folds = [_Moments() for _ in range(n_folds)]
    for i, batch in enumerate(batches):
        full_out = _capture(model, spec.blocks_of(model)[target_layer], batch)
        with layers_removed(model, spec, removed):
            block = spec.blocks_of(model)[position]
            pruned_out, down = _capture(model, block, batch, out_linear)
        d = down.reshape(-1, down.shape[-1]).float()
        r = d + (full_out - pruned_out).reshape(d.shape).float()
        folds[i % n_folds].add(d, r)
    fit = reduce(_Moments.merged, folds)
    alpha, held_losses, per_fold = options.alpha, {}, {}
    if n_folds > 1:
        alpha, held_losses, per_fold = _select_alpha(model, spec, removed, batches, folds, out_linear, options)
    if alpha is not None:
        projection = fit_projection(fit.dtd, fit.dtr, alpha)
        fold_projection(out_linear, projection)
        after = fit.drift(projection)
    else:
        after = fit.identity
    return {
        "layer": target_layer,
        "layer_in_pruned_model": position,
        "shift": options.shift,
        "alpha": alpha,
        "accept": options.accept,
        "folded": alpha is not None,
        "held_out_loss": _by_label(held_losses),
        "held_out_loss_per_fold": _by_label(per_fold),
        "shifts": {int(k): round(float(s), 6) for k, s in zip(kept, shifts)},
        "drift_sq_before": fit.identity,
        "drift_sq_after": after,
    }


def _by_label(losses: dict) -> dict | None:
    """Candidate keys as the record writes them ("identity", "0.01", …); None when nothing was scored."""
    return {(k if isinstance(k, str) else f"{k:g}"): v for k, v in losses.items()} or None


def _select_alpha(
    model: nn.Module,
    spec: ArchSpec,
    removed: Sequence[int],
    batches: Sequence[torch.Tensor],
    folds: list[_Moments],
    out_linear: nn.Module,
    options: CompensationOptions,
) -> tuple[float | None, dict, dict]:
    """λ with the lowest cross-validated loss (or None when folding should be skipped), the mean
    held-out loss per candidate and the per-fold losses behind it.

    Each fold's batches are scored with P fitted on the other folds. ``accept="every_fold"`` folds
    only if that λ beats leaving the layer alone on every fold, not just on their mean: a gain that
    one fold contradicts did not carry over to unseen text (GradMAP removing 6 of SmolLM2's layers,
    CPU setting: a 0.2% lower mean held-out loss, one fold worse, +1.7% test perplexity if folded).
    """
    n_folds = len(folds)
    fold_batches = [batches[f::n_folds] for f in range(n_folds)]
    per_fold = {"identity": [_loss(model, spec, removed, fb) for fb in fold_batches]}
    for candidate in (options.alpha * k for k in ALPHA_STEPS):
        per_fold[candidate] = []
        for f in range(n_folds):
            others = reduce(_Moments.merged, folds[:f] + folds[f + 1:])
            with _folded(out_linear, fit_projection(others.dtd, others.dtr, candidate)):
                per_fold[candidate].append(_loss(model, spec, removed, fold_batches[f]))
    weights = [len(fb) / len(batches) for fb in fold_batches]
    held_losses = {k: sum(w * v for w, v in zip(weights, losses)) for k, losses in per_fold.items()}
    best = min(held_losses, key=held_losses.get)
    if best == "identity":
        return None, held_losses, per_fold
    if options.accept == "every_fold" and any(c >= i for c, i in zip(per_fold[best], per_fold["identity"])):
        return None, held_losses, per_fold
    return best, held_losses, per_fold


@contextmanager
def _folded(linear: nn.Module, projection: torch.Tensor) -> Iterator[None]:
    """``projection`` folded into ``linear`` for the duration of the block, then the exact weights back."""
    weight = weight_matrix(linear)
    bias = getattr(linear, "bias", None)
    saved = (weight.detach().clone(), None if bias is None else bias.detach().clone())
    fold_projection(linear, projection)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved[0])
            if bias is not None:
                bias.copy_(saved[1])


@torch.no_grad()
def _loss(model: nn.Module, spec: ArchSpec, removed: Sequence[int], batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token loss of the model without ``removed`` over ``batches``."""
    total = 0.0
    with layers_removed(model, spec, removed):
        for batch in batches:
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss)
    return total / len(batches)


def _capture(model: nn.Module, block: nn.Module, batch: torch.Tensor, linear: nn.Module | None = None):
    """Run ``model`` on ``batch``; return ``block``'s output (and ``linear``'s output if given)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [block.register_forward_hook(lambda m, a, o: seen.__setitem__("block", _output(o).detach()))]
    if linear is not None:
        handles.append(linear.register_forward_hook(lambda m, a, o: seen.__setitem__("linear", o.detach())))
    try:
        with torch.no_grad():
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return (seen["block"], seen["linear"]) if linear is not None else seen["block"]
