"""The ``recover`` stage: LoRA recovery that keeps the sparsity (:func:`secateurs.recover`), LoRAPrune
(:func:`secateurs.loraprune`), iterative prune + fine-tune (:func:`secateurs.prune_iterative`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.config import CalibConfig
from ..engine.options import EngineOptions
from ..errors import UsageError
from ..files import check_writable
from ..recover.config import LoRAPruneConfig, RecoverConfig
from ..schema import group, option
from ..sparsity.config import PruneConfig
from ..sparsity.registry import method_names
from .base import Stage, StageConfig
from .flags import check_at_least, check_context
from .groups import Evaluation, LoadOptions, evaluation_after, model_argument, out_option

if TYPE_CHECKING:
    from ..model.load import LoadedModel

METHODS = ("lora", "loraprune", "iterative")


@dataclass
class RecoverRequest(StageConfig):
    """Recover quality after pruning with LoRA (sparsity kept exactly), or prune while tuning.

    One request for the three methods: ``train`` is how every one trains (``lr`` None: the method's
    paper's), ``loraprune`` what LoRAPrune prunes, ``iterative`` the one-shot method and ``calib`` its
    calibration (None unless ``method`` is iterative)."""

    model: str = model_argument("The pruned model: HF folder, hub id, .gguf file, or smollm2-135m.")
    out: str = out_option()
    method: str = option(
        "lora", "lora (recover a pruned model), loraprune (prune while tuning), iterative (prune + tune in rounds)."
    )
    lr: float | None = option(None, "Learning rate (default: 1e-4 as LLM-Pruner; loraprune 3e-4 as its code).")
    train: RecoverConfig = group(RecoverConfig, exclude=("lr", "weight_decay", "max_grad_norm", "mask_min_sparsity"))
    loraprune: LoRAPruneConfig = group(LoRAPruneConfig, exclude=("warmup", "initial_ratio", "ema"))
    iterative: PruneConfig = group(
        PruneConfig, rename={"method": "prune", "options": "option"},
        exclude=("allocation", "allocation_options", "reconstruct", "permute"),
        help={"method": f"iterative: one-shot method ({', '.join(method_names())}).",
              "sparsity": "iterative: final sparsity (default 0.5).",
              "pattern": "iterative: unstructured (N:M takes --rounds 1).",
              "options": "iterative: method option key=value."},
        defaults={"method": "wanda"},
    )
    rounds: int = option(4, "iterative: prune + recover rounds.")
    calib: CalibConfig | None = group(
        CalibConfig, rename={"source": "calib", "seq_len": "calib_seq_len"},
        help={"source": "iterative: calibration data for the one-shot method.",
              "n_samples": "iterative: calibration sequences.", "seq_len": "iterative: tokens per calibration sequence."},
    )
    engine: EngineOptions = group(EngineOptions, exclude=("batch_size", "offload_activations"))
    evaluation: Evaluation = evaluation_after(("before", "batch_size"), "Measure perplexity on these datasets before and after.")
    load: LoadOptions = group(LoadOptions)

    def __post_init__(self) -> None:
        """The method's training settings (its lr, checkpoints beside OUT) and every check that needs no model."""
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; use one of {', '.join(METHODS)}")
        evaluation = self.evaluation
        evaluation.before = True
        evaluation.check()
        train = self.train
        check_at_least(1, batch_size=train.batch_size, grad_accum=train.grad_accum, save_every=train.save_every,
                       rounds=self.rounds, prune_every=self.loraprune.prune_every)
        lr = self.lr or (LoRAPruneConfig.train_lr if self.method == "loraprune" else train.lr)
        # Training checkpoints beside OUT by default, removed once OUT is saved: a killed run resumes.
        checkpoint_dir = train.checkpoint_dir or f"{Path(self.out).expanduser().resolve()}.ckpt"
        self.train = replace(train, lr=lr, checkpoint_dir=checkpoint_dir)
        self.train.validate()
        self.engine.torch_device()
        if self.method == "loraprune":
            self.loraprune.validate()
        if self.method == "iterative" and self.calib is not None:
            self.calib.validate()
        else:
            self.calib = None

    @property
    def config(self) -> RecoverConfig | LoRAPruneConfig | PruneConfig:
        """What the method's verb takes besides the training settings (as recorded by the runner)."""
        return {"lora": self.train, "loraprune": self.loraprune, "iterative": self.iterative}[self.method]


class RecoverStage(Stage):
    name = "recover"
    config_class = RecoverRequest

    def check_files(self, request: RecoverRequest) -> None:
        from ..training.checkpoint import check_checkpoints
        from ..recover.lora import CHECKPOINT, checkpoint_files

        checkpoints = request.train.checkpoint_dir
        check_checkpoints(checkpoint_files(checkpoints))
        check_writable(Path(checkpoints).expanduser().resolve() / CHECKPOINT, f"--checkpoint-dir {checkpoints}")

    def check_model(self, request: RecoverRequest, skeleton: LoadedModel | None) -> None:
        method = request.method
        if skeleton is not None:
            calib_seq_len = request.calib.seq_len if method == "iterative" else None
            check_context(skeleton, seq_len=request.train.seq_len, calib_seq_len=calib_seq_len,
                          eval_seq_len=request.evaluation.seq_len if request.evaluation.datasets else None)
            if method == "loraprune":
                request.config.layers(skeleton.spec.num_layers(skeleton.model.config), moe=skeleton.spec.moe is not None,
                                      experts=request.train.experts)
        if method == "iterative":
            from ..api import check_prune

            check_prune(skeleton, request.config, request.calib)

    def head(self, request: RecoverRequest) -> list[list[str]]:
        return [["method", request.method]]

    def apply(self, loaded: LoadedModel, request: RecoverRequest) -> Any:
        from ..api import loraprune, prune_iterative, recover

        method, train = request.method, request.train
        if method == "lora":
            return recover(loaded, train, request.engine)
        if method == "loraprune":
            request.config.layers(loaded.spec.num_layers(loaded.model.config))
            return loraprune(loaded, request.config, train, request.engine)
        return prune_iterative(loaded, request.config, request.rounds, train, request.calib, request.engine)

    def rows(self, request: RecoverRequest, report: Any) -> list[list[str]]:
        if request.method == "iterative":
            rows = [[f"round {r['round']}", f"sparsity {r['achieved_sparsity']:.4f}, loss {r['recover_loss']['first']:.3f} → {r['recover_loss']['last']:.3f}"]
                    for r in report.rounds]
            rows += [["sparsity (mean)", f"{report.sparsity:.4f}"], ["tokens", f"{report.tokens:,}"]]
        else:
            first, last = report.loss_start_end()
            rows = [
                ["steps (resumed from)", f"{report.log.steps} ({report.log.resumed_from})"],
                ["tokens", f"{report.tokens:,}"],
                ["train loss first → last 10 steps", f"{first:.4f} → {last:.4f}"],
                ["sparsity before → after", f"{report.sparsity_before:.4f} → {report.sparsity_after:.4f}"],
                ["masked linears (zeros kept exactly)", f"{report.masked_linears} ({'yes' if report.zeros_kept else 'NO'})"],
            ]
            params = report.extra.get("params")  # LoRAPrune's
            if params:
                rows.append(["parameters", f"{params['before']:,} → {params['after']:,}"])
        return rows + [["time (s)", f"{report.seconds:.1f}"]]

    def finish(self, request: RecoverRequest) -> None:
        from ..recover.lora import remove_checkpoints

        remove_checkpoints(request.train.checkpoint_dir)

    def title(self, request: RecoverRequest) -> str:
        return f"secateurs recover ({request.engine.torch_device()})"
