"""The pruning request, :class:`PruneConfig`: light (no torch), since ``secateurs prune``'s method flags
are derived from its fields (:mod:`secateurs.schema`) and ``--help`` must not import torch. The verb
that runs it is :mod:`secateurs.sparsity.prune`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..options import parse_options
from ..schema import option
from .registry import method_names

if TYPE_CHECKING:
    from ..data.config import CalibConfig
    from .reconstruct import ReconstructOptions


def parse_sparsity(text: str | float | None) -> float | list[float] | None:
    """``0.5`` or a per-block schedule ``0.4,0.5,0.6,...``."""
    if text is None or isinstance(text, float):
        return text
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--sparsity {text!r} is not a number or a comma-separated list of numbers") from None
    if not values:
        raise UsageError("--sparsity is empty")
    return values[0] if len(values) == 1 else values


def parse_reconstruct(text: str | None) -> dict[str, str] | None:
    """``--reconstruct``: ``off`` (or absent), ``on`` (the defaults), or ``steps=N,lr=X,batch=B``."""
    if text is None or text.strip().lower() in ("", "off", "false", "no"):
        return None
    if text.strip().lower() in ("on", "true", "yes", "default"):
        return {}
    values = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--reconstruct {text!r}: use on, off, or key=value pairs like steps=32,lr=0.01")
        values[key.strip()] = value.strip()
    return values


def parse_moe(text: str | dict | None) -> dict[str, Any]:
    """``--moe``: ``key=value`` pairs, comma-separated (``fallback=pooled,min_tokens=32``); a recipe
    may give the mapping itself."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    values = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--moe {text!r}: use key=value pairs like fallback=pooled,min_tokens=32,routers=true")
        values[key.strip()] = value.strip()
    return values


EXPERT_FALLBACKS = ("magnitude", "pooled")


@dataclass(frozen=True)
class MoeOptions:
    """How a prune treats a mixture-of-experts model's parts (``--moe key=value,...``; no effect on a
    dense model).

    ``min_tokens``: a routed expert whose matrices saw fewer calibration tokens than this is pruned
    by ``fallback`` instead of its own statistics (too few tokens give a noisy norm and a rank-
    deficient Hessian; none give no score at all): ``magnitude`` (as if its inputs were white: |W| for Wanda and SparseGPT)
    or ``pooled`` (the statistics of all the layer's experts summed, for that matrix). Such experts
    are listed in the stage record and the report. ``routers``: prune the routers too (off: a router
    is under 0.1% of a block's weights, and an error there reroutes tokens to other experts, so the
    routers stay dense, as the issue asks). ``shared``: prune the shared experts (on: every token
    reaches them, so their statistics are as well determined as a dense MLP's, and MoE-Pruner and
    the dense methods treat them as ordinary linears). ``weighted``: scale each routed token's input
    by its routing weight, the factor the block applies to that expert's output (MoE-Pruner, Xie et
    al. 2024); off keeps Wanda's and SparseGPT's own statistics over the routed tokens.
    """

    fallback: str = "magnitude"
    min_tokens: int = 16
    routers: bool = False
    shared: bool = True
    weighted: bool = False

    def validate(self) -> MoeOptions:
        if self.fallback not in EXPERT_FALLBACKS:
            raise UsageError(f"--moe fallback={self.fallback!r} is not known; use one of {', '.join(EXPERT_FALLBACKS)}")
        if self.min_tokens < 1:
            raise UsageError(f"--moe min_tokens must be at least 1, got {self.min_tokens}")
        return self


ALLOCATIONS = ("uniform", "owl", "atp")  # owl: sparsity/owl.py, atp: sparsity/atp.py


@dataclass(frozen=True)
class OwlOptions:
    """OWL's budget: a weight is an outlier above ``m`` × its block's mean Wanda score; block
    sparsities stay within the target ± ``lam``."""

    m: float = 5.0
    lam: float = 0.08


@dataclass(frozen=True)
class AtpOptions:
    """``spread``: last block's sparsity minus the first's (≥ 0); None searches it over
    ``CANDIDATE_SPREADS`` on the first ``search_samples`` calibration windows."""

    spread: float | None = None
    search_samples: int = 8

    def validate(self) -> AtpOptions:
        if self.spread is not None and not 0.0 <= self.spread < 1.0:
            raise UsageError(f"--atp-spread must be in [0, 1) (last block's sparsity minus the first's), got {self.spread:g}")
        if self.search_samples < 1:
            raise UsageError(f"ATP search_samples must be ≥ 1, got {self.search_samples}")
        return self


@dataclass
class PruneConfig:
    """An unstructured / N:M pruning request. ``sparsity`` may be one value or one per block."""

    method: str = option("magnitude", f"One of: {', '.join(method_names())}.")
    sparsity: float | list[float] | None = option(
        None,
        "Fraction of weights to remove in [0, 1), or one value per block, comma-separated. Default 0.5; N:M implies 1-N/M.",
        parse=parse_sparsity,
    )
    pattern: str = option("unstructured", "unstructured, 2:4, 4:8, 8:16 or any N:M.")
    options: dict[str, Any] = option(
        help="Method option key=value (repeatable).", decls=("--option", "-o"), parse=parse_options, cli=list[str] | None,
        default_factory=dict,
    )
    # How one --sparsity value is spread over blocks: "uniform", "owl" (outlier-weighted, with
    # allocation_options m / lam, see sparsity/owl.py) or "atp" (rising with depth, allocation_options
    # spread / search_samples, see sparsity/atp.py).
    allocation: str = option(
        "uniform", "Spread --sparsity over blocks: uniform, owl (outlier-weighted, needs --calib) or atp (rising with depth)."
    )
    allocation_options: dict[str, Any] = field(default_factory=dict)
    # Block-level steps around the method. ``reconstruct``: None (off) or the options of the
    # reconstruction that trains each pruned block to reproduce the dense one ({} = the measured
    # defaults; keys steps / lr / batch / holdout / check, see sparsity/reconstruct.py). ``permute``: reorder the MLP's
    # hidden channels before N:M masks are chosen (N:M only, see sparsity/permute.py).
    reconstruct: dict[str, Any] | None = option(
        None,
        "After each block's masks are fixed, train its kept weights to reproduce the dense block, keeping them only where a held-out calibration share says the block got better (needs --calib): on, or steps=N,lr=X (relative to each matrix's RMS),batch=B,holdout=F,check=K.",
        parse=parse_reconstruct,
    )
    permute: bool = option(
        False, "N:M only: permute the MLP's hidden channels before choosing groups (folded back: a plain N:M model)."
    )
    moe: dict[str, Any] = option(
        help="Mixture-of-experts models: key=value pairs, comma-separated: fallback=magnitude|pooled (an expert with fewer than min_tokens=16 calibration tokens is pruned by it, and listed), routers=false, shared=true, weighted=false (scale routed inputs by their routing weight).",
        parse=parse_moe, default_factory=dict,
    )

    def moe_options(self) -> MoeOptions:
        """``moe`` as its typed, checked options."""
        from ..options import build_options

        return build_options(MoeOptions, self.moe).validate()

    def check(self, calib: CalibConfig | None) -> ReconstructOptions | None:
        """Validate what needs no model (allocation, permutation, reconstruction), so the CLI can do it
        before loading; returns the reconstruction's settings (None when off)."""
        from ..options import build_options
        from .masks import Pattern
        from .reconstruct import ReconstructOptions

        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
        self.moe_options()
        if self.allocation == "atp":
            atp = build_options(AtpOptions, self.allocation_options).validate()
            if Pattern.parse(self.pattern).is_nm:
                raise UsageError(f"--allocation atp sets unstructured per-block sparsity; {self.pattern} fixes it, use --pattern unstructured")
            if atp.spread is None and calib is None:
                raise UsageError("--allocation atp searches its spread on calibration data: pass --calib or --atp-spread")
        if self.permute and not Pattern.parse(self.pattern).is_nm:
            raise UsageError("--permute reorders channels to choose better N:M groups; use it with --pattern N:M (e.g. 2:4)")
        if self.reconstruct is None:
            return None
        options = ReconstructOptions.build(self.reconstruct)
        if calib is None:
            raise UsageError("--reconstruct trains each pruned block on calibration activations: pass --calib (e.g. wikitext2)")
        return options
