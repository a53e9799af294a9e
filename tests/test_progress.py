"""Progress for logs: when stderr is not a terminal, plain lines (stage, done/total, elapsed, ETA)
appear while a stage runs, not only when it ends."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from secateurs import progress


@pytest.fixture
def log(monkeypatch) -> io.StringIO:
    sink = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=sink))
    monkeypatch.setenv("SECATEURS_PROGRESS", "1")
    return sink


def test_plain_lines_when_not_a_terminal(log, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    seen = []
    for item in progress.track(range(3), "prune blocks"):
        seen.append((item, log.getvalue().count("\n")))
    lines = log.getvalue().splitlines()
    assert seen == [(0, 1), (1, 2), (2, 3)]  # a line at the start and one per item before the next begins
    assert lines[0].startswith("secateurs: prune blocks 0/3 ") and lines[0].endswith("eta ?")
    assert lines[-1].startswith("secateurs: prune blocks 3/3 ") and lines[-1].endswith("eta 0:00:00")


def test_interval_limits_the_lines_and_fields_are_shown(log, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    with progress.meter("lora", 10, completed=2, loss="-") as update:
        for step in range(3, 11):
            update(step, loss=f"{1 / step:.3f}")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2  # the start and the end only
    assert "lora 2/10 loss - " in lines[0] and "lora 10/10 loss 0.100 " in lines[1]


def test_silenced(log, monkeypatch):
    monkeypatch.setenv("SECATEURS_PROGRESS", "0")
    assert list(progress.track(range(2), "x")) == [0, 1]
    assert log.getvalue() == ""
