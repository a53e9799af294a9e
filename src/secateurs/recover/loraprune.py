"""LoRAPrune (Zhang et al., 2023, "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient
Fine-Tuning"): prune while LoRA fine-tunes, judging weights by the adapters alone.

Importance without gradients of the frozen weights (§3.2): the gradient a weight W would get is
approximated from the adapters' own, G = ∇B·A + B·∇A − ∇B·∇A (the change of BA after one SGD step
of A and B), and an element's importance is |G ⊙ (W + s·BA)| over the weight the model actually
uses (pruned positions count as zero). Structured: a dependency group's score is the sum, over
the linears it couples, of that linear's per-group sums normalised to unit length (as the released
code does), with groups from :mod:`secateurs.model.groups` (KV groups under GQA, MLP
channels). Unstructured: the element scores themselves, compared within each output row.

Progressive pruning (§3.3): scores are smoothed by a moving average Ī ← 0.9·Ī + 0.1·I every step;
every ``prune_every`` (10) steps the target ratio follows a cubic schedule from ``initial_ratio``
(0) to ``ratio`` between the first 10% (warm-up) and the last ``cooldown`` (10%) of the steps, and
the lowest-scoring live groups of every prunable layer are removed up to that ratio. The cool-down
is recovery at the final shape: on SmolLM2 at 300 steps, 30% or 50% of the steps there recovered
better than 10% (benchmarks/sections/recovery.md), so it is an option. Removal
during training is a mask: the group's weights and producer biases are zeroed and its adapter
update masked (the masked LoRA of :mod:`.adapters`), so training sees the pruned model; once the
adapters are merged, structured groups are cut out physically by :mod:`secateurs.model.slice`,
giving a smaller dense model. Defaults follow the released code: lr 3e-4 (set on the
:class:`RecoverConfig`), rank 8, alpha 16; the first ``int(0.1 × layers)`` layers and the last one
are left whole. With distillation on, the teacher is the model as given (before any pruning).

On a mixture-of-experts model, unstructured LoRAPrune scores each routed expert's matrix from that
expert's own factors (Bₑ, Aₑ) of the fused parameter's adapter (:class:`.adapters.ExpertAdapter`) and
prunes it per row like any linear; the structured targets are refused (experts are not dependency groups).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ..model.groups import GroupSet
from ..model.load import LoadedModel
from ..model.slice import apply_widths
from ..sparsity.masks import unstructured_mask
from ..structured.base import count_parameters, model_groups
from ..structured.importance import aggregate, slot_sums
from ..structured.registry import TARGETS
from ..training.loop import TrainHook
from .adapters import Adapters, attach, base_weight
from .config import LoRAPruneConfig
from .lora import RecoverConfig, RecoverReport, identity, mean_sparsity, prepare, train_adapters, training_extra


def element_importance(adapters: Adapters, key: tuple[int, str]) -> torch.Tensor | None:
    """|G ⊙ (W + s·BA)| (out, in), float32, zero where pruned; None when the step has no gradients.
    A routed expert's matrix is scored the same way from its own factors (Bₑ, Aₑ)."""
    grads = adapters.factors(key, grad=True)
    if grads is None:
        return None
    a, b, scaling = adapters.factors(key)
    with torch.no_grad():
        ga, gb = grads[0].float(), grads[1].float()
        af, bf = a.float(), b.float()
        grad = gb @ af + bf @ ga - gb @ ga
        used = base_weight(adapters.layers[key]).float() + (bf @ af) * scaling
        return (grad * used).abs().masked_fill_(~adapters.keep(key), 0.0)


def group_importance(adapters: Adapters, index: int, group_set: GroupSet) -> torch.Tensor | None:
    """One score per group of a block: per-linear group sums, each normalised to unit length, summed."""
    per_slot = []
    for slot in group_set.slots:
        scores = element_importance(adapters, (index, slot.path))
        if scores is None:
            return None
        sums = slot_sums(scores, None, slot)
        per_slot.append(sums / (sums.norm() + 1e-8))
    return aggregate(per_slot, "sum").cpu()


class LoRAPruneHook(TrainHook):
    """Moving-average importance every step, progressive removal every ``prune_every`` steps."""

    def __init__(
        self, adapters: Adapters, config: LoRAPruneConfig, layers: list[int], groups: list[dict[str, GroupSet]], steps: int
    ) -> None:
        self.adapters = adapters
        self.config = config
        self.layers = layers
        self.groups = groups
        self.steps = steps
        self.done = 0.0
        if config.structured:
            self.scores = {(i, kind): torch.zeros(gs.count) for i in layers for kind, gs in groups[i].items()}
            self.alive = {key: torch.ones(value.numel(), dtype=torch.bool) for key, value in self.scores.items()}
        else:
            keys = [key for key in adapters.layers if key[0] in layers]
            self.scores = {key: torch.zeros(adapters.keep(key).shape) for key in keys}

    def after_backward(self, step: int) -> None:
        fresh = self._importance()
        if fresh is not None:
            for key, value in fresh.items():
                average = self.scores[key] = self.scores[key].to(value.device)
                average.mul_(self.config.ema).add_(value, alpha=1.0 - self.config.ema)
        target = self.config.ratio_at(step, self.steps)
        if target > self.done and (step % self.config.prune_every == 0 or target >= self.config.ratio):
            self.prune_to(target)

    def finish(self) -> None:
        """Reach the final ratio if the schedule did not (too few steps for its last prune event)."""
        if self.done < self.config.ratio:
            self.prune_to(self.config.ratio)

    def _importance(self) -> dict | None:
        fresh = {}
        for key in self.scores:
            if self.config.structured:
                index, kind = key
                value = group_importance(self.adapters, index, self.groups[index][kind])
            else:
                value = element_importance(self.adapters, key)
            if value is None or not torch.isfinite(value).all():
                return None  # an fp16 overflow step or no gradients: keep the average as it was
            fresh[key] = value
        return fresh

    def prune_to(self, ratio: float) -> None:
        """Remove the lowest-scoring live groups (or weights) so that ``ratio`` of each is gone."""
        if self.config.structured:
            for (index, kind), alive in self.alive.items():
                count = alive.numel()
                n_remove = min(int(round(ratio * count)), count - 1)
                dead = count - int(alive.sum())
                if n_remove <= dead:
                    continue
                scores = self.scores[(index, kind)].masked_fill(~alive, float("inf"))
                remove = torch.sort(scores, stable=True).indices[: n_remove - dead]
                alive[remove] = False
                self._zero_groups(index, self.groups[index][kind], remove)
        else:
            for key, scores in self.scores.items():
                keep = self.adapters.keep(key)
                ranked = scores.to(keep.device).masked_fill(~keep, float("-inf"))
                self._zero_elements(key, keep & unstructured_mask(ranked, ratio, "row"))
        self.done = ratio

    def _zero_groups(self, index: int, group_set: GroupSet, remove: torch.Tensor) -> None:
        with torch.no_grad():
            for slot in group_set.slots:
                key = (index, slot.path)
                dim = 0 if slot.axis == "out" else 1
                keep = self.adapters.keep(key).clone()
                positions = slot.index[remove].reshape(-1).to(keep.device)
                keep.index_fill_(dim, positions, False)
                self._zero_elements(key, keep)
                bias = getattr(self.adapters.layers[key].get_base_layer(), "bias", None)
                if slot.axis == "out" and bias is not None:
                    bias.data.index_fill_(0, positions, 0.0)

    def _zero_elements(self, key: tuple[int, str], keep: torch.Tensor) -> None:
        """Set the keep-mask of one linear and zero its base weights outside it."""
        with torch.no_grad():
            self.adapters.mask(key, keep)
            base_weight(self.adapters.layers[key]).masked_fill_(~self.adapters.keep(key), 0.0)

    def state_dict(self) -> dict:
        state = {"done": self.done, "scores": {key: value.cpu() for key, value in self.scores.items()}}
        if self.config.structured:
            state["alive"] = self.alive
        else:
            state["keep"] = {key: self.adapters.keep(key).cpu() for key in self.scores}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]
        self.scores = {key: value.clone() for key, value in state["scores"].items()}
        if self.config.structured:
            self.alive = {key: value.clone() for key, value in state["alive"].items()}
            for (index, kind), alive in self.alive.items():
                self._zero_groups(index, self.groups[index][kind], (~alive).nonzero().flatten())
        else:
            for key, keep in state["keep"].items():
                self._zero_elements(key, keep)

    def fingerprint(self) -> dict:
        return {"loraprune": asdict(self.config)}


def loraprune(
    loaded: LoadedModel, config: LoRAPruneConfig, train_config: RecoverConfig, device: torch.device
) -> RecoverReport:
    """Fine-tune with LoRA while pruning progressively, merge, and (structured) cut the groups out."""
    spec = loaded.spec
    layers = config.layers(spec.num_layers(loaded.model.config), moe=spec.moe is not None,
                           experts=train_config.experts)
    train_config, ids, distill, held_out = prepare(loaded, train_config, device, dense=True)
    groups = model_groups(loaded, TARGETS[config.target]) if config.structured else []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    params_before = count_parameters(loaded.model)
    before = mean_sparsity(loaded)
    who = identity(loaded)
    adapters = attach(loaded, train_config, mask_all=True)
    hook = LoRAPruneHook(adapters, config, layers, groups, train_config.steps)
    try:
        log = train_adapters(adapters, train_config, ids, device, hook, who, "loraprune", distill, held_out)
        hook.finish()
    except BaseException:
        adapters.discard()
        raise
    kept = adapters.merge()
    extra: dict = {"loraprune": asdict(config), "pruned_layers": layers, **training_extra(distill, log)}
    if config.structured:
        keep = [{} for _ in groups]
        for (index, kind), alive in hook.alive.items():
            keep[index][kind] = alive.nonzero().flatten()
        removed = {
            kind: sum(int((~alive).sum()) for (_, k), alive in hook.alive.items() if k == kind) for kind in groups[0]
        }
        apply_widths(loaded.model, spec, keep)
        extra["groups_removed"] = removed
    extra["params"] = {"before": params_before, "after": count_parameters(loaded.model)}
    return RecoverReport.after_training("loraprune", train_config, log, adapters, loaded, before, kept, start, device,
                                        extra)
