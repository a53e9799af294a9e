"""The calibration request, :class:`CalibConfig`: light (no torch), since every stage that calibrates
derives its ``--calib`` / ``--n-samples`` / ``--seq-len`` / ``--seed`` / ``--data-dir`` flags from
its fields (:mod:`secateurs.schema`) and ``--help`` must not import torch. Reading the text and
cutting the windows is :mod:`secateurs.data.calib`'s job."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..schema import option
from .sources import check_name


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration text comes from and how much of it (papers' defaults: 128 × 2048)."""

    source: str = option(
        "wikitext2", "Calibration data: wikitext2, ptb, c4, self, or a .txt/.jsonl path. Methods that need data require it."
    )
    n_samples: int = option(128, "Calibration sequences.")
    seq_len: int = option(2048, "Tokens per calibration sequence.")
    seed: int = option(0, "Seed for calibration sampling.")
    data_dir: str | None = option(None, "Folder with local dataset copies (default: $SECATEURS_DATA).", decls=("--data-dir",))

    def validate(self) -> None:
        if self.n_samples < 1:
            raise UsageError(f"--n-samples must be at least 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.seq_len}")
        check_name(self.source, allow_self=True)
