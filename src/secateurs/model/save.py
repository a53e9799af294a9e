"""Save a pruned model as a normal Hugging Face folder plus ``secateurs.json``, atomically.

The folder is written under a temporary name beside OUT and renamed only when complete, so an
interrupted or failed save never leaves a half-written OUT, and OUT can never be the input model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..errors import UsageError
from .load import LoadedModel
from .slice import remote_code_files

RECORD = "secateurs.json"


def check_out(out: str | Path, input_path: Path | None, overwrite: bool) -> Path:
    """Validate OUT before any work starts; returns it resolved."""
    target = Path(out).expanduser().resolve()
    if input_path is not None:
        source = input_path.resolve()
        source_dir = source if source.is_dir() else source.parent
        if target == source or target == source_dir or source_dir in target.parents or target in source.parents:
            raise UsageError(f"--out {out} overlaps the input model {input_path}; choose another folder")
    if target.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite or choose another folder")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose another path")
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


def save_model(
    loaded: LoadedModel, out: str | Path, record: dict, overwrite: bool = False, extras: dict[str, bytes] | None = None
) -> Path:
    """Write model, tokenizer, ``secateurs.json`` and ``extras`` (file name → bytes, e.g. a plot) to
    OUT via a temporary folder and a rename, so they appear together or not at all."""
    target = check_out(out, loaded.local_path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        loaded.model.save_pretrained(tmp)
        for name, source in remote_code_files(loaded.model).items():  # per-layer widths: see slice.py
            (tmp / name).write_text(source)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for name, data in (extras or {}).items():
            (tmp / name).write_bytes(data)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
