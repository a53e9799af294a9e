"""One progress display for all long work (blocks, samples, windows, training steps), with ETA.

On a terminal it is a rich bar. When stderr is not a terminal (a batch scheduler's log, ``nohup``,
``2> file``) a bar would print nothing until the stage ends, so plain lines are written instead:
one when the stage starts, then one every ``SECATEURS_PROGRESS_INTERVAL`` seconds (default 30) and
one at the end, each with the stage, done/total, elapsed time and ETA.
Set ``SECATEURS_PROGRESS=0`` to silence both (tests and CI logs do).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
INTERVAL_ENV = "SECATEURS_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0

Update = Callable[..., None]
"""``update(completed, **fields)``: how far a stage has got, and the extra fields it shows (loss...)."""


def enabled() -> bool:
    return os.environ.get("SECATEURS_PROGRESS", "1") not in ("0", "false", "no")


def _interval() -> float:
    try:
        return max(float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)), 0.0)
    except ValueError:
        return DEFAULT_INTERVAL_S


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LogLines:
    """Plain progress lines for logs: at the start, every ``interval`` seconds, and at the end."""

    def __init__(self, description: str, total: int | None, completed: int, interval: float,
                 fields: dict[str, object]) -> None:
        self.description, self.total, self.interval = description, total, interval
        self.first = self.done = completed
        self.fields = dict(fields)
        self.start = self.last = time.monotonic()
        self._write()

    def update(self, completed: int, **fields: object) -> None:
        self.done = completed
        self.fields.update(fields)
        if time.monotonic() - self.last >= self.interval:
            self._write()

    def close(self) -> None:
        if time.monotonic() > self.last or self.done != self.first:
            self._write()

    def _write(self) -> None:
        now = time.monotonic()
        self.last = now
        elapsed = now - self.start
        progress = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        eta = "?"
        if self.total and self.done > self.first:
            eta = _clock(elapsed / (self.done - self.first) * (self.total - self.done))
        extra = "".join(f" {k} {v}" for k, v in self.fields.items() if v not in ("", None))
        console.file.write(f"secateurs: {self.description} {progress}{extra} elapsed {_clock(elapsed)} eta {eta}\n")
        console.file.flush()


@contextmanager
def meter(description: str, total: int | None, completed: int = 0, **fields: object) -> Iterator[Update]:
    """Show a stage's progress; yields ``update(completed, **fields)``. ``fields`` names the extra
    values shown beside the count (their initial values), e.g. ``loss="-"``."""
    if not enabled():
        yield lambda completed, **_: None
        return
    if not console.is_terminal:
        lines = LogLines(description, total, completed, _interval(), fields)
        try:
            yield lines.update
        finally:
            lines.close()
        return
    extra = [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, completed=completed, **fields)
        yield lambda done, **values: bar.update(task, completed=done, **values)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` showing done/total, elapsed time and ETA on stderr."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with meter(description, total) as update:
        for done, item in enumerate(items, start=1):
            yield item
            update(done)
