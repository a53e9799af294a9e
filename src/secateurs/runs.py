"""Runs: what secateurs commands left behind, read into one comparable shape.

A run is a model folder with ``secateurs.json``, that file itself, a record file in the same format,
a benchmark results file's run records, or the ``--json`` output of ``secateurs eval`` (its scores,
with the stages read from the evaluated folder's record). How much was removed comes from the
typed stage records (``record.STAGE_KINDS``): the mean achieved sparsity of the block linears for
unstructured / N:M pruning, the fraction of decoder layers removed for depth pruning, and the
fraction of parameters removed for width pruning, the fraction of routed experts removed for expert
pruning. ``report.py`` renders runs.

A record is a file a user may have edited, so nothing in it is trusted: the JSON's nesting is
bounded (``jsondoc``), each stage entry is checked against the types its record class declares,
what the stages imply (how much was removed, per-block curves) must be finite and in range, and
every result read (perplexity, accuracy, speed) must be a number that makes sense. A record that
fails is one line naming the file and the field, never a traceback.
"""

from __future__ import annotations

import copy
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import jsondoc
from .errors import UsageError
from .model.save import RECORD
from .model.shards import read_header
from .record import STAGE_KINDS, Effect, StageRecord, key_of, parse_stage

MAX_BLOCKS = 10_000  # a per-block curve indexed past this is not a model's (and would size the plot)


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
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(path: Path) -> dict:
    try:
        data = jsondoc.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable JSON file ({exc}); pass a secateurs output folder or record") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a secateurs record; pass a secateurs output folder or its secateurs.json")
    return data


class Malformed(Exception):
    """A record field that is not what secateurs writes there: ``where`` names it."""

    def __init__(self, where: str, value: Any, wanted: str) -> None:
        shown = repr(value) if isinstance(value, (int, float, bool, str, type(None))) else f"a {type(value).__name__}"
        super().__init__(f"{where} is {shown[:60]}, not {wanted}")


def _malformed(path: Path, exc: Malformed) -> UsageError:
    return UsageError(f"{path}: {exc}; fix or rewrite that record, or leave it out of the report")


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool), small enough to be a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def conforms(value: Any, hint: Any) -> bool:
    """``value`` has the type ``hint`` names (the annotations of the record classes: ``str``,
    ``int``, ``float`` (finite; an int will do), ``list[...]``, ``dict[...]``, ``X | None``, ``Any``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if hint is float:
        return _is_number(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _stage(data: Any, where: str) -> StageRecord | None:
    """The typed record of one stage entry, every field it declares checked against its type."""
    if not isinstance(data, dict):
        raise Malformed(where, data, "a stage record (a mapping)")
    cls = STAGE_KINDS.get(data.get("stage")) if isinstance(data.get("stage"), str) else None
    if cls is None:
        return None
    hints = typing.get_type_hints(cls)
    for item in fields(cls):
        value = data.get(key_of(item))
        if value is not None and not conforms(value, hints[item.name]):
            raise Malformed(f"{where}.{key_of(item)}", value, f"{hints[item.name]}".replace("typing.", ""))
    return parse_stage(data)


def _effect(stage: StageRecord, before: Effect | None, where: str) -> Effect | None:
    """What ``stage`` did; a record whose values cannot make one (a sparsity that is text, a block
    index past any model) is malformed."""
    try:
        effect = stage.effect(before)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, ZeroDivisionError) as exc:
        raise Malformed(where, str(exc), f"a readable {stage.kind} record") from None
    if effect is None:
        return None
    if not _is_number(effect.removed) or not -1.0 <= effect.removed <= 1.0:
        raise Malformed(f"{where} (fraction removed)", effect.removed, "a fraction")
    for name, curve in effect.profile.items():
        if not all(isinstance(i, int) and 0 <= i < MAX_BLOCKS and _is_number(v) for i, v in curve.items()):
            raise Malformed(f"{where} ({name})", "", f"finite values of blocks 0 to {MAX_BLOCKS - 1}")
    if not all(isinstance(i, int) and 0 <= i < MAX_BLOCKS for i in effect.removed_layers):
        raise Malformed(f"{where}.removed_layers", effect.removed_layers, f"blocks 0 to {MAX_BLOCKS - 1}")
    if effect.params_after is not None and not (isinstance(effect.params_after, int) and effect.params_after >= 0):
        raise Malformed(f"{where} (parameters after)", effect.params_after, "a parameter count")
    return effect


def one_line(text: str) -> str:
    """``text`` with every newline or other control character made a space: a label or name read
    from a record stays on its line of a table or list."""
    return "".join(c if c.isprintable() else " " for c in text)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise Malformed(where, value, "a mapping")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Malformed(where, value, "text")
    return value


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


def _apply_stages(run: Run, stages: Any, before: Effect | None = None, where: str = "stages") -> Effect | None:
    """Fold the stages' typed records into ``run``: the last stage that changed the model sets the
    method, the kind of removal and how much; the dense baseline is a run whose stages changed nothing."""
    if not isinstance(stages, list):
        raise Malformed(where, stages, "a list of stage records")
    effect = before
    for number, data in enumerate(stages):
        stage = _stage(data, f"{where}[{number}]")
        if stage is not None:
            effect = _effect(stage, effect, f"{where}[{number}]")
    if effect is not None:
        run.kind, run.method, run.removed = effect.kind, effect.method, effect.removed
        run.layers, run.removed_layers = dict(effect.profile), list(effect.removed_layers)
        run.notes = [one_line(str(note)) for note in effect.notes]
        if effect.params_after is not None:
            run.params = effect.params_after
    return effect


def _ppl(value: Any, where: str) -> float:
    """A positive perplexity; infinity is one (a model that collapsed), NaN is not."""
    if not (_is_number(value) or value == math.inf) or value <= 0:
        raise Malformed(where, value, "a positive perplexity")
    return float(value)


def _score(value: Any, where: str) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise Malformed(where, value, "an accuracy from 0 to 1")
    return float(value)


def _apply_results(run: Run, results: Any, where: str = "results") -> None:
    """Perplexity per dataset (entries that are not measurements, such as an unavailable dataset's
    reason, are left out), zero-shot accuracy and decode speed, each checked to be a sensible number."""
    for key, value in _mapping(results, where).items():
        if isinstance(key, str) and key.startswith("ppl_") and isinstance(value, dict) and "ppl" in value:
            run.perplexity[key[4:]] = _ppl(value["ppl"], f"{where}.{key}.ppl")
    zeroshot = results.get("zeroshot")
    if zeroshot is not None:
        _apply_zeroshot(run, _mapping(zeroshot, f"{where}.zeroshot"), f"{where}.zeroshot")
    speed = results.get("speed")
    if isinstance(speed, dict) and speed.get("decode_tokens_per_s"):
        per_batch = _mapping(speed["decode_tokens_per_s"], f"{where}.speed.decode_tokens_per_s")
        value = per_batch.get("1", per_batch.get(1, next(iter(per_batch.values()))))
        if not _is_number(value) or value <= 0:
            raise Malformed(f"{where}.speed.decode_tokens_per_s", value, "a positive speed")
        run.decode_tokens_per_s = float(value)


def _apply_zeroshot(run: Run, zeroshot: dict, where: str) -> None:
    tasks = _mapping(zeroshot.get("tasks", {}), f"{where}.tasks")
    run.zeroshot = {_text(name, f"{where}.tasks"): _score(_mapping(r, f"{where}.tasks.{name}").get("acc"), f"{where}.tasks.{name}.acc")
                    for name, r in tasks.items()}
    mean = zeroshot.get("mean_acc")
    run.mean_acc = None if mean is None else _score(mean, f"{where}.mean_acc")
    limit = zeroshot.get("limit")
    if limit is not None and not (conforms(limit, int) and limit >= 0):
        raise Malformed(f"{where}.limit", limit, "a document count")
    run.zeroshot_limit = limit


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
    try:
        return _read_run(data, path, folder, label)
    except Malformed as exc:
        raise _malformed(path, exc) from None


def _read_run(data: dict, path: Path, folder: Path | None, label: str | None) -> Run:
    record, results = data, data.get("results", {})
    if "stages" not in data and "model" in data:  # `secateurs eval --json` output
        measured = _mapping(data.get("perplexity", {}), "perplexity")
        results = {f"ppl_{k}": v for k, v in measured.items()}
        if "zeroshot" in data:
            results["zeroshot"] = data["zeroshot"]
        evaluated = Path(_text(data["model"], "model")).expanduser()
        folder = evaluated if evaluated.is_dir() else None
        record = _read_json(folder / RECORD) if folder is not None and (folder / RECORD).is_file() else {}
    elif "stages" not in data:
        raise UsageError(f"{path} is not a secateurs record (no 'stages'); pass an output folder or eval --json file")
    name = label or _text(data.get("label") or (folder.name if folder is not None else path.stem), "label")
    run = Run(label=one_line(name), source=str(path))
    try:
        _apply_stages(run, record.get("stages", []))
    except Malformed as exc:
        if record is data:
            raise
        raise _malformed(folder / RECORD, exc) from None
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
            for number, entry in enumerate(data["runs"]):
                if not isinstance(entry, dict):
                    raise _malformed(source, Malformed(f"runs[{number}]", entry, "a run record (a mapping)"))
            return [_run_from(entry, source, None, None) for entry in data["runs"]]
    return [load_run(source)]


def is_recipe_record(data: dict) -> bool:
    """A ``secateurs run`` record: its stages carry the recipe's stage folder and content hash."""
    stages = data.get("stages") or []
    return isinstance(stages, list) and bool(stages) and all(isinstance(s, dict) and "key" in s and "folder" in s for s in stages)


def load_chain(out: str | Path) -> list[Run]:
    """One Run per stage of a recipe output: the model's state and metrics after each stage."""
    out = Path(out).expanduser()
    data = _read_json(out / RECORD)
    if not is_recipe_record(data):
        raise UsageError(f"{out} is not a `secateurs run` output folder")
    try:
        return _chain(out, data)
    except Malformed as exc:
        raise _malformed(out / RECORD, exc) from None


def _chain(out: Path, data: dict) -> list[Run]:
    runs: list[Run] = []
    state = Run(label="input", source=str(data.get("input", "")))
    effect: Effect | None = None
    for number, stage in enumerate(data["stages"]):
        where = f"stages[{number}]"
        folder = _text(stage["folder"], f"{where}.folder")
        if Path(folder).name != folder or folder in ("", ".", ".."):
            raise Malformed(f"{where}.folder", folder, "a stage folder's name")
        state = copy.deepcopy(state)
        state.label, state.source = one_line(folder), str(out / "stages" / folder)
        if stage.get("record"):
            effect = _apply_stages(state, [stage["record"]], effect, f"{where}.record")
        results = _mapping(stage.get("results") or {}, f"{where}.results")
        if "perplexity" in results or "zeroshot" in results:  # an eval stage's --json output
            flat = {f"ppl_{k}": v for k, v in _mapping(results.get("perplexity", {}), f"{where}.results.perplexity").items()}
            if "zeroshot" in results:
                flat["zeroshot"] = results["zeroshot"]
            results = flat
        _apply_results(state, results, f"{where}.results")
        model = out / "stages" / folder / "model"
        if model.is_dir():
            state.params = count_parameters(model)
        runs.append(state)
    return runs
