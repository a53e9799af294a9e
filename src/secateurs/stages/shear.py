"""The ``shear`` stage: targeted structured pruning to a chosen shape (:func:`secateurs.shear`,
LLM-Shearing), then continued pretraining with dynamic batch loading."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from ..data.sources import check_name
from ..errors import UsageError
from ..files import check_writable
from .base import Evaluation, Request, Stage
from .flags import (
    DataDir,
    Device,
    Dtype,
    EvalSeqLen,
    Help,
    LimitWindows,
    Model,
    Out,
    Overwrite,
    TrustRemoteCode,
    check_context,
    check_eval_flags,
    csv_list,
    parse_floats,
)

if TYPE_CHECKING:
    from ..model.load import LoadedModel
    from ..structured.shearing import ShearReport


class ShearStage(Stage):
    name = "shear"

    def parse(
        self,
        model: Model,
        out: Out,
        target: Annotated[
            str | None, Help("Target shape, e.g. layers=24,hidden=528,heads=6,kv_heads=2,intermediate=1344.")
        ] = None,
        target_config: Annotated[
            str | None, Help("JSON file with the target sizes (our keys or a transformers config's).")
        ] = None,
        steps: Annotated[int, Help("Mask-learning steps (the paper: 3,200).")] = 100,
        continue_steps: Annotated[int, Help("Continued-pretraining steps of the sheared model.")] = 0,
        data: Annotated[
            str, Help("Training domains, comma-separated: wikitext2, ptb, c4, or .txt/.jsonl paths.")
        ] = "wikitext2",
        domain_weights: Annotated[str | None, Help("Initial domain weights (default: equal).")] = None,
        reference_loss: Annotated[
            str | None, Help("Reference loss per domain (default: the source model's held-out loss).")
        ] = None,
        update_every: Annotated[int, Help("Steps between domain-weight updates (the paper: 50).")] = 50,
        eval_windows: Annotated[int, Help("Held-out windows per domain for those updates.")] = 4,
        batch_size: Annotated[int, Help("Sequences per step.")] = 4,
        seq_len: Annotated[int, Help("Tokens per training sequence.")] = 512,
        lr: Annotated[float, Help("Model learning rate (the paper: 1e-4).")] = 1e-4,
        mask_lr: Annotated[float, Help("Learning rate of masks and multipliers (the paper: 1.0).")] = 1.0,
        lagrangian_warmup: Annotated[
            float, Help("Fraction of --steps over which the target ramps in (the paper: 0.2).")
        ] = 0.2,
        bf16: Annotated[bool, Help("Train under bfloat16 autocast.")] = False,
        gradient_checkpointing: Annotated[bool, Help("Recompute activations in backward to save memory.")] = False,
        checkpoint_dir: Annotated[
            str | None, Help("Save resumable checkpoints here; a matching one is resumed from.")
        ] = None,
        checkpoint_every: Annotated[int, Help("Steps between checkpoints.")] = 100,
        seed: Annotated[int, Help("Seed for batches and mask sampling.")] = 0,
        data_dir: DataDir = None,
        ppl: Annotated[str | None, Help("After shearing, measure perplexity on these datasets.")] = None,
        limit_windows: LimitWindows = None,
        eval_seq_len: EvalSeqLen = 2048,
        device: Device = "auto",
        dtype: Dtype = "float32",
        overwrite: Overwrite = False,
        trust_remote_code: TrustRemoteCode = False,
    ) -> Request:
        """Prune to a chosen architecture with learned L0 masks; save a plain, smaller transformers model."""
        from ..engine.sequential import EngineOptions
        from ..structured.shearing import ShearConfig, ShearTarget

        if (target is None) == (target_config is None):
            raise UsageError("give exactly one of --target layers=...,hidden=... or --target-config FILE.json")
        shape = ShearTarget.parse(target) if target is not None else ShearTarget.from_json(target_config)
        domains = csv_list(data)
        for name in domains:
            check_name(name)
        config = ShearConfig(
            target=shape, datasets=domains, steps=steps, continue_steps=continue_steps, lr=lr, mask_lr=mask_lr,
            lagrangian_warmup=lagrangian_warmup, batch_size=batch_size, seq_len=seq_len, update_every=update_every,
            eval_windows=eval_windows, reference_loss=parse_floats(reference_loss, "--reference-loss"),
            domain_weights=parse_floats(domain_weights, "--domain-weights"), bf16=bf16,
            gradient_checkpointing=gradient_checkpointing, seed=seed, data_dir=data_dir,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
        )
        config.validate()
        engine = EngineOptions(device=device)
        engine.torch_device()
        datasets = csv_list(ppl)
        check_eval_flags(datasets, limit_windows, eval_seq_len)
        return Request(self, model, config, out, None, engine,
                       Evaluation(datasets, eval_seq_len, limit_windows, data_dir, device),
                       dtype, overwrite, trust_remote_code)

    def check_files(self, request: Request) -> None:
        from ..training.checkpoint import check_checkpoints
        from ..structured.shearing import CONTINUE_CHECKPOINT, PRUNE_CHECKPOINT

        checkpoint_dir = request.config.checkpoint_dir
        if checkpoint_dir:
            folder = Path(checkpoint_dir).expanduser()
            check_checkpoints([folder / PRUNE_CHECKPOINT, folder / CONTINUE_CHECKPOINT])
            check_writable(folder.resolve() / PRUNE_CHECKPOINT, f"--checkpoint-dir {checkpoint_dir}")

    def check_model(self, request: Request, skeleton: LoadedModel | None) -> None:
        check_context(skeleton, seq_len=request.config.seq_len,
                      eval_seq_len=request.evaluation.seq_len if request.evaluation.datasets else None)

    def apply(self, loaded: LoadedModel, request: Request) -> ShearReport:
        from ..api import shear

        return shear(loaded, request.config, request.engine)

    def rows(self, request: Request, report: ShearReport) -> list[list[str]]:
        plan = report.plan
        weights = (report.continue_log or report.prune_log).domain_weights[-1]
        return [
            *[[label, f"{plan.source[kind]} → {plan.target[kind]}"] for kind, label in
              (("layers", "layers"), ("hidden", "hidden"), ("heads", "KV heads"), ("channels", "intermediate"))],
            ["query heads", f"{plan.source['heads'] * plan.per_group} → {plan.target['heads'] * plan.per_group}"],
            ["block parameters", f"{report.params_before:,} → {report.params_after:,} ({report.params_after / report.params_before:.1%})"],
            ["tokens (mask learning + continued)", f"{report.prune_log.tokens:,} + {report.continue_log.tokens if report.continue_log else 0:,}"],
            ["final domain weights", ", ".join(f"{n}={w:.3f}" for n, w in zip(request.config.datasets, weights))],
            ["time (s)", f"{report.seconds:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]
