"""The papers' zero-shot tasks read offline, in the exact schema of the hub dataset lm-eval expects.

Each reader turns the local copy of one task's scored split (laid out as the shared data folder,
see its PROVENANCE.md) into the rows the hub dataset would give, so lm-eval's own task config
(prompts, choices, metrics) applies unchanged. The lm-eval bridge that serves these rows is
``evaluate/zeroshot.py``.
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.sources import data_dir_from
from ..errors import UsageError


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


PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
"""The seven zero-shot tasks of the pruning papers (e.g. Wanda Table 2, LLM-Pruner Table 1)."""

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
