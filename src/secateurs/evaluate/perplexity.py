"""Perplexity the way the pruning papers measure it (SparseGPT, Wanda, LLM-Pruner).

The test split is joined into one string, tokenized once, and cut into non-overlapping windows of
``seq_len`` tokens (the tail shorter than a window is dropped); perplexity is exp of the mean
next-token loss over every predicted token of every window. ``limit_windows`` evaluates only the
first N windows (a fast, still comparable subset when two runs use the same N).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NumericalError, UsageError
from ..progress import track


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    windows: int
    seq_len: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows_of(ids: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len) windows of a 1-D id tensor."""
    n = ids.numel() // seq_len
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit-windows must be at least 1, got {limit}")
        n = min(n, limit)
    if n == 0:
        raise UsageError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def token_losses(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1,
                 description: str = "perplexity"):
    """Yield per-window mean next-token losses (float32), batch by batch."""
    for batch in track(windows.split(batch_size), description, total=math.ceil(len(windows) / batch_size)):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).reshape(batch.shape[0], -1)
        yield loss.mean(dim=1).cpu()


def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 2048,
    limit_windows: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
) -> Perplexity:
    """Perplexity of ``model`` over non-overlapping windows of the 1-D token ids ``ids``."""
    windows = windows_of(ids, seq_len, limit_windows)
    losses = torch.cat(list(token_losses(model, windows, torch.device(device), batch_size)))
    mean = losses.mean().item()
    if not math.isfinite(mean):
        raise NumericalError("the model's loss is NaN or inf on the evaluation text")
    return Perplexity(math.exp(mean), len(windows), seq_len, len(windows) * (seq_len - 1))
