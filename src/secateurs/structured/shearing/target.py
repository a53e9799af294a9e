"""The shape to shear to: parsing ``--target`` / ``--target-config``, and the plan that resolves it
against a model (source and target counts of each mask kind, weights per head group and channel),
refusing shapes the model or its config class cannot take."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import PreTrainedModel

from ...errors import UsageError
from ...model.arch import SPECS, ArchSpec
from ...model.drop_layers import check_removal
from ...model.groups import block_groups, check_target, head_geometry
from ...model.load import LoadedModel

MASK_KINDS = ("layers", "hidden", "heads", "channels")
HIDDEN_ARCHS = tuple(spec.name for spec in SPECS if spec.prunable_hidden)  # see ArchSpec
_JSON_KEYS = {
    "num_hidden_layers": "layers", "n_layers": "layers", "hidden_size": "hidden", "d_model": "hidden",
    "num_attention_heads": "heads", "n_heads": "heads", "num_key_value_heads": "kv_heads",
    "intermediate_size": "intermediate",
}


@dataclass(frozen=True)
class ShearTarget:
    """The architecture to shear to; a size left as None keeps the source's."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None

    @classmethod
    def parse(cls, text: str) -> ShearTarget:
        """``layers=20,hidden=448,heads=6,kv_heads=2,intermediate=1024`` (any subset)."""
        values = {}
        names = {f.name for f in fields(cls)}
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise UsageError(f"--target part {part!r} must be one of {', '.join(sorted(names))} = a number")
            try:
                values[key] = int(value)
            except ValueError:
                raise UsageError(f"--target {key}={value!r} is not a whole number") from None
        if not values:
            raise UsageError("--target is empty; e.g. --target layers=20,hidden=448,heads=6,kv_heads=2,intermediate=1024")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> ShearTarget:
        """A JSON file with our keys or a transformers config's (``num_hidden_layers``, ``hidden_size``, ...)."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise UsageError(f"--target-config {path} not found")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--target-config {path} is not valid JSON ({exc.msg})") from None
        names = {f.name for f in fields(cls)}
        values = {}
        for key, value in (data.items() if isinstance(data, dict) else []):
            name = key if key in names else _JSON_KEYS.get(key)
            if name is not None and value is not None:
                values[name] = int(value)
        if not values:
            raise UsageError(f"--target-config {path} names no size (layers, hidden, heads, kv_heads, intermediate)")
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    """Source and target counts per mask kind (only kinds that shrink), resolved against a model."""

    source: dict[str, int]
    target: dict[str, int]
    per_group: int
    group_params: int  # weights of one head group at the source hidden size
    channel_params: int  # weights of one MLP channel at the source hidden size

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in MASK_KINDS if self.target[k] < self.source[k])

    def params(self, counts: dict[str, float]) -> float:
        """Non-embedding weights of attention + MLP for the given (expected) counts of each kind."""
        per_block = counts["heads"] * self.group_params + counts["channels"] * self.channel_params
        return counts["layers"] * per_block * counts["hidden"] / self.source["hidden"]

    @property
    def target_params(self) -> float:
        return self.params({k: float(v) for k, v in self.target.items()})

    @property
    def source_params(self) -> float:
        return self.params({k: float(v) for k, v in self.source.items()})


def plan_for(loaded: LoadedModel, target: ShearTarget) -> Plan:
    """Check ``target`` against the model and return the counts to shear between."""
    model, spec = loaded.model, loaded.spec
    config = model.config
    blocks = spec.blocks_of(model)
    first = blocks[0]
    groups = block_groups(spec, config, first, ("channels",))
    geo = head_geometry(spec, config, first)
    shapes = {(head_geometry(spec, config, b).heads, block_groups(spec, config, b, ("channels",))["channels"].count)
              for b in blocks}
    if len(shapes) > 1:
        raise UsageError("this model already has different widths per layer; shear a uniform model")
    source = {"layers": len(blocks), "hidden": int(config.hidden_size), "heads": geo.kv_heads,
              "channels": groups["channels"].count}
    heads = target.heads
    kv = target.kv_heads
    if heads is not None and heads % geo.per_group:
        raise UsageError(
            f"heads={heads} is not a multiple of the {geo.per_group} query heads that share each K/V head "
            f"in this model; use heads={geo.per_group * max(1, round(heads / geo.per_group))}"
        )
    if heads is not None and kv is not None and heads != kv * geo.per_group:
        raise UsageError(
            f"heads={heads} with kv_heads={kv} changes the {geo.per_group}:1 query/KV sharing of this model; "
            f"use heads={kv * geo.per_group}"
        )
    groups_target = kv if kv is not None else (heads // geo.per_group if heads is not None else source["heads"])
    wanted = {"layers": target.layers, "hidden": target.hidden, "heads": groups_target, "channels": target.intermediate}
    resolved = {}
    for kind, value in wanted.items():
        value = source[kind] if value is None else value
        if not 1 <= value <= source[kind]:
            raise UsageError(f"target {kind} must be between 1 and the source's {source[kind]}, got {value}")
        resolved[kind] = value
    if resolved["layers"] < source["layers"]:
        check_removal(model, spec, list(range(source["layers"] - resolved["layers"])))
    if resolved["heads"] < source["heads"]:
        check_target(spec, ("heads",))
    if resolved["hidden"] < source["hidden"] and not spec.prunable_hidden:
        raise UsageError(
            f"{spec.name}: pruning the hidden size is supported for {', '.join(HIDDEN_ARCHS)}; leave hidden= out"
        )
    _check_config(model, spec, resolved, geo.per_group)
    group_params = block_groups(spec, config, first, ("heads",))["heads"].params_per_group(first)
    return Plan(source, resolved, geo.per_group, group_params, groups["channels"].params_per_group(first))


def _check_config(model: PreTrainedModel, spec: ArchSpec, counts: dict[str, int], per_group: int) -> None:
    """Refuse a target shape the model's own config class would reject on reload."""
    values = model.config.to_dict()
    if spec.head_dim_key and not values.get(spec.head_dim_key):
        values[spec.head_dim_key] = values["hidden_size"] // values[spec.heads_key]
    values["hidden_size"] = counts["hidden"]
    values[spec.num_layers_key] = counts["layers"]
    if spec.head_dim_key:
        values[spec.heads_key] = counts["heads"] * per_group
        if spec.kv_heads_key:
            values[spec.kv_heads_key] = counts["heads"]
    for key in [k for k, v in values.items() if "layer" in k and isinstance(v, list)]:
        values[key] = values[key][: counts["layers"]]
    try:
        model.config.__class__.from_dict(values)
    except (ValueError, StrictDataclassClassValidationError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{model.config.model_type} cannot load the target shape ({reason}); pick hidden a multiple of heads"
        ) from None
