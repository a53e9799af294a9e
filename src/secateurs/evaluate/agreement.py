"""How far a pruned model's predictions moved from the dense model's, on the same tokens.

Needs no labelled data: KL(dense ‖ pruned) of the next-token distributions and top-1 agreement,
averaged over every position. Together with perplexity on held-out text these make an evaluation
that works with no dataset at all (the embedded default of the main job).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Agreement:
    kl: float
    top1: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def agreement(
    model: nn.Module,
    reference: nn.Module,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
) -> Agreement:
    """Mean KL(reference ‖ model) and top-1 agreement over all positions of ``windows``."""
    device = torch.device(device)
    kl_sum, agree, count = 0.0, 0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        p_log = F.log_softmax(reference(input_ids=batch, use_cache=False).logits.float(), dim=-1)
        q_log = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
        kl_sum += (p_log.exp() * (p_log - q_log)).sum(dim=-1).sum().item()
        agree += (p_log.argmax(-1) == q_log.argmax(-1)).sum().item()
        count += batch.numel()
    return Agreement(kl_sum / count, agree / count, count)
