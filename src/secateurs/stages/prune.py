"""The ``prune`` stage: unstructured / N:M sparsity (:func:`secateurs.prune`), in memory, streamed
shard by shard, or split over processes. Its flags are the fields of :class:`PruneRequest`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..data.config import CalibConfig
from ..engine.options import EngineOptions
from ..errors import UsageError
from ..schema import group, option
from ..sparsity.config import AtpOptions, OwlOptions, PruneConfig
from .base import Outcome, Stage, StageConfig, Table
from .flags import check_at_least, err_console
from .groups import Evaluation, LoadOptions, evaluation_after, model_argument, out_option

if TYPE_CHECKING:
    from ..api import PruneReport
    from ..engine.distributed import DistributedHooks
    from ..model.load import LoadedModel


@dataclass
class PruneRequest(StageConfig):
    """Prune a model's linears to a sparsity (unstructured or N:M) and save it."""

    model: str = model_argument()
    out: str = out_option()
    config: PruneConfig = group(PruneConfig, rename={"options": "option"}, exclude=("allocation_options",))
    owl_m: float = option(OwlOptions.m, "OWL: a weight is an outlier above M × its block's mean Wanda score.")
    owl_lambda: float = option(OwlOptions.lam, "OWL: block sparsities stay within target ± lambda.")
    atp_spread: float | None = option(
        AtpOptions.spread, "ATP: last block's sparsity minus the first's; default: searched on the calibration loss."
    )
    calib: CalibConfig | None = group(CalibConfig, rename={"source": "calib"}, optional_on="source")
    engine: EngineOptions = group(EngineOptions)
    evaluation: Evaluation = evaluation_after()
    load: LoadOptions = group(LoadOptions)
    export: str = option(
        "dense",
        "dense: a plain HF folder; sparse: pruned linears stored compressed in the compressed-tensors layout (sparse-24-bitmask / sparse-bitmask), loaded onto the sparse kernels by secateurs.",
    )
    stream: bool = option(
        False,
        "Never hold the whole model: read each block from MODEL's safetensors shards, write it to OUT's when done. Resumable: rerun the same command.",
    )
    nproc: int = option(
        1, "Processes to split calibration over (one per GPU); launches torchrun. Under torchrun its world size is used."
    )

    def __post_init__(self) -> None:
        """Everything that needs no model, checked once, before any weight loads."""
        self.config.allocation_options = (
            {"spread": self.atp_spread} if self.config.allocation == "atp" else {"m": self.owl_m, "lam": self.owl_lambda}
        )
        self.config.check(self.calib)
        if self.config.reconstruct is not None and self.nproc != 1:
            raise UsageError("--reconstruct runs in one process (its optimiser steps are not shared between ranks); drop --nproc")
        self.engine.torch_device()
        if self.calib:
            self.calib.validate()
        evaluation = self.evaluation
        evaluation.check()
        check_at_least(1, batch_size=self.engine.batch_size, nproc=self.nproc)
        if self.export not in ("dense", "sparse"):
            raise UsageError(f"--export {self.export!r} is not known; use dense or sparse")
        if self.stream and (evaluation.datasets or self.export != "dense"):
            raise UsageError("--stream writes OUT block by block: drop --ppl / --export sparse, then run secateurs eval on OUT")


class PruneStage(Stage):
    name = "prune"
    config_class = PruneRequest
    hooks: DistributedHooks | None = None  # this run's process group (a spec instance runs one request)

    def check_model(self, request: PruneRequest, skeleton: LoadedModel | None) -> None:
        from ..api import check_prune

        check_prune(skeleton, request.config, request.calib)
        if skeleton is not None:
            request.check_windows(skeleton)

    def execute(self, request: PruneRequest) -> Outcome | None:
        """One rank of a torchrun job when started under one (:func:`secateurs.stages.run_command` starts it
        for ``nproc`` > 1); streamed shard by shard with ``stream``."""
        from ..api import prune_streamed
        from ..engine.distributed import DistributedHooks, init_from_env, shutdown

        group = init_from_env(request.engine.torch_device())
        self.hooks = DistributedHooks(group) if group is not None else None
        if not request.stream:
            return super().execute(request)
        report, path = prune_streamed(request.model, request.out, request.config, request.calib, request.engine,
                                      request.dtype, request.overwrite, group, self.hooks)
        shutdown()
        if path is None:
            return None
        rows = self.rows(request, report) + [["saved to", str(path)]]
        return Outcome([Table(self.title(request), ["", "value"], rows, self.notes(request, report))], path)

    def apply(self, loaded: LoadedModel, request: PruneRequest) -> PruneReport | None:
        from ..api import prune
        from ..engine.distributed import shutdown

        report = prune(loaded, request.config, request.calib, request.engine, self.hooks)
        shutdown()
        main = self.hooks is None or self.hooks.group.is_main
        return report if main else None  # every rank holds the same weights

    def notes(self, request: PruneRequest, report: PruneReport) -> list[str]:
        return [f"[yellow]note:[/] {note}" for note in report.notes]

    def rows(self, request: PruneRequest, report: PruneReport) -> list[list[str]]:
        return [
            ["method", request.config.method],
            ["pattern", str(report.target.pattern)],
            ["target sparsity (mean)", f"{report.target.mean:.4f}"],
            ["achieved sparsity (mean)", f"{report.achieved:.4f}"],
            ["time (s)", f"{report.seconds:.1f}"],
            ["peak memory (MiB)", f"{report.peak_memory_mb:.0f}"],
        ]

    def records(self, loaded: LoadedModel, request: PruneRequest, report: PruneReport) -> tuple[list, list[list[str]]]:
        from ..api import export_sparse
        from ..kernels.registry import format_class
        from ..sparsity.masks import KERNEL_PATTERNS

        if request.export != "sparse":
            return [report], []
        try:
            exported = export_sparse(loaded)
        except UsageError as exc:
            err_console.print(f"[yellow]saving dense:[/] {exc}", highlight=False, soft_wrap=True)
            return [report], []
        for reason, count in expert_reasons(exported.kept_dense or {}).items():
            err_console.print(f"[yellow]{count} expert matrices:[/] {reason}", highlight=False, soft_wrap=True)
        sizes = exported.weight_bytes
        kinds = sorted({info["kind"] for info in exported.layers.values()})
        pattern = str(report.target.pattern)
        if pattern not in (*KERNEL_PATTERNS, "unstructured"):
            err_console.print(f"[yellow]{pattern} has no kernel of its own:[/] its linears are stored and run as "
                              f"{' / '.join(kinds)} (the N:M kernels are {', '.join(KERNEL_PATTERNS)})", highlight=False, soft_wrap=True)
        elif pattern in KERNEL_PATTERNS and pattern not in kinds and format_class(pattern).unavailable():
            err_console.print(f"[yellow]{pattern} linears are stored and run as {' / '.join(kinds)}:[/] "
                              f"{format_class(pattern).unavailable()}", highlight=False, soft_wrap=True)
        row = ["export", (f"sparse ({', '.join(kinds)}), {len(exported.layers)} linears at "
                          f"{sizes['compressed'] / sizes['dense']:.3f} of dense bytes")]
        return [report, exported], [row]


def expert_reasons(kept_dense: dict[str, str]) -> dict[str, int]:
    """Why MoE expert matrices (``…experts.gate_up_proj.3``) stayed dense in a sparse export, each reason
    once with how many it covers: one line per experts family or cause, not one per expert."""
    from ..model.experts import DOWN, GATE_UP

    found: dict[str, int] = {}
    for name, reason in kept_dense.items():
        if re.search(rf"\.({GATE_UP}|{DOWN})\.\d+$", name):
            found[reason] = found.get(reason, 0) + 1
    return found
