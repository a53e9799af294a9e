"""Runs: what secateurs commands left behind, read into one comparable shape.

A run is a model folder with ``secateurs.json``, that file itself, a record file in the same format,
a benchmark results file's run records, or the ``--json`` output of ``secateurs eval`` (its scores,
with the stages read from the evaluated folder's record). How much was removed comes from the
typed stage records (``record.STAGE_KINDS``): the mean achieved sparsity of the block linears for
unstructured / N:M pruning, the fraction of decoder layers removed for depth pruning, and the
fraction of parameters removed for width pruning. ``report.py`` renders runs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UsageError
from .model.save import RECORD
from .model.shards import read_header
from .record import Effect, parse_stage


@dataclass
class Run:
    """What the report needs from one run, normalised across the kinds of pruning."""

    label: str
    source: str
    method: str = "dense"
    kind: str = "dense"
    removed: float = 0.0
    layers: dict[str, dict[int, float]] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)
    perplexity: dict[str, float] = field(default_factory=dict)
    zeroshot: dict[str, float] = field(default_factory=dict)
    mean_acc: float | None = None
    zeroshot_limit: int | None = None
    params: int | None = None
    decode_tokens_per_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a readable JSON file ({exc}); pass a secateurs output folder or record") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a secateurs record; pass a secateurs output folder or its secateurs.json")
    return data


def count_parameters(folder: Path) -> int | None:
    """Parameters stored in a folder's safetensors files, read from their headers (no weights loaded)."""
    total, found = 0, False
    for shard in sorted(folder.glob("*.safetensors")):
        for entry in read_header(shard, folder)[0].values():
            found = True
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total if found else None


def _apply_stages(run: Run, stages: list[dict], before: Effect | None = None) -> Effect | None:
    """Fold the stages' typed records into ``run``: the last stage that changed the model sets the
    method, the kind of removal and how much; the dense baseline is a run whose stages changed nothing."""
    effect = before
    for data in stages:
        stage = parse_stage(data) if isinstance(data, dict) else None
        if stage is not None:
            effect = stage.effect(effect)
    if effect is not None:
        run.kind, run.method, run.removed = effect.kind, effect.method, effect.removed
        run.layers, run.removed_layers = dict(effect.profile), list(effect.removed_layers)
        if effect.params_after is not None:
            run.params = effect.params_after
    return effect


def _apply_results(run: Run, results: dict) -> None:
    for key, value in results.items():
        if key.startswith("ppl_") and isinstance(value, dict) and "ppl" in value:
            run.perplexity[key[4:]] = float(value["ppl"])
    zeroshot = results.get("zeroshot")
    if isinstance(zeroshot, dict):
        run.zeroshot = {name: float(r["acc"]) for name, r in zeroshot.get("tasks", {}).items()}
        run.mean_acc = zeroshot.get("mean_acc")
        run.zeroshot_limit = zeroshot.get("limit")
    speed = results.get("speed")
    if isinstance(speed, dict) and speed.get("decode_tokens_per_s"):
        per_batch = speed["decode_tokens_per_s"]
        run.decode_tokens_per_s = float(per_batch.get("1", per_batch.get(1, next(iter(per_batch.values())))))


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read one run: a secateurs output folder, its record file, or ``secateurs eval --json`` output."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else None
    if folder is not None:
        if not (folder / RECORD).is_file():
            raise UsageError(f"{folder} has no {RECORD}; pass a folder written by a secateurs command")
        path = folder / RECORD
    elif not path.is_file():
        raise UsageError(f"run not found: {path}; pass a secateurs output folder or a record .json")
    return _run_from(_read_json(path), path, folder, label)


def _run_from(data: dict, path: Path, folder: Path | None, label: str | None) -> Run:
    record, results = data, data.get("results", {})
    if "stages" not in data and "model" in data:  # `secateurs eval --json` output
        results = {f"ppl_{k}": v for k, v in data.get("perplexity", {}).items()}
        if "zeroshot" in data:
            results["zeroshot"] = data["zeroshot"]
        evaluated = Path(str(data["model"])).expanduser()
        folder = evaluated if evaluated.is_dir() else None
        record = _read_json(folder / RECORD) if folder is not None and (folder / RECORD).is_file() else {}
    elif "stages" not in data:
        raise UsageError(f"{path} is not a secateurs record (no 'stages'); pass an output folder or eval --json file")
    name = label or data.get("label") or (folder.name if folder is not None else path.stem)
    run = Run(label=name, source=str(path))
    _apply_stages(run, record.get("stages", []))
    _apply_results(run, results)
    if run.params is None and folder is not None:
        run.params = count_parameters(folder)
    return run


def load_runs(path: str | Path) -> list[Run]:
    """Every run a path holds: a `secateurs run` folder gives one per stage (its chain), a benchmark
    results file (``"runs": [...]`` of records, see ``record.run_record``) one per entry, anything
    else the one run of :func:`load_run`."""
    source = Path(path).expanduser()
    if source.is_dir() and (source / RECORD).is_file() and is_recipe_record(_read_json(source / RECORD)):
        return load_chain(source)
    if source.is_file() and source.suffix == ".json":
        data = _read_json(source)
        if isinstance(data.get("runs"), list) and "stages" not in data:
            return [_run_from(entry, source, None, None) for entry in data["runs"] if isinstance(entry, dict)]
    return [load_run(source)]


def is_recipe_record(data: dict) -> bool:
    """A ``secateurs run`` record: its stages carry the recipe's stage folder and content hash."""
    stages = data.get("stages") or []
    return bool(stages) and all(isinstance(s, dict) and "key" in s and "folder" in s for s in stages)


def load_chain(out: str | Path) -> list[Run]:
    """One Run per stage of a recipe output: the model's state and metrics after each stage."""
    out = Path(out).expanduser()
    data = _read_json(out / RECORD)
    if not is_recipe_record(data):
        raise UsageError(f"{out} is not a `secateurs run` output folder")
    runs: list[Run] = []
    state = Run(label="input", source=str(data.get("input", "")))
    effect: Effect | None = None
    for stage in data["stages"]:
        state = copy.deepcopy(state)
        state.label, state.source = stage["folder"], str(out / "stages" / stage["folder"])
        if stage.get("record"):
            effect = _apply_stages(state, [stage["record"]], effect)
        results = stage.get("results") or {}
        if "perplexity" in results or "zeroshot" in results:  # an eval stage's --json output
            flat = {f"ppl_{k}": v for k, v in results.get("perplexity", {}).items()}
            if "zeroshot" in results:
                flat["zeroshot"] = results["zeroshot"]
            results = flat
        _apply_results(state, results)
        model = out / "stages" / stage["folder"] / "model"
        if model.is_dir():
            state.params = count_parameters(model)
        runs.append(state)
    return runs
