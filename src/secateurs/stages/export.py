"""The ``export`` stage: write a secateurs output (or any HF folder) as one GGUF file for llama.cpp
(:func:`secateurs.model.gguf_export.export_gguf`). MODEL is read, never changed; the file is written
through a temporary name and a rename."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..files import output_lock, resolve_out
from ..schema import group, option
from .base import Outcome, Stage, StageConfig, Table
from .groups import LoadOptions

if TYPE_CHECKING:
    from ..model.load import LoadedModel

TYPES = ("f16", "q8_0", "bf16", "f32")  # model.gguf_export.GGUF_TYPES, named here so --help imports no torch


@dataclass
class ExportRequest(StageConfig):
    """Write MODEL as one GGUF file that llama.cpp, Ollama and llama-cpp-python run (uniform or depth-pruned; per-layer Llama widths as llama.cpp's deci; sparse ones dense with their zeros)."""

    model: str = option(help="A secateurs output or Hugging Face model folder, or smollm2-135m.", argument=True)
    gguf: str = option(help="The .gguf file to write (atomically; its folder is created).", decls=("--gguf",))
    gguf_type: str = option("f16", f"Tensor type: {', '.join(TYPES)} (norms and biases stay f32).", decls=("--type",))
    load: LoadOptions = group(LoadOptions, exclude=("dtype", "trust_remote_code"),
                              help={"overwrite": "Replace the --gguf file if it exists."})

    def __post_init__(self) -> None:
        """The input kind, the type and the output path, before any weight loads."""
        from ..model.load import SHORTCUTS

        if self.gguf_type not in TYPES:
            raise UsageError(f"--type {self.gguf_type!r} is not one GGUF export writes; use one of {', '.join(TYPES)}")
        source = Path(self.model).expanduser()
        if self.model not in SHORTCUTS and not (source / "config.json").is_file():
            raise UsageError(
                f"{self.model} is not a model folder (no config.json); export takes a secateurs output or a Hugging "
                f"Face model folder, or one of: {', '.join(SHORTCUTS)}"
            )
        if not self.gguf.endswith(".gguf"):
            raise UsageError(f"--gguf {self.gguf} must name a .gguf file, e.g. --gguf model-{self.gguf_type}.gguf")


class ExportStage(Stage):
    name = "export"
    produces_model = False  # writes one file, not a model folder
    config_class = ExportRequest

    def check_files(self, request: ExportRequest) -> None:
        """The GGUF file: a file name, not over an existing file unless --overwrite, its folder writable."""
        from ..model.save import check_output_file

        target = check_output_file(request.gguf, "--gguf")
        if target.exists() and not request.overwrite:
            raise UsageError(f"--gguf {request.gguf} already exists; pass --overwrite or choose another file")

    def check_model(self, request: ExportRequest, skeleton: LoadedModel | None) -> None:
        """The architecture llama.cpp must know, and one width per layer, from the config alone (a recipe's
        model not written yet is checked when it is exported)."""
        from ..model.gguf_export import check_exportable

        if skeleton is not None:
            check_exportable(skeleton.model.config)

    def needs_text(self, request: ExportRequest) -> bool:
        return True  # the tokenizer goes into the file: llama.cpp cannot run a model without one

    def execute(self, request: ExportRequest) -> Outcome:
        """Load MODEL in float32 and write the GGUF file under the file's lock."""
        from ..model.gguf_export import export_gguf

        loaded = self.load(request)
        with output_lock(resolve_out(request.gguf, "--gguf"), "--gguf"):
            report = export_gguf(loaded, request.gguf, request.gguf_type)
        types = ", ".join(f"{count} {kind}" for kind, count in sorted(report.tensor_types.items()))
        rows = [
            ["llama.cpp architecture", report.arch],
            ["layers", str(report.n_layers)],
            ["tensors", f"{report.n_tensors} ({types})"],
            ["size (MiB)", f"{report.bytes / 2**20:.1f}"],
            ["saved to", str(report.path)],
        ]
        notes = [f"[yellow]note:[/] {note}" for note in report.notes]
        return Outcome([Table(f"secateurs export {request.model} ({report.gguf_type})", ["", "value"], rows, notes)],
                       report.path)
