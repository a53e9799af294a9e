"""What every width-pruning method shares: the request, the method interface, the run.

A method only scores groups (and may adjust weights before they are cut, as FLAP's bias
compensation does); groups come from :mod:`.groups`, selection from :mod:`.select`, the surgery
from :mod:`secateurs.model.slice`.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from ..data.calib import CalibConfig, calibration_ids
from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..model.groups import KINDS, GroupSet, block_groups, check_target
from ..model.load import LoadedModel
from ..model.per_layer import remote_code_files
from ..model.slice import apply_widths
from ..record import peak_memory_mb
from .importance import AGGREGATES
from .registry import METHODS, TARGET_NAMES
from .select import Scores, select_global, select_uniform

TARGETS = dict(zip(TARGET_NAMES, (("heads",), ("channels",), KINDS), strict=True))
MODES = ("uniform", "global")


@dataclass
class WidthConfig:
    """A width-pruning request.

    ``ratio``: in ``uniform`` mode the fraction of each targeted kind's groups removed from every
    prunable layer (LLM-Pruner's ``pruning_ratio``); in ``global`` mode the fraction of the
    targeted parameters removed overall. ``importance`` picks the score where a method has several
    (None: the method's paper default). ``keep_first`` / ``keep_last`` leave layers whole
    (LLM-Pruner prunes layers 4–30 of LLaMA-7B's 32, i.e. keep_first=4, keep_last=2).
    ``round_to``: keep a multiple of this many MLP channels per layer (uniform mode), for fast kernels.
    """

    method: str = "llm-pruner"
    ratio: float = 0.2
    importance: str | None = None
    aggregate: str = "sum"
    target: str = "both"
    mode: str = "uniform"
    keep_first: int = 0
    keep_last: int = 0
    bias_compensation: bool = True
    round_to: int = 1

    def calibration(
        self, source: str = "wikitext2", n_samples: int | None = None, seq_len: int | None = None, seed: int = 0,
        data_dir: str | None = None,
    ) -> CalibConfig | None:
        """The calibration this method's paper used (its own sample count and length where not given),
        or None for a method that needs no data; so the API and the CLI calibrate alike."""
        cls = method_class(self.method)
        if not cls.needs_calibration:
            return None
        return CalibConfig(source, n_samples or cls.default_samples, seq_len or cls.default_seq_len, seed, data_dir)

    def kinds(self) -> tuple[str, ...]:
        if self.target not in TARGETS:
            raise UsageError(f"unknown --target {self.target!r}; use heads, channels or both")
        return TARGETS[self.target]

    def validate(self, n_layers: int) -> list[int]:
        """Check the request against the model; returns the prunable layer indices."""
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio must be in (0, 1), got {self.ratio:g}")
        if self.mode not in MODES:
            raise UsageError(f"unknown --mode {self.mode!r}; use uniform or global")
        if self.aggregate not in AGGREGATES:
            raise UsageError(f"unknown --aggregate {self.aggregate!r}; use one of {', '.join(AGGREGATES)}")
        if self.round_to < 1:
            raise UsageError(f"--round-to must be at least 1, got {self.round_to}")
        if self.round_to > 1 and self.mode != "uniform":
            raise UsageError("--round-to applies to --mode uniform; drop it or use --mode uniform")
        if self.keep_first < 0 or self.keep_last < 0:
            raise UsageError("--keep-first and --keep-last must be at least 0")
        layers = list(range(self.keep_first, n_layers - self.keep_last))
        if not layers:
            raise UsageError(
                f"--keep-first {self.keep_first} and --keep-last {self.keep_last} leave none of the "
                f"{n_layers} layers to prune; lower them"
            )
        self.kinds()
        return layers


class WidthMethod:
    """Scores every group of every block; subclasses implement :meth:`scores`."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    importances: ClassVar[tuple[str, ...]] = ()
    default_importance: ClassVar[str | None] = None
    default_samples: ClassVar[int] = 128
    default_seq_len: ClassVar[int] = 128

    def __init__(self, config: WidthConfig) -> None:
        importance = config.importance or self.default_importance
        if self.importances and importance not in self.importances:
            raise UsageError(
                f"--importance {importance!r} does not apply to {self.name}; use one of {', '.join(self.importances)}"
            )
        if not self.importances and config.importance is not None:
            raise UsageError(f"{self.name} has one importance metric; drop --importance")
        self.config = config
        self.importance = importance

    def scores(
        self, loaded: LoadedModel, groups: list[dict[str, GroupSet]], calib_ids: torch.Tensor | None, device: torch.device
    ) -> Scores:
        raise NotImplementedError

    def before_slice(
        self, loaded: LoadedModel, groups: list[dict[str, GroupSet]], keep: list[dict[str, torch.Tensor]]
    ) -> None:
        """Adjust weights knowing what will be cut (e.g. FLAP's bias compensation); default: nothing."""


def method_class(name: str) -> type[WidthMethod]:
    if name not in METHODS:
        raise UsageError(f"unknown width method {name!r}; use one of {', '.join(METHODS)}")
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def model_groups(loaded: LoadedModel, kinds: tuple[str, ...]) -> list[dict[str, GroupSet]]:
    """The group sets of every block."""
    check_target(loaded.spec, kinds)
    return [block_groups(loaded.spec, loaded.model.config, block, kinds) for block in loaded.spec.blocks_of(loaded.model)]


def group_costs(loaded: LoadedModel, groups: list[dict[str, GroupSet]]) -> list[dict[str, int]]:
    """Parameters removed with one group, per block and kind."""
    blocks = loaded.spec.blocks_of(loaded.model)
    return [{kind: gs.params_per_group(block) for kind, gs in per.items()} for block, per in zip(blocks, groups)]


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class WidthReport:
    """What a width pruning did: request, kept widths per layer, parameters before / after, cost."""

    config: WidthConfig
    importance: str | None
    calibration: CalibConfig | None
    widths: list[dict[str, int]]
    groups_before: dict[str, int]
    groups_after: dict[str, int]
    params_before: int
    params_after: int
    per_layer_config: bool
    seconds: float
    peak_memory_mb: float
    device: str

    @property
    def reduction(self) -> float:
        """Fraction of the model's parameters removed (tied embeddings counted once)."""
        return 1.0 - self.params_after / self.params_before

    def achieved(self) -> dict[str, float]:
        """Fraction of each kind's groups removed over the whole model (heads in KV-group units)."""
        return {kind: 1.0 - self.groups_after[kind] / self.groups_before[kind] for kind in self.groups_before}

    def stage_record(self) -> dict:
        return {
            "stage": "width",
            "method": self.config.method,
            "config": asdict(self.config),
            "importance": self.importance,
            "calibration": asdict(self.calibration) if self.calibration else None,
            "seed": self.calibration.seed if self.calibration else None,
            "achieved": {"param_reduction": self.reduction, "groups_removed": self.achieved()},
            "params": {"before": self.params_before, "after": self.params_after},
            "widths": self.widths,
            "per_layer_config": self.per_layer_config,
            "seconds": round(self.seconds, 3),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "device": self.device,
        }


def _widths(loaded: LoadedModel, kinds: tuple[str, ...]) -> list[dict[str, int]]:
    return [{kind: gs.count for kind, gs in per.items()} for per in model_groups(loaded, kinds)]


def prune_width(
    loaded: LoadedModel, config: WidthConfig, calib: CalibConfig | None = None, engine: EngineOptions | None = None
) -> WidthReport:
    """Score, select and physically remove heads / MLP channels of ``loaded.model`` in place."""
    engine = engine or EngineOptions()
    device = engine.torch_device()
    cls = method_class(config.method)
    method = cls(config)
    layers = config.validate(loaded.spec.num_layers(loaded.model.config))
    kinds = config.kinds()
    groups = model_groups(loaded, kinds)
    if cls.needs_calibration and calib is None:
        raise UsageError(f"width method {config.method} needs calibration data: pass --calib (e.g. wikitext2)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    ids = calibration_ids(calib, loaded.tokenizer, loaded.model) if cls.needs_calibration else None
    params_before = count_parameters(loaded.model)
    before = _widths(loaded, kinds)
    scores = method.scores(loaded, groups, ids, device)
    if config.mode == "uniform":
        keep = select_uniform(scores, config.ratio, layers, config.round_to)
    else:
        keep = select_global(scores, group_costs(loaded, groups), config.ratio, layers)
    method.before_slice(loaded, groups, keep)
    apply_widths(loaded.model, loaded.spec, keep)
    after = _widths(loaded, kinds)
    return WidthReport(
        config=config,
        importance=method.importance,
        calibration=calib if ids is not None else None,
        widths=after,
        groups_before={kind: sum(w[kind] for w in before) for kind in kinds},
        groups_after={kind: sum(w[kind] for w in after) for kind in kinds},
        params_before=params_before,
        params_after=count_parameters(loaded.model),
        per_layer_config=bool(remote_code_files(loaded.model)),
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
        device=str(device),
    )
