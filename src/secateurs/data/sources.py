"""Named datasets and text files, read from a local data folder or, failing that, the hub.

Names: ``wikitext2``, ``ptb``, ``c4``. A local copy is looked up in ``data_dir`` (the ``--data-dir``
flag) or ``$SECATEURS_DATA``, laid out as in the project's shared data folder; with no local copy the
normal ``datasets`` hub loader is used, and if that fails (no network) the error says what to pass.
Any path ending in ``.txt`` or ``.jsonl`` is read as text too (jsonl: the ``text`` field of each line).

Evaluation text follows the pruning papers' protocol (SparseGPT, Wanda): the test split joined into
one string, cut later into non-overlapping windows. Calibration never reads a test split.
"""

from __future__ import annotations

import bz2
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class LocalFile:
    """A file under the data folder and how to turn its lines into one string."""

    relpath: str
    join: Callable[[list[str]], str]


def _blank_line_join(lines: list[str]) -> str:
    """WikiText-2 raw lines as the HF split joins them: paragraphs separated by a blank line."""
    return "\n\n".join(line for line in lines if line.strip())


def _space_join_stripped(lines: list[str]) -> str:
    """PTB as ``ptb_text_only`` + SparseGPT build it: stripped sentences joined by spaces."""
    return " ".join(line.strip() for line in lines if line.strip())


LOCAL_FILES: dict[tuple[str, str], LocalFile] = {
    ("wikitext2", "test"): LocalFile("wikitext-2-raw/wiki.test.raw", _blank_line_join),
    # The raw train split is not kept locally; the validation split is the offline calibration text.
    ("wikitext2", "train"): LocalFile("wikitext-2/valid.txt", _blank_line_join),
    ("ptb", "test"): LocalFile("ptb/ptb.test.txt", _space_join_stripped),
    ("ptb", "train"): LocalFile("ptb/ptb.train.txt.bz2", _space_join_stripped),
}

DATASETS = ("wikitext2", "ptb", "c4")


def data_dir_from(data_dir: str | Path | None) -> Path | None:
    chosen = data_dir or os.environ.get("SECATEURS_DATA")
    return Path(chosen).expanduser() if chosen else None


def is_text_path(name: str) -> bool:
    return name.endswith((".txt", ".jsonl"))


def check_name(name: str, allow_self: bool = False) -> None:
    """Fail fast, before any model is loaded, on a dataset name or path that cannot work."""
    if is_text_path(name):
        if not Path(name).expanduser().is_file():
            raise UsageError(f"data file not found: {name}")
        return
    if name in DATASETS or (allow_self and name == "self"):
        return
    extra = ", 'self'" if allow_self else ""
    raise UsageError(
        f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}{extra}, "
        "or a path to a .txt or .jsonl file"
    )


def load_text(name: str, split: str, data_dir: str | Path | None = None) -> str:
    """The text of dataset ``name`` (or a .txt/.jsonl path) for ``split`` ('train' or 'test')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    check_name(name)
    if is_text_path(name):
        return _read_text_file(Path(name).expanduser())
    folder = data_dir_from(data_dir)
    local = LOCAL_FILES.get((name, split))
    if folder is not None and local is not None and (folder / local.relpath).is_file():
        return local.join(_read_lines(folder / local.relpath))
    return _from_hub(name, split, folder, local)


def _read_lines(path: Path) -> list[str]:
    raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    return raw.decode("utf-8").replace("\r\n", "\n").split("\n")


def _read_text_file(path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(f"{path}:{number} has no string field 'text'")
            texts.append(record["text"])
        text = "\n\n".join(texts)
    if not text.strip():
        raise UsageError(f"data file {path} is empty")
    return text


_HUB = {
    ("wikitext2", "test"): (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, "text", "\n\n"),
    ("wikitext2", "train"): (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}, "text", "\n\n"),
    ("ptb", "test"): (("ptb_text_only", "penn_treebank"), {"split": "test"}, "sentence", " "),
    ("ptb", "train"): (("ptb_text_only", "penn_treebank"), {"split": "train"}, "sentence", " "),
    ("c4", "test"): (
        ("allenai/c4",),
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
        "text",
        " ",
    ),
    ("c4", "train"): (
        ("allenai/c4",),
        {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"},
        "text",
        " ",
    ),
}

# SparseGPT's C4 evaluation protocol: the first 1100 validation documents; for calibration a
# bounded prefix of the first train shard is plenty for random windows.
_HUB_DOC_LIMIT = {("c4", "test"): 1100, ("c4", "train"): 20000}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connect to the hub, so an offline machine fails at once instead of after retries."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_available(name: str, split: str, data_dir: str | Path | None = None) -> None:
    """What :func:`load_text` would refuse, known without reading any data: a missing file, no local
    copy with the hub set offline or unreachable (a recipe checks this before its first stage)."""
    check_name(name)
    if is_text_path(name):
        return
    folder = data_dir_from(data_dir)
    local = LOCAL_FILES.get((name, split))
    if folder is None or local is None or not (folder / local.relpath).is_file():
        _check_hub(name, split, folder, local)


def _check_hub(name: str, split: str, folder: Path | None, local: LocalFile | None) -> str:
    """Why there is no local copy; raises when the hub cannot give one either."""
    where = (
        f"no local copy ({folder / local.relpath} not found)"
        if folder is not None and local is not None
        else "no local copy (pass --data-dir or set SECATEURS_DATA)"
        if local is not None
        else "it has no offline copy"
    )
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"{name} ({split}) is unavailable: {where} and the hub is set offline")
    if not _hub_reachable():
        raise UsageError(f"{name} ({split}) is unavailable: {where} and huggingface.co cannot be reached")
    return where


def _from_hub(name: str, split: str, folder: Path | None, local: LocalFile | None) -> str:
    where = _check_hub(name, split, folder, local)
    try:
        import datasets
    except ImportError as exc:
        raise UsageError(
            f"{name} ({split}) is unavailable: {where}, and reading it from the hub needs "
            "`pip install datasets`"
        ) from exc
    args, kwargs, field, separator = _HUB[(name, split)]
    try:
        dataset = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{name} ({split}) is unavailable: {where} and the hub could not be reached ({reason})"
        ) from exc
    limit = _HUB_DOC_LIMIT.get((name, split))
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return separator.join(dataset[field])
