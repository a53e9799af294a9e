"""Recipes: a YAML chain of stages (layers, width, prune, shear, recover, eval, bench), validated
before any work starts, each stage's output kept and reused when nothing it depends on changed.

A stage's key names a stage spec (:data:`secateurs.stages.STAGES`) and its fields are that spec's
flags, the same the ``secateurs`` command of that name takes (with ``_`` or ``-``): both are derived
from the fields of the spec's config (:mod:`secateurs.schema`), which the runner builds from the
recipe's fields and validates, and the spec's own checks and its load → verb → evaluate → save flow
run it. The CLI command is built from the same config, so a recipe and a CLI call cannot drift apart.

.. code-block:: yaml

    model: smollm2-135m
    calib: {source: wikitext2, n_samples: 32, seq_len: 512, seed: 0}
    stages:
      - layers: {method: gradmap, remove: 3, compensate: true}
      - prune:  {method: sparsegpt, sparsity: 0.5, pattern: "2:4"}
      - recover: {method: lora, steps: 50}
      - eval:   {ppl: [wikitext2], tasks: [piqa]}
    out: runs/smollm2-d3-24-lora

``calib`` gives defaults for every stage whose command takes calibration flags (``calib``,
``n_samples``, ``seq_len``, ``seed``, ``data_dir``); a stage's own fields win. ``model`` and ``out``
are set by the runner: stage *i* reads stage *i−1*'s output and writes ``OUT/stages/NN-name``.
Measuring stages (``eval``, ``bench``) read the current model and write their results into their
stage folder. The final model is linked into OUT itself, with a ``secateurs.json`` holding every
stage's config, timing and results.

Nothing is lost on a rerun: a finished stage records its files and their sizes in ``stage.json``
and is reused only while they are all there (otherwise it runs again, with a note); the new OUT is
built beside the old one and swapped in by renames, so the final model in OUT is replaced only by a
complete new one. OUT holds only what secateurs wrote: a run refuses, before stage 1, an OUT with
any other file in it, so the swap never deletes a file the user put there. The whole run holds
OUT's lock (:func:`secateurs.files.output_lock`), so two runs cannot share one OUT.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import schema
from .data.sources import check_available
from .errors import SecateursError, UsageError
from .files import (
    check_protected,
    os_reason,
    output_lock,
    replace_folder,
    resolve_out,
    temporary_folder,
    write_atomic,
)
from .model.save import RECORD
from .record import build_record
from .stages import STAGES, Outcome, StageConfig, check, run_command
from .stages import Stage as StageSpec

STAGE_COMMANDS = tuple(STAGES)
RUNNER_FIELDS = ("model", "out", "overwrite")
CALIB_KEYS = {"source": "calib", "n_samples": "n_samples", "seq_len": "seq_len", "seed": "seed", "data_dir": "data_dir"}
TOP_LEVEL = ("model", "calib", "stages", "out")
STAGE_MARKER = "stage.json"
STAGES_DIR = "stages"
PUBLISHED = "published"  # the record's list of the files a run put in OUT (beside secateurs.json and stages/)
RESULT_FILES = {"eval": "json_out", "bench": "json_out"}


@dataclass
class Stage:
    """A validated stage: command name, its resolved flag values, and where it writes."""

    index: int
    command: str
    fields: dict[str, Any]
    produces_model: bool
    explicit: tuple[str, ...] = ()
    folder: str = ""
    key: str = ""

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.command})"


@dataclass
class Recipe:
    model: str
    stages: list[Stage]
    out: Path
    calib: dict[str, Any] = field(default_factory=dict)


def stage_flags(command: str) -> dict[str, schema.Flag]:
    """The flags of stage kind ``command``: its config's fields, as its command takes them."""
    return schema.flags(STAGES[command].config_class)


def stage_keys(command: str) -> list[str]:
    """The keys a recipe stage of kind ``command`` takes (its command's flags)."""
    return list(stage_flags(command))


def _coerce(stage: str, key: str, value: Any, flag: schema.Flag) -> Any:
    where = f"{stage}: {key}"
    if flag.kind == "bool":
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, got {value!r}")
        return value
    if flag.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where} must be an integer, got {value!r}")
        return value
    if flag.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where} must be a number, got {value!r}")
        return float(value)
    if flag.kind == "list":
        if isinstance(value, dict):
            return [f"{k}={v}" for k, v in value.items()]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
        raise UsageError(f"{where} must be a list or a mapping, got {value!r}")
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UsageError(f"{where} must be a string, a number or a list, got {value!r}")


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(choices))}"


def load_recipe(source: str | Path | dict, out: str | Path | None = None) -> Recipe:
    """Parse and validate a recipe (a YAML path or a dict); every error names the stage and key."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UsageError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise UsageError("a recipe is a mapping with keys model, stages and out")
    for key in raw:
        if key not in TOP_LEVEL:
            raise UsageError(f"recipe: unknown key {key!r}{_did_you_mean(key, list(TOP_LEVEL))}")
    if not isinstance(raw.get("model"), str):
        raise UsageError("recipe: 'model' must name the input model (folder, hub id, .gguf or shortcut)")
    target = out or raw.get("out")
    if not target or not isinstance(target, (str, Path)):
        raise UsageError("recipe: no output folder; set 'out' in the recipe or pass --out")
    calib = raw.get("calib") or {}
    if not isinstance(calib, dict):
        raise UsageError("recipe: 'calib' must be a mapping like {source: wikitext2, n_samples: 32}")
    for key in calib:
        if key not in CALIB_KEYS:
            raise UsageError(f"recipe calib: unknown key {key!r}{_did_you_mean(key, list(CALIB_KEYS))}")
    entries = raw.get("stages")
    if not isinstance(entries, list) or not entries:
        raise UsageError("recipe: 'stages' must be a non-empty list of {command: {flags}}")
    stages = [_stage(i, entry, calib) for i, entry in enumerate(entries)]
    recipe = Recipe(raw["model"], stages, resolve_out(target), calib)
    _check_sequence(recipe)
    _assign_keys(recipe)
    _check_values(recipe)
    return recipe


def _check_values(recipe: Recipe) -> None:
    """Every value of every stage, checked by the stage's own spec before any stage runs.

    Each stage's fields are parsed into its typed configs (every check that needs no model), then
    checked against its output location and input model's shapes where the input already exists.
    Inputs that earlier stages will write are marked pending, so their stages check everything
    that does not need the model.
    """
    stages_dir = recipe.out / "stages"
    pending = frozenset(str(stages_dir / stage.folder / "model") for stage in recipe.stages if stage.produces_model)
    current = recipe.model
    for stage in recipe.stages:
        folder = stages_dir / stage.folder
        try:
            request = _request(stage, current, folder)
            check(request, pending)
            if not stage.produces_model:
                _check_data(request)
        except SecateursError as exc:
            raise type(exc)(f"{stage.label}: {exc}") from None
        if stage.produces_model:
            current = str(folder / "model")


def _check_data(request: StageConfig) -> None:
    """A measuring stage's datasets are there (a local copy, or the hub reachable), so the recipe does
    not fail after the stages before it ran."""
    evaluation = request.evaluation
    for name in evaluation.datasets:
        check_available(name, "test", evaluation.data_dir)


def _stage(index: int, entry: Any, calib: dict) -> Stage:
    label = f"stage {index + 1}"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise UsageError(f"{label}: each stage is one mapping like 'prune: {{method: wanda}}'")
    command, given = next(iter(entry.items()))
    if command not in STAGE_COMMANDS:
        raise UsageError(f"{label}: unknown stage {command!r}{_did_you_mean(str(command), list(STAGE_COMMANDS))}")
    label = f"{label} ({command})"
    given = given or {}
    if not isinstance(given, dict):
        raise UsageError(f"{label}: its fields must be a mapping of flag: value")
    flags = stage_flags(command)
    fields: dict[str, Any] = {}
    for recipe_key, flag_name in CALIB_KEYS.items():
        if flag_name == "seq_len" and "calib_seq_len" in flags:  # recover: seq_len is the training length
            flag_name = "calib_seq_len"
        # data_dir also tells measuring stages (no calibration flags) where the offline data lives
        if recipe_key in calib and flag_name in flags and ("calib" in flags or flag_name == "data_dir"):
            fields[flag_name] = _coerce(f"{label} calib", recipe_key, calib[recipe_key], flags[flag_name])
    settable = [name for name in flags if name not in RUNNER_FIELDS]
    for key, value in given.items():
        name = str(key).replace("-", "_")
        if name in RUNNER_FIELDS:
            raise UsageError(f"{label}: {key!r} is set by the recipe runner; remove it")
        if name not in flags:
            raise UsageError(f"{label}: unknown key {key!r}{_did_you_mean(name, settable)}")
        fields[name] = _coerce(label, key, value, flags[name])
    explicit = tuple(name for name in fields if name in flags)
    for name, flag in flags.items():
        if name in RUNNER_FIELDS:
            continue
        if flag.required and name not in fields:
            raise UsageError(f"{label}: missing required key {name!r}")
        fields.setdefault(name, flag.default)
    return Stage(index, command, fields, produces_model=STAGES[command].produces_model, explicit=explicit)


def _check_sequence(recipe: Recipe) -> None:
    """Reject chains that would silently undo or break an earlier or later stage.

    (Recovery needs no check here: LoRA recovery always gives sparse linears masked adapters, so no
    recover configuration can densify a pruned model.)
    """
    sparse_before = None
    for stage in recipe.stages:
        if stage.command == "prune":
            sparse_before = stage
        if stage.command in ("width", "shear") and sparse_before is not None:
            raise UsageError(
                f"{stage.label}: structured pruning after {sparse_before.label} would break its sparsity "
                "pattern (weights are re-sliced and re-trained); put width/shear stages before prune"
            )
    _check_nm_after_width(recipe)


def _mlp_width(model: str) -> int | None:
    """The input model's MLP width, when its config can be read without loading weights."""
    from transformers import AutoConfig

    from .model.arch import spec_for
    from .model.sources import SHORTCUTS, _shortcut_folder

    try:
        folder = _shortcut_folder(model) if model in SHORTCUTS else Path(model).expanduser()
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        return int(getattr(config, spec_for(config).intermediate_key) or 4 * config.hidden_size)
    except Exception:  # a hub id offline, or an unusual folder: the stage itself will check
        return None


def _check_nm_after_width(recipe: Recipe) -> None:
    """A uniform width stage must leave an MLP width that a later N:M pattern's M divides."""
    from .sparsity.masks import Pattern
    from .structured.select import kept_count

    width = None
    for stage in recipe.stages:
        if stage.command == "width" and stage.fields.get("mode") == "uniform" and stage.fields.get("target") in (
            "channels", "both"
        ):
            width = stage
        if stage.command != "prune" or width is None:
            continue
        pattern = Pattern.parse(str(stage.fields.get("pattern") or "unstructured"))
        count = _mlp_width(recipe.model) if pattern.is_nm else None
        if count is None:
            continue
        kept = kept_count(count, float(width.fields["ratio"]), int(width.fields.get("round_to") or 1))
        if kept % pattern.m:
            good = [r / count for r in range(count) if (count - r) % pattern.m == 0]
            nearest = min(good, key=lambda r: abs(r - float(width.fields["ratio"])))
            raise UsageError(
                f"{width.label}: ratio {width.fields['ratio']:g} leaves {kept} MLP channels, not a multiple of "
                f"{pattern.m}, so the {pattern} pattern of {stage.label} cannot apply; use ratio {nearest:.4f} or round_to: {pattern.m}"
            )


def _input_identity(model: str) -> str:
    """What the first stage's content hash depends on: the source, and for local files their stats."""
    path = Path(model).expanduser()
    if not path.exists():
        return model
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return model + "|" + "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _assign_keys(recipe: Recipe) -> None:
    """Content hash per stage: its command and fields, chained on the previous stage's hash."""
    previous = hashlib.sha256(_input_identity(recipe.model).encode()).hexdigest()
    for stage in recipe.stages:
        payload = json.dumps({"command": stage.command, "fields": stage.fields}, sort_keys=True, default=str)
        stage.key = hashlib.sha256((previous + payload).encode()).hexdigest()
        stage.folder = f"{stage.index + 1:02d}-{stage.command}"
        previous = stage.key


def _stage_files(folder: Path) -> dict[str, int]:
    """What a finished stage wrote (relative path → size), recorded so a rerun can tell it is whole;
    hidden names (locks, temporaries) are not part of the output."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and path.name != STAGE_MARKER and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path.stat().st_size
    return files


def _finished(folder: Path, stage: Stage) -> tuple[dict | None, str]:
    """The stage's ``stage.json`` when its output can be reused; else None and why it cannot ("" when
    it never ran or its config or input changed, which need no note)."""
    marker = folder / STAGE_MARKER
    if not marker.is_file():
        return None, ""
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError, RecursionError):
        return None, f"its {STAGE_MARKER} is unreadable"
    if not isinstance(done, dict):
        return None, f"its {STAGE_MARKER} is not a JSON object"
    if done.get("key") != stage.key:
        return None, ""
    files = done.get("files")
    if not isinstance(files, dict) or not files:
        return None, f"its {STAGE_MARKER} lists no files (an older secateurs wrote it)"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != size:
            return None, f"{name} changed size"
    return done, ""


def estimate(recipe: Recipe) -> list[dict]:
    """The plan: per stage whether it would run or be reused, and a rough token count it processes."""
    stages_dir = recipe.out / "stages"
    plan = []
    for stage in recipe.stages:
        f = stage.fields
        tokens = 0
        if f.get("calib") and f.get("n_samples") and f.get("seq_len"):
            tokens += 2 * int(f["n_samples"]) * int(f["seq_len"])
        if f.get("steps"):
            tokens += 3 * int(f["steps"]) * int(f.get("batch_size") or 1) * int(f.get("seq_len") or 512)
        plan.append({
            "stage": stage.folder,
            "action": "reuse" if _finished(stages_dir / stage.folder, stage)[0] is not None else "run",
            "fields": {k: f[k] for k in stage.explicit},
            "forward_token_equivalents": tokens or None,
        })
    return plan


def run(
    recipe: str | Path | dict | Recipe,
    out: str | Path | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    show: Callable[[Outcome], None] | None = None,
) -> dict:
    """Run (or, with ``dry_run``, only plan) a recipe; returns the final ``secateurs.json`` record.

    ``echo`` gets one line per stage (running / reusing); ``show`` each stage's summary tables."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, out)
    if dry_run:
        _check_out(recipe.out)
        return {"plan": estimate(recipe)}
    with output_lock(recipe.out):
        _check_out(recipe.out)
        stages_dir = recipe.out / STAGES_DIR
        try:
            stages_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"could not create {stages_dir}: {os_reason(exc)}; choose a writable --out") from None
        current = recipe.model
        history: list[dict] = []
        for stage in recipe.stages:
            folder = stages_dir / stage.folder
            done, why = _finished(folder, stage)
            if done is not None:
                echo(f"{stage.label}: unchanged, reusing {folder}")
            else:
                echo(f"{stage.label}: {why}, so running it again" if why else f"{stage.label}: running")
                done = _run_stage(stage, current, folder, show)
            history.append(done)
            if stage.produces_model:
                current = str(folder / "model")
        record = build_record(recipe.model, history, {"final_model": current})
        _publish(recipe.out, current if current != recipe.model else None, record)
    return record


def _check_out(out: Path) -> None:
    """OUT is new, empty, or a recipe output holding only what secateurs wrote (checked before stage 1,
    and again before OUT is swapped), and never a folder secateurs may not replace."""
    check_protected(out, "--out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose another path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / STAGES_DIR).is_dir():
        raise UsageError(f"--out {out} exists and is not a recipe output folder; choose another")
    ours = _published(out)
    foreign = sorted(path.name for path in out.iterdir() if path.name not in ours)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UsageError(
            f"--out {out} holds {foreign[0]!r}{more}, which secateurs did not write and would not keep; "
            "move it out of OUT and rerun (finished stages are reused)"
        )


def _published(out: Path) -> set[str]:
    """The names a previous run put in OUT: secateurs.json, stages/ and its record's list of files (for
    a record older than that list, the files of the final model it names)."""
    names = {RECORD, STAGES_DIR}
    try:
        results = json.loads((out / RECORD).read_text()).get("results")
    except (OSError, ValueError, RecursionError, AttributeError):
        return names
    if not isinstance(results, dict):
        return names
    listed = results.get(PUBLISHED)
    if isinstance(listed, list):
        return names | {str(name) for name in listed}
    final = Path(str(results.get("final_model")))
    if final.is_dir() and final.resolve().is_relative_to((out / STAGES_DIR).resolve()):
        names |= {path.name for path in final.iterdir() if path.is_file()}
    return names


def _flag_values(stage: Stage, model: str, folder: Path) -> dict[str, Any]:
    """The stage's flag values: its fields, its input and where it writes."""
    values = dict(stage.fields)
    values["model"] = model
    if stage.produces_model:
        values["out"] = str(folder / "model")
        if "overwrite" in stage_flags(stage.command):
            values["overwrite"] = False
    result_flag = RESULT_FILES.get(stage.command)
    if result_flag and result_flag in values:
        values[result_flag] = str(folder / "results.json")
    return values


def _request(stage: Stage, model: str, folder: Path) -> StageConfig:
    """The stage's flag values parsed by its spec into a typed request."""
    spec: StageSpec = STAGES[stage.command]
    return spec.parse(**_flag_values(stage, model, folder))


def _run_stage(stage: Stage, model: str, folder: Path, show: Callable[[Outcome], None] | None) -> dict:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    try:
        values = _flag_values(stage, model, folder)
        request = STAGES[stage.command].parse(**values)
        # nproc > 1: this stage alone runs across the ranks (they write the stage folder), not the recipe
        outcome = run_command(request, values)
        if outcome is not None and show is not None:
            show(outcome)
        if outcome is not None and outcome.failed:
            raise UsageError("nothing could be measured (see the notes above)")
    except SecateursError as exc:
        raise type(exc)(f"{stage.label}: {exc}") from exc
    done = {
        "stage": stage.command,
        "folder": stage.folder,
        "key": stage.key,
        "config": stage.fields,
        "seconds": round(time.perf_counter() - start, 2),
        "input": model,
    }
    model_record = folder / "model" / RECORD
    if model_record.is_file():
        written = json.loads(model_record.read_text())
        done["record"] = (written.get("stages") or [{}])[-1]
        done["results"] = written.get("results", {})
    results = folder / "results.json"
    if results.is_file():
        done["results"] = json.loads(results.read_text())
    done["files"] = _stage_files(folder)
    write_atomic(folder / STAGE_MARKER, json.dumps(done, indent=2, default=str) + "\n")
    return done


def _publish(out: Path, final_model: str | None, record: dict) -> None:
    """Swap in a new OUT: the final model's files (hard links, so OUT loads with transformers), the
    record, and the stages folder, built in a temporary folder beside OUT and renamed over it.

    The old OUT is removed only once the new one is complete, and it holds nothing but what an
    earlier run published (checked again here); a failure leaves the old OUT and its stages as they were.
    """
    _check_out(out)
    sources = [] if final_model is None else [
        path for path in sorted(Path(final_model).iterdir())
        if path.is_file() and path.name != RECORD and not path.name.startswith(".")
    ]
    record["results"][PUBLISHED] = [path.name for path in sources]
    try:
        with temporary_folder(out.parent, f".{out.name}.publish-") as tmp:
            stages_moved = False
            try:
                for source in sources:
                    try:
                        os.link(source, tmp / source.name)
                    except OSError:
                        shutil.copy2(source, tmp / source.name)
                (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
                (out / STAGES_DIR).rename(tmp / STAGES_DIR)
                stages_moved = True
                replace_folder(tmp, out)
            except BaseException:
                if stages_moved:  # put the stages back before the temporary folder goes
                    (tmp / STAGES_DIR).rename(out / STAGES_DIR)
                raise
    except OSError as exc:
        raise UsageError(_publish_failed(out, exc)) from None


def _publish_failed(out: Path, exc: OSError) -> str:
    return f"could not write --out {out}: {os_reason(exc)}; the previous OUT and the stages are kept, rerun to finish"
