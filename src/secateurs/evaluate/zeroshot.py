"""Zero-shot accuracy through lm-evaluation-harness, with the papers' tasks readable offline.

Pruning papers (SparseGPT, Wanda, LLM-Pruner, SliceGPT) judge a method by zero-shot accuracy on
BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy, ARC-challenge and OpenBookQA as scored by
``lm-eval`` (``acc`` and, where the task defines it, ``acc_norm``). To match what everyone reports,
the scoring is lm-eval's own, used as a library: its task configs (prompt templates, choices,
target, ``process_docs``, metrics) and its ``HFLM`` wrapper around our already-loaded model.

The only thing we replace is where a task's documents come from. Dataset hubs are often
unreachable, so when ``--data-dir`` / ``$SECATEURS_DATA`` holds a local copy of a task's split
(laid out as the project's shared data folder, see its PROVENANCE.md) we convert those files to the
exact schema of the hub dataset the task config reads and hand them to lm-eval through the config's
``custom_dataset`` hook. Everything downstream (prompts, metrics, ``--limit`` = first N documents)
is untouched lm-eval. A task with no local copy falls back to lm-eval's hub download; if that
fails, that task maps to the reason and the other tasks still run.
"""

from __future__ import annotations

import bz2
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..data.sources import data_dir_from
from ..errors import UsageError
from ..model.load import LoadedModel
from ..progress import track

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
"""The seven zero-shot tasks of the pruning papers (e.g. Wanda Table 2, LLM-Pruner Table 1)."""


@dataclass(frozen=True)
class TaskResult:
    """One task's scores; ``acc_norm`` is None for tasks that define only ``acc`` (BoolQ, WinoGrande)."""

    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    samples: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ZeroShot:
    """Scores of every task that ran, and for each task that could not run, the reason."""

    results: dict[str, TaskResult]
    unavailable: dict[str, str]
    limit: int | None
    lm_eval_version: str

    @property
    def mean_acc(self) -> float | None:
        """Mean ``acc`` over the tasks that ran (the papers' "average" column uses one metric per task)."""
        if not self.results:
            return None
        return sum(r.acc for r in self.results.values()) / len(self.results)

    def to_dict(self) -> dict:
        return {
            "tasks": {name: r.to_dict() for name, r in self.results.items()},
            "unavailable": dict(self.unavailable),
            "mean_acc": self.mean_acc,
            "limit": self.limit,
            "lm_eval": self.lm_eval_version,
        }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lines(path: Path) -> list[str]:
    raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    return raw.decode("utf-8").replace("\r\n", "\n").split("\n")


def _piqa(folder: Path) -> list[dict]:
    """``baber/piqa`` validation: goal, sol1, sol2 and an int label (labels live in a second file)."""
    docs = _jsonl(folder / "piqa/valid.jsonl")
    labels = [int(line) for line in _lines(folder / "piqa/valid-labels.lst") if line.strip()]
    if len(labels) != len(docs):
        raise UsageError(f"piqa: {len(docs)} questions but {len(labels)} labels; restore the files from PROVENANCE.md")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels)]


_SENTENCE_END = re.compile(r"[.!?][\"')]*\s")
HELLASWAG_ACTIVITYNET_ITEMS = 3243
"""Validation items 0-3242 come from ActivityNet (ctx_b is a phrase), the rest from WikiHow (ctx_b empty)."""


def _hellaswag(folder: Path) -> list[dict]:
    """``Rowan/hellaswag`` validation rebuilt from the 6-lines-per-item text copy.

    The copy keeps ``ctx = ctx_a + " " + ctx_b`` whole, but lm-eval's query capitalises ``ctx_b``,
    so the split matters: for ActivityNet items ctx_b is the unfinished phrase after the last
    sentence end; WikiHow items have an empty ctx_b. lm-eval's own ``process_docs`` then builds the
    query and cleans the text. The copy was already cleaned of the WikiHow ``[title]``-style tags;
    cleaning again changes nothing except bracketed text the copy kept (18 items), which lm-eval
    removes just as it would from the hub text.
    """
    lines = _lines(folder / "hellaswag/hellaswag_val_full.txt.bz2")
    if lines and not lines[-1]:
        lines = lines[:-1]
    if len(lines) % 6:
        raise UsageError("hellaswag: the text copy is not 6 lines per item; restore it from PROVENANCE.md")
    docs = []
    for index in range(len(lines) // 6):
        head, gold, *endings = lines[6 * index: 6 * index + 6]
        activity_label, _, ctx = head.partition(": ")
        ctx_a, ctx_b = ctx, ""
        if index < HELLASWAG_ACTIVITYNET_ITEMS:
            ends = list(_SENTENCE_END.finditer(ctx))
            if ends:
                ctx_a, ctx_b = ctx[: ends[-1].end()].rstrip(), ctx[ends[-1].end():]
        docs.append({"ind": index, "activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                     "endings": endings, "label": gold.strip()})
    return docs


def _boolq(folder: Path) -> list[dict]:
    """``super_glue/boolq`` validation: the same pairs with ``label = int(answer)``."""
    return [{"question": d["question"], "passage": d["passage"], "idx": i, "label": int(d["answer"])}
            for i, d in enumerate(_jsonl(folder / "boolq/dev.jsonl"))]


def _winogrande(folder: Path) -> list[dict]:
    """``winogrande_xl`` validation = the WinoGrande 1.1 dev file, field for field."""
    return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")}
            for d in _jsonl(folder / "winogrande/dev.jsonl")]


def _choices(question: dict) -> dict[str, list[str]]:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def _arc(relpath: str) -> Callable[[Path], list[dict]]:
    """``allenai/ai2_arc`` test (built from these files): question stem, choices as parallel lists."""

    def read(folder: Path) -> list[dict]:
        return [{"id": d["id"], "question": d["question"]["stem"], "choices": _choices(d["question"]),
                 "answerKey": d["answerKey"]} for d in _jsonl(folder / relpath)]

    return read


def _openbookqa(folder: Path) -> list[dict]:
    """``allenai/openbookqa`` main test: ``question_stem`` flattened, choices as parallel lists."""
    return [{"id": d["id"], "question_stem": d["question"]["stem"], "choices": _choices(d["question"]),
             "answerKey": d["answerKey"]} for d in _jsonl(folder / "openbookqa/test.jsonl")]


@dataclass(frozen=True)
class LocalTask:
    """Where a task's scored split lies under the data folder, and how to read it into hub schema."""

    files: tuple[str, ...]
    split: str
    read: Callable[[Path], list[dict]]
    config: str
    """lm-eval's own config of the task, relative to ``lm_eval/tasks`` (read there, never copied)."""


LOCAL_TASKS: dict[str, LocalTask] = {
    "boolq": LocalTask(("boolq/dev.jsonl",), "validation", _boolq, "super_glue/boolq/default.yaml"),
    "piqa": LocalTask(("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", _piqa, "piqa/piqa.yaml"),
    "hellaswag": LocalTask(("hellaswag/hellaswag_val_full.txt.bz2",), "validation", _hellaswag,
                           "hellaswag/hellaswag.yaml"),
    "winogrande": LocalTask(("winogrande/dev.jsonl",), "validation", _winogrande, "winogrande/default.yaml"),
    "arc_easy": LocalTask(("arc/ARC-Easy-Test.jsonl",), "test", _arc("arc/ARC-Easy-Test.jsonl"), "arc/arc_easy.yaml"),
    "arc_challenge": LocalTask(("arc/ARC-Challenge-Test.jsonl",), "test", _arc("arc/ARC-Challenge-Test.jsonl"),
                               "arc/arc_challenge.yaml"),
    "openbookqa": LocalTask(("openbookqa/test.jsonl",), "test", _openbookqa, "openbookqa/openbookqa.yaml"),
}


def local_docs(task: str, data_dir: str | Path | None = None) -> list[dict] | None:
    """The documents of ``task``'s scored split from the local data folder, or None if not there."""
    folder = data_dir_from(data_dir)
    local = LOCAL_TASKS.get(task)
    if folder is None or local is None or not all((folder / f).is_file() for f in local.files):
        return None
    return local.read(folder)


class _LocalDataset:
    """lm-eval's ``custom_dataset`` hook: returns ``{split: Dataset}`` (lm-eval passes metadata kwargs)."""

    def __init__(self, split: str, docs: list[dict]) -> None:
        self.split, self.docs = split, docs

    def __call__(self, **_: Any) -> dict:
        import datasets

        return {self.split: datasets.Dataset.from_list(self.docs)}


def lm_eval_version() -> str:
    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "not installed"


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise UsageError("zero-shot tasks need lm-eval: pip install 'secateurs[eval]' (or pip install lm-eval)") from exc


def _paper_task(name: str, docs: list[dict] | None) -> Any:
    """lm-eval's task ``name`` from its own YAML config; with ``docs``, served from them, not the hub.

    Reading the one config directly (rather than indexing all of lm-eval's tasks) keeps this fast.
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    local = LOCAL_TASKS[name]
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / local.config, resolve_func=True)
    if config.get("task") != name:
        raise UsageError(f"lm-eval {lm_eval_version()} has no task {name} at {local.config}; install lm-eval 0.4.x")
    if docs is not None:
        # Only the scored split exists locally; naming the others would make lm-eval look them up.
        for key in ("training_split", "validation_split", "test_split"):
            config[key] = local.split if key.startswith(local.split) else None
        config.pop("fewshot_split", None)
        config["custom_dataset"] = _LocalDataset(local.split, docs)
    return TaskManager(include_defaults=False).load(config)["tasks"][name]


def _why(task: str, data_dir: str | Path | None, exc: BaseException) -> str:
    folder = data_dir_from(data_dir)
    local = LOCAL_TASKS.get(task)
    where = ("no local copy (pass --data-dir or set SECATEURS_DATA)" if folder is None and local
             else f"no local copy ({', '.join(str(folder / f) for f in local.files)} not found)" if local
             else "no offline copy is known for it")
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return f"{task} is unavailable: {where} and lm-eval could not load it ({reason})"


def check_tasks(tasks: list[str], limit: int | None = None) -> None:
    """Before the model loads: lm-eval is installed, ``limit`` is positive and every task name exists."""
    _require_lm_eval()
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    unknown = [name for name in tasks if name not in LOCAL_TASKS]
    if unknown:
        from lm_eval.tasks import TaskManager

        known = TaskManager().all_tasks
        for name in unknown:
            if name not in known:
                raise UsageError(f"unknown lm-eval task {name!r}; e.g. --tasks {','.join(PAPER_TASKS)}")


def zero_shot(
    loaded: LoadedModel,
    tasks: list[str] | tuple[str, ...] = PAPER_TASKS,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 1,
) -> ZeroShot:
    """Zero-shot accuracy of ``loaded`` on lm-eval ``tasks``; ``limit`` scores the first N documents.

    Any lm-eval task name works (hub data); the seven paper tasks also read local copies.
    """
    _require_lm_eval()
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.source} has no tokenizer; zero-shot tasks need one (save the model with its tokenizer)")
    import datasets

    for noisy in ("lm_eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return _run(loaded, list(dict.fromkeys(tasks)), limit, data_dir, device, batch_size)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _run(loaded: LoadedModel, tasks: list[str], limit: int | None, data_dir: str | Path | None, device: str,
         batch_size: int) -> ZeroShot:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..engine.sequential import EngineOptions

    built, sources, unavailable = [], {}, {}
    hub_manager = None
    # lm-eval draws its own bar over the scoring requests; building tasks (hub downloads) has none.
    for name in track(tasks, "zero-shot: preparing tasks"):
        docs = local_docs(name, data_dir)
        if docs is not None and limit:
            # lm-eval's limit scores the first N documents; cutting them here is the same
            # selection and spares lm-eval preprocessing the whole split.
            docs = docs[:limit]
        if name not in LOCAL_TASKS:
            hub_manager = hub_manager or TaskManager()
            if name not in hub_manager.all_tasks:
                raise UsageError(f"unknown lm-eval task {name!r}; e.g. --tasks {','.join(PAPER_TASKS)}")
        try:
            built.append(_paper_task(name, docs) if name in LOCAL_TASKS else hub_manager.load(name)["tasks"][name])
        except UsageError:
            raise
        except Exception as exc:  # lm-eval / datasets raise many types when the hub is unreachable
            unavailable[name] = _why(name, data_dir, exc)
            continue
        sources[name] = "local" if docs is not None else "hub"
    results: dict[str, TaskResult] = {}
    if built:
        torch_device = EngineOptions(device=device).torch_device()
        home = next(loaded.model.parameters()).device
        loaded.model.to(torch_device)
        try:
            lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=str(torch_device))
            # The tasks are built already: an empty manager spares lm-eval indexing all of its tasks.
            out = simple_evaluate(model=lm, tasks=built, limit=limit, log_samples=False,
                                  task_manager=TaskManager(include_defaults=False))
        finally:
            loaded.model.to(home)
        for name in tasks:
            if name in unavailable:
                continue
            scores = out["results"][name]
            if "acc,none" not in scores:
                unavailable[name] = f"{name} reports no 'acc' metric; secateurs scores multiple-choice tasks"
                continue
            results[name] = TaskResult(
                task=name,
                acc=float(scores["acc,none"]),
                acc_stderr=_number(scores.get("acc_stderr,none")),
                acc_norm=_number(scores.get("acc_norm,none")),
                acc_norm_stderr=_number(scores.get("acc_norm_stderr,none")),
                samples=int(out["n-samples"][name]["effective"]),
                source=sources[name],
            )
    return ZeroShot(results, unavailable, limit, lm_eval_version())


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
