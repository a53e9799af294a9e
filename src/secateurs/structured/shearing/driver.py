"""The shearing run: its settings, what mask learning adds to the training loop, the report, and
:func:`shear` (plan, learn masks, slice, continue pretraining: on the LM loss, or distilling from
the model as given, :mod:`secateurs.training.distill`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ...engine.sequential import EngineOptions
from ...errors import UsageError
from ...model.load import LoadedModel
from ...record import ShearStage, peak_memory_mb
from ...training.distill import Distillation, load_teacher
from ...training.loop import TrainHook, TrainLog
from ..config import ShearConfig
from .dynamic_batch import Domains, held_out_losses, pretrain
from .forward import MaskedForward
from .masks import ShearMasks
from .slicing import apply_keep, non_embedding_params
from .target import Plan, plan_for

# Resume checkpoints of the two phases in --checkpoint-dir (safetensors + JSON, never pickle).
PRUNE_CHECKPOINT = "prune.safetensors"
CONTINUE_CHECKPOINT = "continue.safetensors"


class ShearTraining(TrainHook):
    """The mask-learning phase's additions to LM training: masks, multipliers, their optimiser."""

    def __init__(self, masks: ShearMasks, forward: MaskedForward, config: ShearConfig) -> None:
        self.masks, self.forward, self.config = masks, forward, config
        self.optimizer = torch.optim.Adam(masks.parameters(), lr=config.mask_lr)
        self.step = 0

    def begin_step(self, step: int) -> None:
        self.step = step
        self.masks.constrain()
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        self.forward.z = self.masks.sample(generator)

    def loss(self, step: int) -> torch.Tensor:
        warm = self.config.lagrangian_warmup * self.config.steps
        progress = 1.0 if warm <= 0 else min(1.0, step / warm)
        return self.masks.lagrangian(progress)

    def after_backward(self, step: int) -> None:
        for lam in self.masks.lambdas.values():
            if lam.grad is not None:
                lam.grad.neg_()  # gradient ascent on the multipliers

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def status(self) -> str:
        with torch.no_grad():
            expected = float(self.masks.expected_params())
        return f"size {expected / 1e6:.2f}M → {self.masks.plan.target_params / 1e6:.2f}M"

    @contextmanager
    def eval_mode(self):
        """Held-out losses with each kind's currently expected number of units kept (the paper's
        ``eval_target_model=false``)."""
        saved = self.forward.z
        with torch.no_grad():
            z = {}
            for kind, score in self.masks.expected().items():
                k = score.sum(-1, keepdim=True).round().clamp(min=1).long()
                rank = score.argsort(-1, descending=True).argsort(-1)
                z[kind] = (rank < k).to(score.dtype)
        self.forward.z = z
        try:
            yield
        finally:
            self.forward.z = saved

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.optimizer.load_state_dict(state["optimizer"])


@dataclass
class ShearReport:
    """What shearing did: the shape reached, sizes, both phases' logs, time and memory."""

    config: ShearConfig
    plan: Plan
    kept: dict[str, list]
    params_before: int
    params_after: int
    prune_log: TrainLog
    continue_log: TrainLog | None
    reference_loss: list[float] | None
    seconds: float
    peak_memory_mb: float
    device: str

    @property
    def tokens(self) -> int:
        return self.prune_log.tokens + (self.continue_log.tokens if self.continue_log else 0)

    def stage_record(self) -> ShearStage:
        config = asdict(self.config)
        config["target"] = asdict(self.config.target)
        return ShearStage(
            method="llm-shearing",
            config=config,
            source_shape=self.plan.source,
            target_shape=self.plan.target,
            kept=self.kept,
            params_before=self.params_before,
            params_after=self.params_after,
            reference_loss=self.reference_loss,
            prune=self.prune_log.to_dict(),
            continued=self.continue_log.to_dict() if self.continue_log else None,
            tokens=self.tokens,
            seconds=round(self.seconds, 3),
            peak_memory_mb=round(self.peak_memory_mb, 1),
            device=self.device,
        )


def shear(loaded: LoadedModel, config: ShearConfig, engine: EngineOptions | None = None) -> ShearReport:
    """Learn masks toward ``config.target``, slice the model to it in place, then continue pretraining."""
    config.validate()
    plan = plan_for(loaded, config.target)
    if not plan.kinds:
        raise UsageError("the target is the model's own shape; ask for fewer layers, hidden, heads or intermediate")
    device = (engine or EngineOptions()).torch_device()
    teacher = load_teacher(loaded, config.distill, device, dense=True) if config.distill.enabled else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    domains = Domains.load(config.datasets, loaded.tokenizer, config.seq_len, config.eval_windows,
                           config.data_dir, config.domain_weights)
    model = loaded.model
    home = next(model.parameters()).device
    clock = time.perf_counter()
    params_before = non_embedding_params(loaded)
    model.to(device)
    reference = None
    try:
        if domains.dynamic:
            reference = config.reference_loss or held_out_losses(model, domains, device).tolist()
            domains.reference = torch.tensor(reference, dtype=torch.float64)
        masks = ShearMasks(plan).to(device)
        settings = asdict(config) | {"checkpoint_dir": None}
        if teacher is None:
            del settings["distill"]  # as before distillation existed: older checkpoints still resume
        fingerprint = {"source": loaded.source, "config": settings}
        with MaskedForward(loaded, plan) as forward:
            extra = ShearTraining(masks, forward, config)
            prune_log = pretrain(model, domains, config.settings(config.steps, 0), device, extra,
                                 PRUNE_CHECKPOINT, fingerprint, "shear: learn masks")
        keep = masks.keep()
        apply_keep(loaded, plan, keep)
        continue_log = None
        if config.continue_steps:
            distill = Distillation(teacher, config.distill, loaded.spec) if teacher is not None else None
            continue_log = pretrain(model, domains, config.settings(config.continue_steps, 1), device, None,
                                    CONTINUE_CHECKPOINT, fingerprint, "shear: continue pretraining", distill)
    finally:
        model.to(home)
        model.requires_grad_(False)
    return ShearReport(
        config=config, plan=plan, kept={k: v.tolist() for k, v in keep.items()},
        params_before=params_before, params_after=non_embedding_params(loaded),
        prune_log=prune_log, continue_log=continue_log, reference_loss=reference,
        seconds=time.perf_counter() - clock, peak_memory_mb=peak_memory_mb(device), device=str(device),
    )
