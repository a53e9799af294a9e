"""The checks every stage runs before it loads a model (flag values, the context length, the cost of
calibration on a CPU), shared by the stages' configs and specs.

The flags themselves are the stages' config fields (:mod:`secateurs.schema`; the shared groups in
:mod:`secateurs.stages.groups`). Nothing here imports torch or transformers at module level: the
configs that call these checks are imported for ``--help``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console

from ..data.sources import check_name
from ..errors import UsageError

if TYPE_CHECKING:
    from ..model.load import LoadedModel

err_console = Console(stderr=True)


def check_at_least(minimum: int, **flags: int | None) -> None:
    """Integer flags (given as flag_name=value; None = not given) must be at least ``minimum``."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def check_eval_flags(datasets: list[str], limit_windows: int | None, seq_len: int, seq_flag: str = "--eval-seq-len") -> None:
    """Perplexity flags, before any work (a prune must not run only for its evaluation to fail)."""
    for name in datasets:
        check_name(name)
    check_at_least(1, limit_windows=limit_windows)
    if seq_len < 2:
        raise UsageError(f"{seq_flag} must be at least 2, got {seq_len}")


def check_json_out(path: str | None, flag_name: str = "--json") -> None:
    from ..model.save import check_output_file

    if path is not None:
        check_output_file(path, flag_name)


def preflight(model: str, trust_remote_code: bool = False, pending: frozenset[str] = frozenset()) -> LoadedModel | None:
    """MODEL with weights on the meta device (config only), to check flags against its shapes; None
    for a recipe stage whose input an earlier stage has yet to write (``pending``)."""
    from ..model.load import load_skeleton

    if model in pending:
        return None
    return load_skeleton(model, trust_remote_code)


def context_length(loaded: LoadedModel) -> int | None:
    config = loaded.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_context(loaded: LoadedModel | None, **lengths: int | None) -> None:
    """Sequence lengths (flag_name=value) must fit the model's context (known from its config)."""
    limit = context_length(loaded) if loaded is not None else None
    for name, value in lengths.items():
        if limit and value is not None and value > limit:
            raise UsageError(
                f"--{name.replace('_', '-')} {value} is longer than the model's context of {limit} tokens; use at most {limit}"
            )


def calibration_seconds(loaded: LoadedModel, tokens: int, passes: int = 2) -> float:
    """A rough CPU time for ``passes`` forward passes of every block over ``tokens`` tokens: 2 FLOPs
    per block parameter per token, at the speed a short 512 × 512 matrix product runs here now
    (attention's quadratic term and the methods' own solves come on top)."""
    import torch

    blocks = loaded.spec.blocks_of(loaded.model)
    block_params = sum(p.numel() for p in blocks[0].parameters()) * len(blocks)
    a = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(8):
        a @ a
    flops_per_s = 8 * 2 * 512**3 / (time.perf_counter() - start)
    return passes * 2 * block_params * tokens / flops_per_s


def cpu_cost_note(loaded: LoadedModel | None, device: str, n_samples: int, seq_len: int) -> None:
    """On a CPU, say up front what calibration will cost (tokens, activation memory, a rough time),
    so a paper-size default (128 × 2048) is not a silent hours-long run."""
    from ..device import resolve_device

    tokens = n_samples * seq_len
    if loaded is None or tokens < 65_536 or resolve_device(device).type != "cpu":
        return
    hidden = loaded.model.config.get_text_config().hidden_size
    err_console.print(
        f"[yellow]note:[/] calibration on the CPU: {n_samples} × {seq_len} = {tokens:,} tokens, "
        f"{tokens * hidden * 4 / 2**30:.1f} GiB of activations, roughly {calibration_seconds(loaded, tokens) / 60:.0f} min "
        f"or more of block passes on this CPU; --n-samples 32 --seq-len 512 is {tokens // 16_384}× less work",
        highlight=False, soft_wrap=True,
    )
