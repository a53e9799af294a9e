"""Held-out text must not be training text: a held-out file that shares a span with the training
text would make its loss curve a memorisation curve, so it is refused before any training.

The check hashes word windows (whitespace-split, so no tokenizer is needed): every ``WINDOW``-word
window of the held-out text, at every offset, against the training text's windows at a stride of
``WINDOW``. Any shared span of ``2 × WINDOW − 1`` words or more contains one of those strided
training windows, so it is found; shorter coincidences (common phrases) are not overlap.
"""

from __future__ import annotations

from ..errors import UsageError

WINDOW = 16


def _windows(words: list[str], stride: int) -> set[int]:
    return {hash(" ".join(words[i : i + WINDOW])) for i in range(0, len(words) - WINDOW + 1, stride)}


def shared_windows(train: str, held_out: str) -> int:
    """How many of the training text's strided windows occur somewhere in the held-out text."""
    held = _windows(held_out.split(), 1)
    return len(_windows(train.split(), WINDOW) & held)


def check_disjoint(train: str, held_out: str, train_name: str, held_name: str) -> None:
    """Refuse ``held_out`` when it shares a span of 2 × ``WINDOW`` − 1 words or more with ``train``."""
    shared = shared_windows(train, held_out)
    if shared:
        raise UsageError(f"the held-out text {held_name} overlaps the training text {train_name} "
                         f"({shared} shared {WINDOW}-word windows); hold out text the run does not train on")
