"""Method options from ``key=value`` strings: a config's ``options`` (``-o key=value`` on the command
line) become a family's ``Options`` dataclass (sparsity criteria, OWL / ATP budgets, layer scorers,
depth compensation) through :func:`build_options`, typed by the dataclass's fields.

It lives below the method families because every family that takes options uses it, and no family
imports another.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import UsageError


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """Repeated ``--option key=value`` as a mapping."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r} must look like key=value")
        options[key.strip()] = value.strip()
    return options


def build_options(options_cls: type, values: dict[str, str]) -> Any:
    """Instantiate a method's Options dataclass from ``key=value`` strings, typed by its fields."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        field = fields.get(key.replace("-", "_"))
        if field is None:
            known = ", ".join(sorted(fields)) or "none"
            raise UsageError(f"unknown option {key!r} for this method; known options: {known}")
        kwargs[field.name] = _coerce(raw, field.type, key)
    return options_cls(**kwargs)


def _coerce(raw: Any, annotation: Any, key: str) -> Any:
    if not isinstance(raw, str):
        return raw
    kind = str(annotation)
    try:
        if kind in ("bool", "<class 'bool'>"):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind in ("int", "<class 'int'>"):
            return int(raw)
        if kind in ("float", "<class 'float'>"):
            return float(raw)
    except ValueError as exc:
        raise UsageError(f"option {key}={raw!r}: expected {kind}") from exc
    return raw
