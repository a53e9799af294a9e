"""Iterative prune + fine-tune: reach the target sparsity in ``rounds`` steps with a short LoRA
recovery after each (in the style of Syed, Guo, Sundarapandiyan, 2023, "Prune and Tune: Improving
Efficient Pruning Techniques for Massive Language Models", who interleave one-shot SparseGPT with
fine-tuning).

Round j of k prunes with any registered one-shot method (magnitude, Wanda, SparseGPT, ... through
:func:`secateurs.api.prune`) to j/k of the target sparsity, calibrating on the model as the previous
recovery left it, then runs masked LoRA (:mod:`.lora`), so the zeros of every round survive. A
weight pruned in one round stays pruned in the next: methods that may revive a zero (SparseGPT's
weight update) have it zeroed again, so the achieved sparsity can end slightly above the target;
it is reported. N:M patterns have one fixed sparsity and cannot be approached gradually, so they
take a single round. Each round's recovery checkpoints under ``checkpoint_dir/round-j``, so a
stopped run re-prunes (deterministically) and resumes where it stopped. With distillation on, every
round distills from one teacher: the model as given (dense), unless another is named.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..data.calib import CalibConfig
from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..model.linear import weight_matrix
from ..model.load import LoadedModel
from ..record import IterativeStage
from ..sparsity.base import SparsityTarget
from ..sparsity.prune import PruneConfig, prune
from ..training.distill import load_teacher
from .lora import RecoverConfig, RecoverReport, mean_sparsity, recover_lora


@dataclass
class IterativeReport:
    """Each round's prune and recovery record, the total time and the final sparsity."""

    method: str
    rounds: list[dict]
    seconds: float
    sparsity: float
    recoveries: list[RecoverReport]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.recoveries)

    def stage_record(self) -> IterativeStage:
        return IterativeStage(method=self.method, rounds=self.rounds, achieved_sparsity=self.sparsity,
                              recovery_tokens=self.tokens, seconds=round(self.seconds, 3))


def _zeros(loaded: LoadedModel) -> list[torch.Tensor]:
    """Where every block linear is zero now (to keep those weights pruned in later rounds)."""
    return [weight_matrix(module) == 0 for module in loaded.spec.named_linears(loaded.model).values()]


def _rezero(loaded: LoadedModel, zeros: list[torch.Tensor]) -> None:
    modules = list(loaded.spec.named_linears(loaded.model).values())
    with torch.no_grad():
        for module, zero in zip(modules, zeros):
            weight_matrix(module).masked_fill_(zero.to(module.weight.device), 0.0)


def prune_iterative(
    loaded: LoadedModel,
    prune_config,
    rounds: int,
    recover_config: RecoverConfig,
    calib: CalibConfig | None = None,
    engine: EngineOptions | None = None,
) -> IterativeReport:
    """Prune ``loaded.model`` in place to ``prune_config``'s sparsity in ``rounds`` prune + recover steps."""
    engine = engine or EngineOptions()
    device = engine.torch_device()
    recover_config.validate()
    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    target = SparsityTarget.build(prune_config.sparsity, prune_config.pattern, loaded.spec.num_layers(loaded.model.config))
    if target.pattern.is_nm and rounds > 1:
        raise UsageError(f"pattern {target.pattern} has one fixed sparsity; use --rounds 1 or an unstructured target")
    teacher = load_teacher(loaded, recover_config.distill, device, dense=True) if recover_config.distill.enabled else None
    start = time.perf_counter()
    records, recoveries = [], []
    for j in range(1, rounds + 1):
        step_sparsity = [s * j / rounds for s in target.per_block]
        step = PruneConfig(
            prune_config.method,
            step_sparsity,
            prune_config.pattern,
            prune_config.options,
            prune_config.allocation,
            prune_config.allocation_options,
        )
        zeros = _zeros(loaded)
        pruned = prune(loaded, step, calib, engine)
        _rezero(loaded, zeros)
        after_prune = mean_sparsity(loaded)
        folder = recover_config.checkpoint_dir
        round_config = replace(
            recover_config,
            seed=recover_config.seed + j - 1,
            checkpoint_dir=str(Path(folder) / f"round-{j}") if folder else None,
        )
        recovered = recover_lora(loaded, round_config, device, teacher=teacher)
        recoveries.append(recovered)
        first, last = recovered.loss_start_end()
        records.append({
            "round": j,
            "target_sparsity": sum(step_sparsity) / len(step_sparsity),
            "achieved_sparsity": after_prune,
            "prune_seconds": round(pruned.seconds, 3),
            "recover_steps": recovered.log.steps,
            "recover_loss": {"first": first, "last": last},
            "recover_seconds": round(recovered.seconds, 3),
            "zeros_kept": recovered.zeros_kept,
        })
    return IterativeReport(prune_config.method, records, time.perf_counter() - start, mean_sparsity(loaded), recoveries)
