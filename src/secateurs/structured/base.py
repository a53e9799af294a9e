"""What every width-pruning method shares: the request, the method interface, the run.

A method only scores groups (and may adjust weights before they are cut, as FLAP's bias
compensation does); groups come from :mod:`.groups`, selection from :mod:`.select`, the surgery
from :mod:`secateurs.model.slice`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from ..data.calib import CalibConfig, calibration_ids
from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..model.groups import GroupSet, block_groups, check_target
from ..model.load import LoadedModel
from ..model.per_layer import remote_code_files
from ..model.slice import apply_widths
from ..record import WidthStage, peak_memory_mb
from .config import WidthConfig
from .registry import method_class
from .select import Scores, select_global, select_uniform

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

    def stage_record(self) -> WidthStage:
        return WidthStage(
            method=self.config.method,
            config=asdict(self.config),
            importance=self.importance,
            calibration=asdict(self.calibration) if self.calibration else None,
            seed=self.calibration.seed if self.calibration else None,
            achieved={"param_reduction": self.reduction, "groups_removed": self.achieved()},
            params={"before": self.params_before, "after": self.params_after},
            widths=self.widths,
            per_layer_config=self.per_layer_config,
            seconds=round(self.seconds, 3),
            peak_memory_mb=round(self.peak_memory_mb, 1),
            device=self.device,
        )


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
