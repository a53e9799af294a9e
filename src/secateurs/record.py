"""What goes into ``secateurs.json``: the stages run, with which data and seed, and the results."""

from __future__ import annotations

import platform
import resource
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import torch


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("secateurs", "torch", "transformers", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def build_record(source: str, stages: list[dict], results: dict | None = None) -> dict:
    return {
        "tool": "secateurs",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": source,
        "versions": versions(),
        "stages": stages,
        "results": results or {},
    }
