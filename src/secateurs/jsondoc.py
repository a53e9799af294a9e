"""JSON that secateurs reads back from files a user may have edited or been handed (run records,
results files, resume checkpoints), parsed with its nesting bounded.

Python's decoder recurses once per nested container, so a document of a hundred thousand ``[`` ends
in a ``RecursionError`` (a traceback) rather than a parse error; and a document just under that
limit is parsed, then overflows whatever walks it recursively. Every such document secateurs
writes nests a few levels deep, so anything deeper than :data:`MAX_DEPTH` is refused as malformed.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64


def depth(value: Any) -> int:
    """How deeply JSON containers (dicts and lists) nest in ``value``, found without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises ``ValueError`` (never ``RecursionError``) for a document nested
    deeper than ``max_depth``, as for any other malformed JSON."""
    try:
        document = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    if depth(document) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return document
