"""The depth-pruning request, :class:`LayerConfig`: light (no torch), since ``secateurs layers``'s
method flags are derived from its fields (:mod:`secateurs.schema`) and ``--help`` must not import
torch. The verb that runs it is :mod:`secateurs.depth.prune`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..options import parse_options
from ..schema import option
from .registry import scorer_names


@dataclass
class LayerConfig:
    """A depth-pruning request: criterion, how many layers, and whether to compensate."""

    method: str = option("gradmap", f"Layer criterion: {', '.join(scorer_names())}.")
    remove: int = option(1, "Number of decoder layers to remove.", decls=("--remove",))
    compensate: bool = option(
        False, "Fit GradMAP's projection compensation and fold it into a down projection.", decls=("--compensate",)
    )
    options: dict[str, Any] = option(
        help="Criterion option key=value (repeatable).", decls=("--option", "-o"), parse=parse_options,
        cli=list[str] | None, default_factory=dict,
    )
    compensation: dict[str, Any] = option(
        help="Compensation option key=value (shift, alpha, select, accept).", decls=("--compensation-option",),
        parse=parse_options, cli=list[str] | None, default_factory=dict,
    )

    def validate(self) -> None:
        """Criterion name, option keys and compensation values: checked before the model loads."""
        from ..options import build_options
        from .compensation import CompensationOptions
        from .registry import scorer_class

        cls = scorer_class(self.method)
        build_options(cls.Options, self.options)
        build_options(CompensationOptions, self.compensation).validate()
