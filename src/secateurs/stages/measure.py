"""The measuring stages: ``eval`` (perplexity and zero-shot accuracy) and ``bench`` (speed and
memory). They read a model and write only their results (``--json``), never a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.sources import check_available
from ..errors import UsageError
from ..evaluate.tasks import PAPER_TASKS
from ..files import write_atomic
from ..evaluate.config import SpeedConfig
from ..schema import group, option
from .base import Outcome, Stage, StageConfig, Table
from .flags import check_at_least, check_context, check_json_out
from .groups import Evaluation, LoadOptions, csv_list

if TYPE_CHECKING:
    from ..evaluate.zeroshot import ZeroShot
    from ..model.load import LoadedModel


def _given_list(text: str | None) -> list[str] | None:
    """A comma-separated flag as a list; None when the flag was not given (so a default can apply)."""
    return None if text is None else csv_list(text)


@dataclass
class EvalRequest(StageConfig):
    """Measure perplexity (non-overlapping windows over the joined test split) and zero-shot accuracy."""

    model: str = option(help="HF folder (e.g. a secateurs OUT), hub id, .gguf file, or smollm2-135m.", argument=True)
    ppl: list[str] | None = option(
        None, "Datasets, comma-separated: wikitext2, ptb, c4, or .txt/.jsonl paths. Default wikitext2, none with --tasks.",
        parse=_given_list,
    )
    tasks: list[str] | None = option(
        None, f"Zero-shot lm-eval tasks, comma-separated, e.g. {','.join(PAPER_TASKS)}.", parse=_given_list
    )
    limit: int | None = option(None, "Score only the first N documents of each zero-shot task.")
    evaluation: Evaluation = group(
        Evaluation, exclude=("datasets", "before"), help={"seq_len": "Window length (papers use 2048 or the model's context)."}
    )
    load: LoadOptions = group(LoadOptions, exclude=("overwrite",))
    json_out: str | None = option(None, "Also write the results to this JSON file.", decls=("--json",))

    def __post_init__(self) -> None:
        """The datasets (wikitext2 unless only tasks were asked for) and every check that needs no model."""
        from ..evaluate.zeroshot import check_tasks

        if self.tasks is not None and not self.tasks:
            raise UsageError(f"--tasks needs at least one task, e.g. --tasks {','.join(PAPER_TASKS)}")
        if self.ppl is not None and not self.ppl:
            raise UsageError("--ppl needs at least one dataset, e.g. --ppl wikitext2")
        evaluation = self.evaluation
        evaluation.datasets = self.ppl if self.ppl is not None else [] if self.tasks else ["wikitext2"]
        evaluation.check("--seq-len")
        check_at_least(1, batch_size=evaluation.batch_size)
        if self.tasks:
            check_tasks(self.tasks, self.limit)
        check_json_out(self.json_out)


class EvalStage(Stage):
    name = "eval"
    produces_model = False
    config_class = EvalRequest

    def check_model(self, request: EvalRequest, skeleton: LoadedModel | None) -> None:
        """The context fits, and every dataset can be read (a local copy, or the hub reachable), so
        an offline ``--ppl c4`` is one error before the model loads rather than a note after it."""
        evaluation = request.evaluation
        check_context(skeleton, seq_len=evaluation.seq_len if evaluation.datasets else None)
        for name in evaluation.datasets:
            check_available(name, "test", evaluation.data_dir)

    def needs_text(self, request: EvalRequest) -> bool:
        return True  # perplexity and zero-shot tasks both read text

    def execute(self, request: EvalRequest) -> Outcome:
        """Perplexity and zero-shot scores, shown as tables and written to ``--json``."""
        from ..api import evaluate_perplexity
        from ..evaluate.zeroshot import zero_shot
        from ..model.save import write_output_file

        ev, model = request.evaluation, request.model
        loaded = self.load(request)
        results = evaluate_perplexity(loaded, ev.datasets, ev.seq_len, ev.limit_windows, ev.data_dir, ev.device, ev.batch_size)
        scores = zero_shot(loaded, request.tasks, request.limit, ev.data_dir, ev.device, ev.batch_size) if request.tasks else None
        tables, notes, rows = [], [], []
        for name, value in results.items():
            if isinstance(value, str):
                notes.append(f"[yellow]{name}:[/] {value}")
                rows.append([name, "unavailable", "", ""])
            else:
                rows.append([name, f"{value.ppl:.3f}", str(value.windows), str(value.seq_len)])
        if rows:
            tables.append(Table(f"perplexity of {model}", ["dataset", "ppl", "windows", "seq_len"], rows, notes))
        if scores is not None:
            tables.append(_zero_shot_table(model, scores))
        json_out = request.json_out
        if json_out:
            payload = {k: (v if isinstance(v, str) else v.to_dict()) for k, v in results.items()}
            document = {"model": model, "perplexity": payload}
            if scores is not None:
                document["zeroshot"] = scores.to_dict()
            write_output_file(json_out, json.dumps(document, indent=2) + "\n", "--json")
        failed = all(isinstance(v, str) for v in results.values()) and (scores is None or not scores.results)
        return Outcome(tables, failed=failed)


def _zero_shot_table(model: str, scores: ZeroShot) -> Table:
    notes = [f"[yellow]{reason}[/]" for reason in scores.unavailable.values()]
    rows = [[name, f"{r.acc:.4f}", "" if r.acc_norm is None else f"{r.acc_norm:.4f}", str(r.samples), r.source]
            for name, r in scores.results.items()]
    rows += [[name, "unavailable", "", "", ""] for name in scores.unavailable]
    if scores.mean_acc is not None:
        rows.append(["mean", f"{scores.mean_acc:.4f}", "", "", ""])
    title = f"zero-shot accuracy of {model} (lm-eval {scores.lm_eval_version}" + (
        f", first {scores.limit} documents)" if scores.limit else ")")
    return Table(title, ["task", "acc", "acc_norm", "n", "data"], rows, notes)


@dataclass
class BenchRequest(StageConfig):
    """Measure speed and memory: dense vs pruned vs pruned-on-sparse-kernels, as ratios to the first.
    Sparse layers keep no run-time copy of their weights by default (SECATEURS_SPARSE_COPIES=none: the stored
    format only); SECATEURS_SPARSE_COPIES=sparse lets them keep cuSPARSELt copies and =dense dense or cuSPARSELt
    copies where those are faster (memory for speed, counted in run-time copies and peak memory)."""

    model: str = option(help="The (pruned) model: HF folder, sparse export, hub id, .gguf, or smollm2-135m.", argument=True)
    baseline: str | None = option(None, "Dense model to compare against, measured in the same run.")
    sparse: bool = option(True, "Also run MODEL with its pruned linears swapped for sparse kernels (2:4 / 4:8 / 8:16 / banded / bitmap).")
    min_sparsity: float = option(0.5, "Unstructured linears below this sparsity stay dense.")
    evaluation: Evaluation = group(
        Evaluation, exclude=("datasets", "seq_len", "limit_windows", "data_dir", "batch_size", "before")
    )
    load: LoadOptions = group(
        LoadOptions, exclude=("trust_remote_code", "overwrite"), defaults={"dtype": "auto"},
        help={"dtype": "auto (float16 on CUDA, float32 on CPU), float32, bfloat16 or float16."},
    )
    config: SpeedConfig = group(SpeedConfig, rename={"decode_batches": "batches"}, exclude=("decode_prompt",))
    json_out: str | None = option(None, "Also write every number to this JSON file.", decls=("--json",))

    def __post_init__(self) -> None:
        self.config.check()
        check_json_out(self.json_out)


class BenchStage(Stage):
    name = "bench"
    produces_model = False
    reads_shapes = False
    config_class = BenchRequest

    def execute(self, request: BenchRequest) -> Outcome:
        """The models side by side in one run, as ratios to the first; every number written to ``--json``."""
        import torch

        from ..api import bench

        config = request.config
        report = bench(request.model, request.baseline, sparse=request.sparse, min_sparsity=request.min_sparsity,
                       device=request.evaluation.device, dtype=request.dtype, config=config)
        results = report["results"]
        first = results[0]
        columns = ["", *[r["label"] for r in results], *[f"{r['label']} / {first['label']}" for r in results[1:]]]
        rows: list[list[str]] = []

        def add(name: str, values: list, ratio_values: list, fmt: str = "{:.1f}") -> None:
            cells = [fmt.format(v) if v is not None else "n/a" for v in values]
            rows.append([name, *cells, *[f"{v:.2f}x" if v is not None else "n/a" for v in ratio_values]])

        for length in config.prompt_lengths:
            add(f"prefill {length} tok (ms)", [r["prefill_ms"][length] for r in results],
                [first["prefill_ms"][length] / r["prefill_ms"][length] for r in results[1:]])
        for length in config.prompt_lengths:
            add(f"time to first token {length} (ms)", [r["ttft_ms"][length] for r in results],
                [first["ttft_ms"][length] / r["ttft_ms"][length] for r in results[1:]])
        for batch in config.decode_batches:
            add(f"decode batch {batch} (tok/s)", [r["decode_tokens_per_s"][batch] for r in results],
                [r["decode_tokens_per_s"][batch] / first["decode_tokens_per_s"][batch] for r in results[1:]])
        for key, name in (("weight_mib", "weights stored (MiB)"), ("extra_mib", "run-time copies (MiB)"),
                          ("peak_mib", "peak memory (MiB)"), ("checkpoint_mib", "checkpoint (MiB)")):
            values = [r[key] for r in results]
            add(name, values, [v / first[key] if v is not None and first[key] else None for v in values[1:]], "{:.0f}")
        modes = "; ".join(f"{r['label']}: {r['decode_mode']}" for r in results)
        title = f"secateurs bench on {report['device']} ({report['dtype']}; decode by {modes})"
        notes = [f"[yellow]note:[/] {note}" for note in report["notes"]]
        footer = []
        json_out = request.json_out
        if json_out:
            write_atomic(Path(json_out), json.dumps(report, indent=2, default=str) + "\n")
            footer.append(f"saved {json_out}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Outcome([Table(title, columns, rows, notes)], footer=footer)
