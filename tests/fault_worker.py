"""One rank of a two-process streamed Wanda prune, started by test_distributed_faults.py with
torchrun's environment (no torchrun agent, so nothing but our own code stops a rank whose peer died).

``die`` makes rank 1 exit abruptly while the ranks sum block 2's statistics; a secateurs error is
printed as the CLI prints it (``error: …``, exit code 2).
"""

from __future__ import annotations

import os
import sys

import torch

from secateurs.api import PruneConfig, prune_streamed
from secateurs.data.calib import CalibConfig
from secateurs.engine.distributed import DistributedHooks, init_from_env
from secateurs.engine.sequential import EngineOptions
from secateurs.errors import SecateursError


def main(mode: str, folder: str, out: str, calib: str, n_samples: str) -> None:
    try:
        group = init_from_env(torch.device("cpu"))
        assert group is not None
        if mode == "die" and group.rank == 1:
            original = DistributedHooks.reduce_stats

            def dies(self, index, stats):
                if index == 2:
                    os._exit(3)
                original(self, index, stats)

            DistributedHooks.reduce_stats = dies
        prune_streamed(folder, out, PruneConfig("wanda", 0.5), CalibConfig(calib, int(n_samples), 16, 0),
                       EngineOptions(device="cpu"), "float32", False, group, DistributedHooks(group))
    except SecateursError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(*sys.argv[1:6])
