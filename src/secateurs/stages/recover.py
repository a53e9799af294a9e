"""The ``recover`` stage: LoRA recovery that keeps the sparsity (:func:`secateurs.recover`), LoRAPrune
(:func:`secateurs.loraprune`), iterative prune + fine-tune (:func:`secateurs.prune_iterative`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from ..errors import UsageError
from ..files import check_writable
from ..recover.config import LORAPRUNE_MODES, PRECISIONS, RecoverConfig
from ..sparsity.registry import method_names
from .base import Evaluation, Request, Stage
from .flags import (
    DataDir,
    Device,
    Dtype,
    EvalSeqLen,
    Help,
    LimitWindows,
    Out,
    Overwrite,
    TrustRemoteCode,
    check_at_least,
    check_context,
    check_eval_flags,
    csv_list,
    parse_options,
    parse_sparsity,
)

if TYPE_CHECKING:
    from ..model.load import LoadedModel

METHODS = ("lora", "loraprune", "iterative")


class RecoverStage(Stage):
    name = "recover"

    def parse(
        self,
        model: Annotated[str, Help("The pruned model: HF folder, hub id, .gguf file, or smollm2-135m.", argument=True)],
        out: Out,
        method: Annotated[str, Help("lora (recover a pruned model), loraprune (prune while tuning), iterative (prune + tune in rounds).")] = "lora",
        steps: Annotated[int, Help("Optimizer steps (per round for iterative).")] = 200,
        rank: Annotated[int, Help("LoRA rank (LLM-Pruner: 8).")] = 8,
        alpha: Annotated[float, Help("LoRA alpha (LLM-Pruner: 16).")] = 16.0,
        dropout: Annotated[float, Help("LoRA dropout (LLM-Pruner: 0.05).")] = 0.05,
        lr: Annotated[float | None, Help("Learning rate (default: 1e-4 as LLM-Pruner; loraprune 3e-4 as its code).")] = None,
        warmup_steps: Annotated[int | None, Help("Linear warm-up steps (default min(100, steps/10)).")] = None,
        batch_size: Annotated[int, Help("Sequences per micro-batch.")] = 4,
        grad_accum: Annotated[int, Help("Micro-batches per optimizer step.")] = 1,
        seq_len: Annotated[int, Help("Tokens per training sequence (LLM-Pruner: 256).")] = 256,
        data: Annotated[str, Help("Training text: wikitext2, c4, ptb (train split) or a .txt/.jsonl path.")] = "wikitext2",
        data_dir: DataDir = None,
        seed: Annotated[int, Help("Seed for batches, dropout and adapter init.")] = 0,
        precision: Annotated[str, Help(f"{', '.join(PRECISIONS)} (auto: bf16 autocast on CUDA, fp32 on CPU).")] = "auto",
        gradient_checkpointing: Annotated[bool, Help("Recompute activations in the backward pass (less memory).")] = True,
        checkpoint_dir: Annotated[str | None, Help("Where to checkpoint (default OUT.ckpt); a matching checkpoint there is resumed.")] = None,
        save_every: Annotated[int, Help("Checkpoint every N steps.")] = 50,
        ratio: Annotated[float, Help("loraprune: fraction of groups (or weights, --target unstructured) removed per layer.")] = 0.2,
        target: Annotated[str, Help(f"loraprune: {', '.join(LORAPRUNE_MODES)}.")] = "both",
        keep_first: Annotated[int | None, Help("loraprune: leave the first N layers whole (default 10% of layers).")] = None,
        keep_last: Annotated[int | None, Help("loraprune: leave the last N layers whole (default 1).")] = None,
        prune_every: Annotated[int, Help("loraprune: prune every N steps (paper code: 10).")] = 10,
        cooldown: Annotated[float, Help(
            "loraprune: fraction of the steps tuned at the final shape after the schedule ends "
            "(0.1; 0.5 recovered better at 300 steps on SmolLM2, see BENCHMARKS.md).")] = 0.1,
        prune: Annotated[str, Help(f"iterative: one-shot method ({', '.join(method_names())}).")] = "wanda",
        sparsity: Annotated[str | None, Help("iterative: final sparsity (default 0.5).")] = None,
        pattern: Annotated[str, Help("iterative: unstructured (N:M takes --rounds 1).")] = "unstructured",
        rounds: Annotated[int, Help("iterative: prune + recover rounds.")] = 4,
        option: Annotated[list[str] | None, Help("iterative: method option key=value.", ("--option", "-o"))] = None,
        calib: Annotated[str, Help("iterative: calibration data for the one-shot method.")] = "wikitext2",
        n_samples: Annotated[int, Help("iterative: calibration sequences.")] = 128,
        calib_seq_len: Annotated[int, Help("iterative: tokens per calibration sequence.")] = 2048,
        ppl: Annotated[str | None, Help("Measure perplexity on these datasets before and after.")] = None,
        limit_windows: LimitWindows = None,
        eval_seq_len: EvalSeqLen = 2048,
        device: Device = "auto",
        dtype: Dtype = "float32",
        overwrite: Overwrite = False,
        trust_remote_code: TrustRemoteCode = False,
    ) -> Request:
        """Recover quality after pruning with LoRA (sparsity kept exactly), or prune while tuning."""
        from ..api import PruneConfig
        from ..data.calib import CalibConfig
        from ..engine.sequential import EngineOptions
        from ..recover.loraprune import LoRAPruneConfig

        if method not in METHODS:
            raise UsageError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
        datasets = csv_list(ppl)
        check_eval_flags(datasets, limit_windows, eval_seq_len)
        check_at_least(1, batch_size=batch_size, grad_accum=grad_accum, save_every=save_every, rounds=rounds, prune_every=prune_every)
        lp_config = LoRAPruneConfig(ratio, target, keep_first, keep_last, prune_every, cooldown=cooldown)
        fields: dict[str, Any] = {
            "steps": steps, "rank": rank, "alpha": alpha, "dropout": dropout, "warmup_steps": warmup_steps,
            "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len, "data": data, "data_dir": data_dir,
            "seed": seed, "precision": precision, "gradient_checkpointing": gradient_checkpointing, "save_every": save_every,
            # Training checkpoints beside OUT by default, removed once OUT is saved: a killed run resumes.
            "checkpoint_dir": checkpoint_dir or f"{Path(out).expanduser().resolve()}.ckpt",
        }
        if lr:
            fields["lr"] = lr
        train = lp_config.train_config(**fields) if method == "loraprune" else RecoverConfig(**fields)
        train.validate()
        engine = EngineOptions(device=device)
        engine.torch_device()
        iterative_config = PruneConfig(prune, parse_sparsity(sparsity), pattern, parse_options(option))
        if method == "loraprune":
            lp_config.validate()
        calib_config = None
        if method == "iterative":
            calib_config = CalibConfig(calib, n_samples, calib_seq_len, seed, data_dir)
            calib_config.validate()
        config = {"lora": train, "loraprune": lp_config, "iterative": iterative_config}[method]
        return Request(self, model, config, out, calib_config, engine,
                       Evaluation(datasets, eval_seq_len, limit_windows, data_dir, device, before=True),
                       dtype, overwrite, trust_remote_code, {"method": method, "train": train, "rounds": rounds})

    def check_files(self, request: Request) -> None:
        from ..training.checkpoint import check_checkpoints
        from ..recover.lora import CHECKPOINT, checkpoint_files

        checkpoints = request.options["train"].checkpoint_dir
        check_checkpoints(checkpoint_files(checkpoints))
        check_writable(Path(checkpoints).expanduser().resolve() / CHECKPOINT, f"--checkpoint-dir {checkpoints}")

    def check_model(self, request: Request, skeleton: LoadedModel | None) -> None:
        method = request.options["method"]
        if skeleton is not None:
            calib_seq_len = request.calib.seq_len if method == "iterative" else None
            check_context(skeleton, seq_len=request.options["train"].seq_len, calib_seq_len=calib_seq_len,
                          eval_seq_len=request.evaluation.seq_len if request.evaluation.datasets else None)
            if method == "loraprune":
                request.config.layers(skeleton.spec.num_layers(skeleton.model.config))
        if method == "iterative":
            from ..api import check_prune

            check_prune(skeleton, request.config, request.calib)

    def head(self, request: Request) -> list[list[str]]:
        return [["method", request.options["method"]]]

    def apply(self, loaded: LoadedModel, request: Request) -> Any:
        from ..api import loraprune, prune_iterative, recover

        method, train = request.options["method"], request.options["train"]
        if method == "lora":
            return recover(loaded, train, request.engine)
        if method == "loraprune":
            request.config.layers(loaded.spec.num_layers(loaded.model.config))
            return loraprune(loaded, request.config, train, request.engine)
        return prune_iterative(loaded, request.config, request.options["rounds"], train, request.calib, request.engine)

    def rows(self, request: Request, report: Any) -> list[list[str]]:
        record = report.stage_record()
        if request.options["method"] == "iterative":
            rows = [[f"round {r['round']}", f"sparsity {r['achieved_sparsity']:.4f}, loss {r['recover_loss']['first']:.3f} → {r['recover_loss']['last']:.3f}"]
                    for r in record["rounds"]]
            rows += [["sparsity (mean)", f"{record['achieved_sparsity']:.4f}"], ["tokens", f"{report.tokens:,}"]]
        else:
            first, last = report.loss_start_end()
            rows = [
                ["steps (resumed from)", f"{report.log.steps} ({report.log.resumed_from})"],
                ["tokens", f"{report.tokens:,}"],
                ["train loss first → last 10 steps", f"{first:.4f} → {last:.4f}"],
                ["sparsity before → after", f"{report.sparsity_before:.4f} → {report.sparsity_after:.4f}"],
                ["masked linears (zeros kept exactly)", f"{report.masked_linears} ({'yes' if report.zeros_kept else 'NO'})"],
            ]
            if "params" in record:
                rows.append(["parameters", f"{record['params']['before']:,} → {record['params']['after']:,}"])
        return rows + [["time (s)", f"{report.seconds:.1f}"]]

    def finish(self, request: Request) -> None:
        from ..recover.lora import remove_checkpoints

        remove_checkpoints(request.options["train"].checkpoint_dir)

    def title(self, request: Request) -> str:
        return f"secateurs recover ({request.engine.torch_device()})"
