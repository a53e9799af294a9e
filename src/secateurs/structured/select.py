"""Which groups to keep, from their scores: a uniform ratio per layer, or one ranking across layers.

* Uniform (the default, as in LLM-Pruner): in every prunable layer remove ``round(ratio × count)``
  groups of each kind, the lowest-scoring ones. Heads come in coarse steps (a 3-KV-group model can
  only lose 0, 1/3 or 2/3 of its heads), so the ratio is rounded and the achieved ratio reported.
  ``round_to`` > 1 rounds each layer's kept MLP channels to the nearest multiple of it: matrix
  products on an odd width run slower than on a nearby multiple of 8 or 16 (measured on SmolLM2's
  MLP in BENCHMARKS.md), so a smaller model that is not faster defeats the purpose of pruning it.
* Global (non-uniform): scores are standardised per kind over all prunable layers (FLAP, An et al.
  2024, §3.3, which makes heads and channels comparable), then groups are removed lowest first until
  ``ratio`` of the targeted parameters are gone. A layer always keeps at least one group of each kind.
"""

from __future__ import annotations

import torch

from ..errors import UsageError

Scores = list[dict[str, torch.Tensor]]


def _keep_of(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices of the groups kept when the ``n_remove`` lowest-scoring are removed (stable order)."""
    order = torch.sort(scores, stable=True).indices
    return order[n_remove:].sort().values


def kept_count(count: int, ratio: float, round_to: int = 1) -> int:
    """Groups of one kind a layer keeps when ``ratio`` of its ``count`` are removed, rounded to whole
    groups and, with ``round_to`` > 1, to the nearest non-zero multiple of ``round_to``."""
    kept = count - int(round(ratio * count))
    if round_to > 1:
        kept = min(count, max(round_to, int(round(kept / round_to)) * round_to))
    return kept


def select_uniform(
    scores: Scores, ratio: float, layers: list[int], round_to: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Kept groups per block: the same fraction removed from every prunable layer, per kind
    (``round_to`` applies to MLP channels; heads already move in whole KV groups)."""
    keep: list[dict[str, torch.Tensor]] = [{} for _ in scores]
    removed_any = False
    for index in layers:
        for kind, values in scores[index].items():
            count = values.numel()
            n_remove = count - kept_count(count, ratio, round_to if kind == "channels" else 1)
            if n_remove >= count:
                raise UsageError(
                    f"--ratio {ratio:g} removes all {count} {kind} of layer {index}; use a smaller --ratio"
                )
            removed_any |= n_remove > 0
            keep[index][kind] = _keep_of(values, n_remove)
    if not removed_any:
        counts = {kind: values.numel() for kind, values in scores[layers[0]].items()}
        steps = ", ".join(f"{kind}: steps of {1 / n:.3g}" for kind, n in counts.items())
        raise UsageError(f"--ratio {ratio:g} rounds to removing nothing ({steps}); use a larger --ratio")
    return keep


def select_global(
    scores: Scores, costs: list[dict[str, int]], ratio: float, layers: list[int]
) -> list[dict[str, torch.Tensor]]:
    """Kept groups per block from one ranking of standardised scores across layers and kinds."""
    kinds = sorted({kind for index in layers for kind in scores[index]})
    entries: list[tuple[float, int, str, int]] = []
    budget = 0.0
    for kind in kinds:
        values = torch.cat([scores[index][kind] for index in layers]).float()
        mean, std = values.mean(), values.std().clamp_min(1e-12) if values.numel() > 1 else torch.tensor(1.0)
        for index in layers:
            z = (scores[index][kind].float() - mean) / std
            budget += ratio * costs[index][kind] * z.numel()
            entries.extend((float(v), index, kind, g) for g, v in enumerate(z.tolist()))
    entries.sort(key=lambda entry: entry[0])
    left = {(index, kind): scores[index][kind].numel() for index in layers for kind in kinds}
    removed: dict[tuple[int, str], list[int]] = {key: [] for key in left}
    gone = 0.0
    for _, index, kind, group in entries:
        if gone >= budget:
            break
        if left[(index, kind)] <= 1:
            continue
        removed[(index, kind)].append(group)
        left[(index, kind)] -= 1
        gone += costs[index][kind]
    if gone == 0:
        raise UsageError(f"--ratio {ratio:g} is too small to remove a single group; use a larger --ratio")
    keep: list[dict[str, torch.Tensor]] = [{} for _ in scores]
    for (index, kind), groups in removed.items():
        mask = torch.ones(scores[index][kind].numel(), dtype=torch.bool)
        mask[groups] = False
        keep[index][kind] = mask.nonzero().flatten()
    return keep
