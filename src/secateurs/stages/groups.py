"""The flag groups every stage shares, each defined once as a typed config (:mod:`secateurs.schema`):
:class:`LoadOptions` (how MODEL is read and OUT written), :class:`Evaluation` (perplexity measured
after a stage), beside :class:`secateurs.data.config.CalibConfig` and
:class:`secateurs.engine.options.EngineOptions`.

Light like the rest of the stage specs: the CLI derives every command's flags (and ``--help``) from
these fields without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data.config import CalibConfig
from ..engine.options import EngineOptions
from ..schema import group, help_of, option
from .flags import check_eval_flags

if TYPE_CHECKING:
    from ..model.load import LoadedModel


def csv_list(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


def perplexity_rows(measured: dict, label: str = "", key_suffix: str = "") -> tuple[list[list[str]], dict]:
    """Table rows and ``secateurs.json`` results for ``evaluate_perplexity`` output (shared by every stage)."""
    rows, results = [], {}
    for name, value in measured.items():
        failed = isinstance(value, str)
        rows.append([f"{name} perplexity{label}", "unavailable" if failed else f"{value.ppl:.3f}"])
        results[f"ppl_{name}{key_suffix}"] = {"error": value} if failed else value.to_dict()
    return rows, results


@dataclass
class LoadOptions:
    """How MODEL is loaded and OUT written."""

    dtype: str = option("float32", "Weights dtype: float32, bfloat16 or float16.")
    trust_remote_code: bool = option(
        False,
        "Let transformers run Python code shipped in the model folder or hub repo (never needed for secateurs outputs). Read that code first.",
    )
    overwrite: bool = option(False, "Replace OUT if it exists.")


@dataclass
class Evaluation:
    """Perplexity measured after a stage (``before``: also before it), shown and recorded in secateurs.json."""

    datasets: list[str] = option(
        help="After pruning, measure perplexity on these datasets (comma-separated) and record it.",
        parse=csv_list, default_factory=list,
    )
    seq_len: int = option(2048, "Window length for --ppl.")
    limit_windows: int | None = option(None, "Evaluate only the first N windows.")
    # Shared with the calibration and the engine: their defaults and wording, not restated.
    data_dir: str | None = option(CalibConfig.data_dir, help_of(CalibConfig, "data_dir"), decls=("--data-dir",))
    device: str = option(EngineOptions.device, help_of(EngineOptions, "device"))
    batch_size: int = option(EngineOptions.batch_size, help_of(EngineOptions, "batch_size"))
    before: bool = option(False, "Also measure perplexity before the stage.")

    def check(self, seq_flag: str = "--eval-seq-len") -> None:
        """The perplexity flags, before any work (a stage must not run only for its evaluation to fail);
        ``seq_flag``: how this stage spells ``seq_len``."""
        check_eval_flags(self.datasets, self.limit_windows, self.seq_len, seq_flag)

    def measure(self, loaded: LoadedModel, label: str = "", key_suffix: str = "") -> tuple[list[list[str]], dict]:
        from ..api import evaluate_perplexity

        if not self.datasets:
            return [], {}
        measured = evaluate_perplexity(loaded, self.datasets, self.seq_len, self.limit_windows, self.data_dir,
                                       self.device, self.batch_size)
        return perplexity_rows(measured, label, key_suffix)


MODEL_HELP = "HF folder, hub id, .gguf file, or smollm2-135m."


def model_argument(help: str = MODEL_HELP) -> Any:
    """A stage's MODEL: the positional argument every stage takes first."""
    return option(help=help, argument=True)


def out_option() -> Any:
    """A model-writing stage's ``--out`` (second positional value when a stage is parsed from Python)."""
    return option(help="Output folder (written atomically).", decls=("--out",))


def evaluation_after(exclude: tuple[str, ...] = ("before",), help: str | None = None) -> Any:
    """The perplexity measured after a model-writing stage, spelled ``--ppl`` / ``--eval-seq-len`` beside
    the stage's own calibration ``--seq-len``; ``help``: the stage's wording of ``--ppl``."""
    return group(Evaluation, rename={"datasets": "ppl", "seq_len": "eval_seq_len"}, exclude=exclude,
                 help={"datasets": help} if help else None)
