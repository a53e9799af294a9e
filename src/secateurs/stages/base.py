"""One runner for every stage: flags → typed request → checks → load → verb → evaluate → save.

A stage's request is its config, a :class:`StageConfig` dataclass: its fields and groups are the
stage's flags and recipe keys (:mod:`secateurs.schema`), and its ``__post_init__`` checks everything
that needs no model. A :class:`Stage` is a small spec: ``config_class`` names that config;
``check_model`` checks it against the model's shapes; ``apply`` calls the API verb; ``rows``
summarise its report. :func:`check` and :meth:`Stage.execute` do the rest the same way for every
stage, so the CLI command, a recipe stage and a Python caller of :func:`secateurs.stages.run` all
produce the same folder, ``secateurs.json`` and summary.

The stage modules import torch, transformers and the API inside the steps that run the work, never at
module level: the CLI builds its commands (and ``--help``) from the configs' fields, and showing them
must not cost seconds of imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..data.config import CalibConfig
from ..engine.options import EngineOptions
from ..errors import UsageError
from ..files import output_lock, resolve_out
from ..schema import group
from .flags import check_at_least, check_context, cpu_cost_note, err_console, preflight
from .groups import Evaluation, LoadOptions, evaluation_after, model_argument, out_option

if TYPE_CHECKING:
    from ..model.load import LoadedModel


class StageConfig:
    """The base of a stage's config: the whole request, from which its flags and recipe keys are
    derived. Subclasses are dataclasses with ``model``, a ``load`` group and their own fields; what a
    stage kind lacks (no OUT, no calibration) reads as None here."""

    spec: ClassVar[type[Stage]]  # set by the Stage subclass naming this class its config_class
    out = None
    calib = None
    nproc = 1  # processes to run it in (prune's --nproc): started by run_command(), never by the stage
    load: LoadOptions

    @property
    def stage(self) -> Stage:
        """A fresh spec for this request, so a spec may hold one run's state (prune's process group)."""
        return self.spec()

    @property
    def dtype(self) -> str:
        return self.load.dtype

    @property
    def overwrite(self) -> bool:
        return self.load.overwrite

    @property
    def trust_remote_code(self) -> bool:
        return self.load.trust_remote_code

    def check_windows(self, skeleton: LoadedModel) -> None:
        """A calibrated stage's windows against the model: calibration and evaluation lengths within its
        context, and a note of what calibrating would cost on the CPU."""
        calib, evaluation = self.calib, self.evaluation
        check_context(skeleton, seq_len=calib.seq_len if calib else None,
                      eval_seq_len=evaluation.seq_len if evaluation.datasets else None)
        if calib is not None:
            cpu_cost_note(skeleton, self.engine.device, calib.n_samples, calib.seq_len)


@dataclass
class CalibratedRequest(StageConfig):
    """A model-writing stage whose method calibrates with a :class:`CalibConfig` as given: MODEL, OUT,
    the method's ``config`` (each subclass declares its own group), calibration, engine, perplexity
    after, loading. One ``__post_init__`` checks all that needs no model, before any weight loads."""

    model: str = model_argument()
    out: str = out_option()
    config: Any = None  # the stage's method config: a group() each subclass declares
    calib: CalibConfig = group(CalibConfig, rename={"source": "calib"})
    engine: EngineOptions = group(EngineOptions, exclude=("offload_activations",))
    evaluation: Evaluation = evaluation_after()
    load: LoadOptions = group(LoadOptions)

    def __post_init__(self) -> None:
        """Everything that needs no model, checked once, before any weight loads."""
        self.config.validate()
        self.calib.validate()
        self.engine.torch_device()
        self.evaluation.check()
        check_at_least(1, batch_size=self.engine.batch_size)


@dataclass
class Table:
    """A summary table; ``notes`` (rich markup) are warnings shown on stderr before it."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """What a stage did, for whoever shows it: tables, the folder written, lines after the tables,
    and ``failed`` when nothing could be measured (the CLI exits 2)."""

    tables: list[Table]
    path: Path | None = None
    footer: list[str] = field(default_factory=list)
    failed: bool = False


class Stage:
    """One stage kind. Subclasses define ``config_class`` and the steps below."""

    name: ClassVar[str]
    produces_model: ClassVar[bool] = True  # writes a model folder (OUT); else a measuring stage
    reads_shapes: ClassVar[bool] = True  # checks its flags against the model's config (meta skeleton)

    # The stage's config: the whole request, its flags and recipe keys derived from its fields.
    config_class: ClassVar[type[StageConfig]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            cls.config_class.spec = cls

    def parse(self, *values: Any, **flags: Any) -> StageConfig:
        """Flag values (the command line's, a recipe's; positional ones fill the first flags, MODEL and
        OUT) as this stage's config, validated."""
        from ..schema import build
        from ..schema import flags as schema_flags

        return build(self.config_class, {**dict(zip(schema_flags(self.config_class), values)), **flags})

    def check_files(self, request: StageConfig) -> None:
        """Outputs other than OUT (checkpoint folders), checked right after OUT."""

    def check_model(self, request: StageConfig, skeleton: LoadedModel | None) -> None:
        """Checks against the model's shapes; ``skeleton`` None when an earlier recipe stage writes it."""

    def needs_text(self, request: StageConfig) -> bool:
        """Whether the stage turns text into tokens (calibration or evaluation text), so MODEL needs a tokenizer."""
        calib = request.calib
        return bool(request.evaluation.datasets) or (calib is not None and calib.source != "self")

    def apply(self, loaded: LoadedModel, request: StageConfig) -> Any:
        """Run the API verb in place; returns its report (None: this process does not write)."""
        raise NotImplementedError

    def head(self, request: StageConfig) -> list[list[str]]:
        return []

    def rows(self, request: StageConfig, report: Any) -> list[list[str]]:
        return []

    def notes(self, request: StageConfig, report: Any) -> list[str]:
        """Warnings the verb returned with its report (rich markup), shown before the summary table."""
        return []

    def records(self, loaded: LoadedModel, request: StageConfig, report: Any) -> tuple[list, list[list[str]]]:
        """The stages to record (records or reports, see :func:`secateurs.api.save`) and rows they add."""
        return [report], []

    def finish(self, request: StageConfig) -> None:
        """After a successful save (e.g. remove training checkpoints)."""

    def title(self, request: StageConfig) -> str:
        return f"secateurs {self.name}"

    def load(self, request: StageConfig) -> LoadedModel:
        """The model, loaded only after every check passed."""
        from ..model.load import load_model

        loaded = load_model(request.model, request.dtype, request.trust_remote_code)
        if self.produces_model:  # it edits weights, which methods read as ``.weight``: a sparse export goes dense
            from ..kernels.linear import note
            from ..kernels.swap import densify

            expanded = densify(loaded.model, request.model, self.name)
            if expanded:
                note(f"{request.model} is a sparse export: its {expanded} sparse layers are expanded to dense ones "
                     f"(zeros kept) for secateurs {self.name}")
        return loaded

    def execute(self, request: StageConfig) -> Outcome | None:
        """load → verb → evaluate → save; None on a process that does not write (a distributed rank)."""
        from ..api import save
        from ..model.save import check_out

        loaded = self.load(request)
        check_out(request.out, loaded.local_path, request.overwrite)
        rows, results = self.head(request), {}
        evaluation = request.evaluation
        if evaluation.before:
            new_rows, new_results = evaluation.measure(loaded, " before", "_before")
            rows += new_rows
            results.update(new_results)
        report = self.apply(loaded, request)
        if report is None:
            return None
        rows += self.rows(request, report)
        new_rows, new_results = evaluation.measure(loaded, " after" if evaluation.before else "")
        rows += new_rows
        results.update(new_results)
        stages, more = self.records(loaded, request, report)
        save_format = getattr(request, "save_format", "hf")  # the width stage's --save-format
        path = save(loaded, request.out, stages, results, request.overwrite, save_format=save_format)
        self.finish(request)
        rows += more + [["saved to", str(path)]]
        return Outcome([Table(self.title(request), ["", "value"], rows, self.notes(request, report))], path)


def check(request: StageConfig, pending: frozenset[str] | None = None) -> None:
    """Everything that can be known before the weights load: OUT, other outputs, the model's shapes.

    ``pending`` (a recipe being planned): models earlier stages will write, checked without a model;
    OUT may exist then, since the runner removes a stage's old output before it reruns the stage.
    """
    from ..model.load import model_bytes
    from ..model.save import check_output

    stage = request.stage
    planning = pending is not None
    pending = pending or frozenset()
    if stage.produces_model:
        size = None if request.model in pending else model_bytes(request.model, request.dtype)
        check_output(request.out, request.model, request.overwrite or planning, size)
    stage.check_files(request)
    skeleton = preflight(request.model, request.trust_remote_code, pending) if stage.reads_shapes else None
    stage.check_model(request, skeleton)
    if request.model not in pending:
        _check_tokenizer(request)


def _check_tokenizer(request: StageConfig) -> None:
    """A damaged tokenizer is refused, and a missing one where text is needed; a stage that writes a
    model from a folder with none says so once, since OUT will have none either."""
    from ..model.load import check_tokenizer

    needed = request.stage.needs_text(request)
    if not check_tokenizer(request.model, request.trust_remote_code, needed) and request.stage.produces_model:
        err_console.print(
            f"[yellow]note:[/] {request.model} has no tokenizer, so OUT will have none; copy the tokenizer files of "
            "the model it came from into OUT to evaluate it",
            highlight=False, soft_wrap=True,
        )


def run(request: StageConfig) -> Outcome | None:
    """Check, then execute under OUT's lock: what ``secateurs <stage>`` does after parsing its flags.

    The lock (:func:`secateurs.files.output_lock`) is taken once the pre-flight checks pass and held to
    the final rename, so a second run into the same OUT (or ``.OUT.partial``) stops with one line;
    OUT's checks run again under it when the model is saved. A request for several processes is
    refused here unless this process is already one of torchrun's ranks: only :func:`run_command`,
    which has the flags to start them with, starts them."""
    if needs_launch(request):
        raise UsageError(
            f"nproc={request.nproc} runs under torchrun: start this script with `torchrun --nproc-per-node "
            f"{request.nproc}` and nproc=1, or run `secateurs {request.stage.name} ... --nproc {request.nproc}`"
        )
    check(request)
    with _output_lock(request):
        return request.stage.execute(request)


def needs_launch(request: StageConfig) -> bool:
    """Whether the request asks for more processes than this one (which is not a torchrun rank)."""
    if request.nproc == 1:
        return False
    from ..engine.distributed import launched_by_torchrun

    return not launched_by_torchrun()


def run_command(request: StageConfig, values: Mapping[str, Any]) -> Outcome | None:
    """What ``secateurs <stage>`` does with the request it built from flag values ``values`` (the
    command line's, a recipe stage's): :func:`run` it here, or, for ``nproc`` > 1, run exactly this
    stage across that many processes: checked here, then, under OUT's lock (which rank 0 writes
    under), ``python -m secateurs <stage>`` with the same flags but ``--nproc``
    (:func:`secateurs.schema.argv`) under torchrun. The ranks show the summary; None is returned then."""
    from ..engine.distributed import relaunch
    from ..schema import argv

    if not needs_launch(request):
        return run(request)
    check(request)
    flags = {name: value for name, value in values.items() if name != "nproc"}  # a rank runs its own share
    with _output_lock(request):
        relaunch(request.nproc, [request.stage.name, *argv(type(request), flags)])
    return None


def _output_lock(request: StageConfig) -> AbstractContextManager[None]:
    if not request.stage.produces_model or not request.out:
        return nullcontext()
    return output_lock(resolve_out(request.out))


class CalibratedStage(Stage):
    """A stage that calibrates on MODEL: its own checks against the model's shapes (:meth:`check_shapes`),
    then its calibration and evaluation windows against the model's context; nothing to check before
    an earlier recipe stage writes the model."""

    def check_model(self, request: StageConfig, skeleton: LoadedModel | None) -> None:
        if skeleton is None:
            return
        self.check_shapes(request, skeleton)
        request.check_windows(skeleton)

    def check_shapes(self, request: StageConfig, skeleton: LoadedModel) -> None:
        """The stage's own checks against the model's shapes, before any weight loads."""
