"""Configs are the schema: a stage's command-line flags and recipe keys are derived from the fields of
its typed config dataclass, so an option is written once, as one field with its default and its help.

A field says what the command line shows through :func:`option` (help text, other spellings, a
positional argument, and ``parse`` when the flag is spelled as text but the field is typed, e.g. a
comma-separated ``--sparsity`` read into ``float | list[float]``). A field made with :func:`group`
holds a nested config (calibration, evaluation, loading, the engine) whose own fields become flags of
the outer config, flattened once: a flag several groups share (``device``, ``data_dir``) appears once
and feeds them all. :func:`flags` lists the flags, :func:`build` turns flag values (the CLI's, a
recipe's) back into the nested config, whose ``__post_init__`` validates it.

Nothing here imports torch, typer or the configs' families: the CLI builds ``--help`` from these
flags, and the configs that use this module stay importable without torch.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

HELP = "secateurs.help"
GROUP = "secateurs.group"


@dataclass(frozen=True)
class Flag:
    """One flag: its name (``--name`` and the recipe key), the type the command line reads, its default
    in that type, its help, and the fields of the (nested) config its value goes to."""

    name: str
    annotation: Any
    default: Any
    required: bool
    help: str
    decls: tuple[str, ...] = ()
    argument: bool = False
    parse: Callable[[Any], Any] | None = None
    paths: tuple[tuple[str, ...], ...] = ()
    stage_default: bool = False  # the default is the group's override, not the config field's

    @property
    def kind(self) -> str:
        """``str``, ``int``, ``float``, ``bool`` or ``list``: how a recipe's YAML value is checked."""
        return _kind(self.annotation)

    def value(self, raw: Any) -> Any:
        """The field's value from the flag's (``parse`` turns the command line's text into the field's type)."""
        return self.parse(raw) if self.parse is not None else raw


@dataclass(frozen=True)
class Help:
    """A field's command-line face (kept in the field's metadata under :data:`HELP`)."""

    text: str
    decls: tuple[str, ...] = ()
    argument: bool = False
    parse: Callable[[Any], Any] | None = None
    cli: Any = None  # the type the command line reads when ``parse`` turns it into another


@dataclass(frozen=True)
class Group:
    """How a nested config's fields become flags: ``rename`` (field → flag name), ``exclude`` (fields
    that are not flags), ``help`` (field → this stage's own wording), ``required`` (fields this stage
    asks for although the config has a default for Python callers: ``layers --remove``), ``defaults``
    (field → this stage's own default, where it differs from the config's: recover's iterative
    ``--prune wanda``), and ``optional_on``: the field whose flag left at None makes the whole group None (``--calib`` absent:
    no calibration)."""

    cls: type
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    help: Mapping[str, str] = dataclasses.field(default_factory=dict)
    optional_on: str | None = None
    required: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    decls: tuple[str, ...] = (),
    argument: bool = False,
    parse: Callable[[Any], Any] | None = None,
    cli: Any = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field that is also a flag. With ``parse`` the flag reads ``cli`` (default ``str | None``)
    and is None when absent, which leaves the field at its default."""
    metadata = {HELP: Help(help, decls, argument, parse, cli)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def group(
    cls: type,
    *,
    rename: Mapping[str, str] | None = None,
    exclude: tuple[str, ...] = (),
    help: Mapping[str, str] | None = None,
    optional_on: str | None = None,
    required: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
) -> Any:
    """A config field holding a nested config whose fields are flattened into flags (see :class:`Group`)."""
    spec = Group(cls, dict(rename or {}), exclude, dict(help or {}), optional_on, required, dict(defaults or {}))
    if optional_on is not None:
        return dataclasses.field(default=None, metadata={GROUP: spec})
    return dataclasses.field(default_factory=cls, metadata={GROUP: spec})


def _kind(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return "list"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    return {bool: "bool", int: "int", float: "float"}.get(annotation, "str")


def _annotation(cls: type, field: dataclasses.Field) -> Any:
    """A field's type, evaluated in its module (configs use ``from __future__ import annotations``)."""
    if not isinstance(field.type, str):
        return field.type
    return eval(field.type, vars(sys.modules[cls.__module__]))  # noqa: S307 - the config's own annotation


def _default(field: dataclasses.Field) -> tuple[Any, bool]:
    """A field's default and whether it has none (a required flag)."""
    if field.default is not dataclasses.MISSING:
        return field.default, False
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory(), False
    return None, True


def flags(cls: type) -> dict[str, Flag]:
    """The flags of config ``cls`` in field order, groups flattened; a flag shared by several fields
    (the same name) is listed once, and its defaults must agree."""
    found: dict[str, Flag] = {}
    _collect(cls, (), Group(cls), found)
    return found


def _collect(cls: type, prefix: tuple[str, ...], spec: Group, found: dict[str, Flag]) -> None:
    for field in dataclasses.fields(cls):
        if field.name in spec.exclude or not field.init:
            continue
        path = (*prefix, field.name)
        nested = field.metadata.get(GROUP)
        if nested is not None:
            _collect(nested.cls, path, nested, found)
            continue
        about = field.metadata.get(HELP)
        if about is None:
            raise TypeError(f"{cls.__name__}.{field.name} has no help: make it with secateurs.schema.option or exclude it")
        name = spec.rename.get(field.name, field.name)
        default, required = _default(field)
        annotation = _annotation(cls, field)
        if about.parse is not None:
            annotation, default = about.cli or (str | None), None
        if spec.optional_on == field.name:
            default, annotation = None, annotation | None
        if field.name in spec.required:
            default, required = None, True
        if field.name in spec.defaults:
            default = spec.defaults[field.name]
        flag = Flag(name, annotation, default, required, spec.help.get(field.name, about.text), about.decls,
                    about.argument, about.parse, (path,), field.name in spec.defaults)
        if name in found:
            first = found[name]
            if first.default != flag.default:
                raise TypeError(f"flag {name!r} has two defaults: {first.default!r} and {flag.default!r}")
            flag = dataclasses.replace(first, paths=first.paths + flag.paths)
        found[name] = flag


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """Config ``cls`` from flag values (missing ones take their defaults); unknown names are refused
    with a did-you-mean. Each config's ``__post_init__`` validates what it receives."""
    known = flags(cls)
    for name in values:
        if name not in known:
            from difflib import get_close_matches

            close = get_close_matches(name, list(known), n=1)
            raise UsageError(f"unknown option {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    tree: dict[str, Any] = {}
    for name, flag in known.items():
        absent = name not in values or (flag.parse is not None and values[name] is None)
        if absent and flag.required:
            raise UsageError(f"missing required option {name!r}")
        if absent and not flag.stage_default:
            continue
        value = flag.default if absent else flag.value(values[name])
        for path in flag.paths:
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    return _instantiate(cls, Group(cls), tree)


def _instantiate(cls: type, spec: Group, tree: dict[str, Any]) -> Any:
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in tree and field.metadata.get(GROUP) is None:
            continue
        nested = field.metadata.get(GROUP)
        if nested is None:
            kwargs[field.name] = tree[field.name]
        elif nested.optional_on is not None and tree.get(field.name, {}).get(nested.optional_on) is None:
            kwargs[field.name] = None
        else:
            kwargs[field.name] = _instantiate(nested.cls, nested, tree.get(field.name, {}))
    return cls(**kwargs)


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of config ``cls``, for a field elsewhere that shares its flag."""
    return next(f.metadata[HELP].text for f in dataclasses.fields(cls) if f.name == name)


def argv(cls: type, values: Mapping[str, Any]) -> list[str]:
    """The command line that gives config ``cls`` these flag values (the inverse of :func:`build`'s
    input): positional arguments first, then each flag whose value differs from its default, as
    ``secateurs <stage>`` reads it (a list flag repeated, a bool as ``--name`` / ``--no-name``). The
    torchrun ranks of a ``--nproc`` run are started with it, so they build the very same config."""
    known = flags(cls)
    positional = [str(values[name]) for name, flag in known.items() if flag.argument and name in values]
    options: list[str] = []
    for name, flag in known.items():
        value = values.get(name)
        if flag.argument or value is None or (value == flag.default and not flag.required):
            continue
        spelled = flag.decls[0] if flag.decls else "--" + name.replace("_", "-")
        if flag.kind == "bool":
            options.append(spelled if value else "--no-" + spelled.removeprefix("--"))
        elif flag.kind == "list":
            options += [part for item in value for part in (spelled, str(item))]
        else:
            options += [spelled, str(value)]
    return positional + options
