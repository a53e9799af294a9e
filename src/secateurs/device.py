"""One device resolver for every verb, so ``--device`` means the same thing everywhere."""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is the current CUDA GPU when one is visible, else the CPU; anything else must parse as a
    torch device that exists here, or the user gets a one-line error naming the fix."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device
