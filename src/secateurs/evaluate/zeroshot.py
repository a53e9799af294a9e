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

import logging
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..data.sources import data_dir_from
from ..device import resolve_device
from ..errors import UsageError
from ..model.load import LoadedModel
from ..progress import track
from .tasks import LOCAL_TASKS, PAPER_TASKS, local_docs


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
        torch_device = resolve_device(device)
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
