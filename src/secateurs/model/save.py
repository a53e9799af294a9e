"""Save a pruned model as a normal Hugging Face folder plus ``secateurs.json``, atomically.

The folder is written under a temporary name beside OUT and renamed only when complete, so an
interrupted or failed save never leaves a half-written OUT, and OUT can never be the input model.
The temporary folder and the clean-up after a killed save are :mod:`secateurs.files`' own.
Everything about OUT that can be known in advance (overlap, writable, free space) is checked
before any work by :func:`check_output`; an OS error during the save itself becomes one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import SafetensorError

from ..errors import UsageError
from ..files import (
    check_replaceable,
    check_writable,
    os_reason,
    replace_folder,
    resolve_out,
    temporary_folder,
    write_atomic,
)
from . import deci
from .load import LoadedModel
from .per_layer import remote_code_files

RECORD = "secateurs.json"
SAVE_FORMATS = ("hf", "deci")
"""``hf``: a transformers folder (per-layer widths through our own class, :mod:`.per_layer`); ``deci``: the
``block_configs`` layout vLLM and llama.cpp run (:mod:`.deci`), or ``hf`` with a note where it cannot hold the model."""


def check_out(out: str | Path, input_path: Path | None, overwrite: bool) -> Path:
    """Validate OUT against the input and what is already there; returns it resolved. ``overwrite``
    replaces only an empty folder or a secateurs output (:func:`secateurs.files.check_replaceable`)."""
    target = resolve_out(out)
    if input_path is not None:
        source = input_path.resolve()
        # A folder input owns everything under it; a file input (.gguf) only itself, so a sibling
        # folder is fine, but neither may be replaced by OUT or an OUT above it.
        owned = source if source.is_dir() else None
        if target == source or target in source.parents or (owned is not None and owned in target.parents):
            raise UsageError(f"--out {out} overlaps the input model {input_path}; choose another folder")
    if target.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite or choose another folder")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose another path")
    if target.exists():
        check_replaceable(target, "--out", RECORD)
    return target


def check_output(out: str | Path, source: str | None, overwrite: bool, expected_bytes: int | None = None) -> Path:
    """Everything about OUT that can be known before the model loads: not over the input (MODEL as
    typed), free or ``overwrite``, creatable, writable, room for ``expected_bytes``; returns it resolved."""
    target = check_out(out, local_input(source) if source else None, overwrite)
    check_writable(target, f"--out {out}", expected_bytes)
    return target


def check_output_file(path: str | Path, flag: str) -> Path:
    """A file output (``--json``): not a folder, and its folder creatable and writable; returns it resolved."""
    target = resolve_out(path, flag)
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    check_writable(target, f"{flag} {path}")
    return target


def write_output_file(path: str | Path, text: str, flag: str) -> Path:
    """Write a small output file atomically (its folder created); an OS error becomes one line."""
    target = Path(path).expanduser().resolve()
    try:
        write_atomic(target, text)
    except OSError as exc:
        raise UsageError(f"could not write {flag} {path}: {exc.strerror or exc}; nothing was written") from None
    return target


def local_input(source: str) -> Path | None:
    """The input model's path when MODEL names something on disk (for the overlap check)."""
    path = Path(source).expanduser()
    return path if path.exists() else None


def previous_stages(input_path: Path | None) -> list[dict]:
    """The stages recorded in the input's ``secateurs.json``, so chained runs keep their history."""
    if input_path is None or not (input_path / RECORD).is_file():
        return []
    try:
        return list(json.loads((input_path / RECORD).read_text()).get("stages", []))
    except (json.JSONDecodeError, AttributeError):
        return []


def _drop_missing_auto_map(config: Path) -> None:
    """Drop the ``auto_map`` entries of a saved config whose Python file is not in the folder.

    A config copied from the input may name code that only the input had (a hub repo's
    ``modeling_*.py``); OUT would then promise a class it cannot load. Entries naming another hub
    repository (``repo--module.Class``) and the files secateurs writes itself stay.
    """
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not isinstance(auto_map, dict):
        return
    missing = {key: ref for key, ref in auto_map.items() if not _code_present(config.parent, ref)}
    if not missing:
        return
    kept = {key: ref for key, ref in auto_map.items() if key not in missing}
    if kept:
        data["auto_map"] = kept
    else:
        del data["auto_map"]
    config.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    names = ", ".join(f"{key} -> {ref}" for key, ref in missing.items())
    print(f"secateurs: note: {config.name} of OUT no longer names code absent from OUT (auto_map {names})", file=sys.stderr)


def _code_present(folder: Path, ref: object) -> bool:
    """Whether every class an ``auto_map`` value names (``module.Class``, or a [slow, fast] pair) is
    in ``folder`` or in another hub repository."""
    refs = ref if isinstance(ref, list) else [ref]
    for one in refs:
        if one is None or (isinstance(one, str) and "--" in one):
            continue
        if not isinstance(one, str) or "." not in one:
            return False
        module = one.rsplit(".", 1)[0]
        if not (folder / (module.replace(".", "/") + ".py")).is_file():
            return False
    return True


def check_save_format(save_format: str, config=None) -> None:
    """Refuse an unknown format, or ``deci`` for a model that is not Llama's, before any work."""
    if save_format not in SAVE_FORMATS:
        raise UsageError(f"unknown --save-format {save_format!r}; use one of {', '.join(SAVE_FORMATS)}")
    if save_format == "deci" and config is not None:
        deci.check_architecture(config)


def _deci_plan(loaded: LoadedModel, save_format: str) -> deci.DeciPlan | None:
    """The ``block_configs`` layout of the model when asked for and it can hold the model; otherwise
    None, with one line saying why our own folder is written instead."""
    check_save_format(save_format, loaded.model.config)
    if save_format != "deci":
        return None
    try:
        plan = deci.plan(loaded.model, loaded.spec)
    except deci.NotExpressible as exc:
        print(f"secateurs: note: --save-format deci: {exc}; writing the transformers folder of --save-format hf "
              "instead (per-layer widths: secateurs' own class)", file=sys.stderr)
        return None
    for note in plan.notes:
        print(f"secateurs: note: --save-format deci: {note}", file=sys.stderr)
    return plan


def save_model(
    loaded: LoadedModel, out: str | Path, record: dict, overwrite: bool = False, extras: dict[str, bytes] | None = None,
    save_format: str = "hf",
) -> Path:
    """Write model, tokenizer, ``secateurs.json`` and ``extras`` (file name → bytes, e.g. a plot) to
    OUT via a temporary folder and a rename, so they appear together or not at all. ``save_format``:
    one of :data:`SAVE_FORMATS`; the one written is recorded in ``secateurs.json``."""
    deci_plan = _deci_plan(loaded, save_format)
    if save_format != "hf":  # what was asked may not be what was written
        record = {**record, "save_format": "deci" if deci_plan is not None else "hf"}
    target = check_out(out, loaded.local_path, overwrite)
    check_writable(target, f"--out {out}")
    try:
        with temporary_folder(target.parent, f".{target.name}.tmp-") as tmp:
            if deci_plan is not None:
                deci.write_folder(loaded.model, loaded.spec, tmp, deci_plan)
            else:
                loaded.model.save_pretrained(tmp)
                for name, source in remote_code_files(loaded.model).items():  # per-layer widths: see per_layer.py
                    (tmp / name).write_text(source)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
            for name in ("config.json", "tokenizer_config.json"):
                _drop_missing_auto_map(tmp / name)
            (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
            for name, data in (extras or {}).items():
                (tmp / name).write_bytes(data)
            replace_folder(tmp, target)
            if deci_plan is not None:
                print("secateurs: note: wrote the block_configs layout (DeciLMForCausalLM, nemotron-nas: vLLM, llama.cpp)",
                      file=sys.stderr)
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"could not write --out {out}: {os_reason(exc)}; nothing was written") from None
    return target
