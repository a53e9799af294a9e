"""Run by torchrun from test_distributed.py: one rank of a gloo job pruning tiny models.

Each case prunes a fresh tiny model on this rank's share of the calibration samples and saves the
resulting weights (and OWL's schedule) to OUT/rank<r>.pt, so the test can compare ranks with each
other and with a one-process run. ``die`` makes rank 1 exit abruptly in the middle of the loop; ``one`` runs only the Wanda case.
"""

from __future__ import annotations

import os
import sys

import torch
from tiny_models import random_ids, tiny_model

from secateurs.engine.distributed import DistributedHooks, init_from_env
from secateurs.engine.sequential import EngineOptions, run_blocks
from secateurs.sparsity.base import SparsityTarget
from secateurs.sparsity.owl import OwlOptions, owl_target
from secateurs.sparsity.registry import method_class

CASES = [("llama", "magnitude", 2), ("llama", "wanda", 2), ("llama", "sparsegpt", 2), ("gpt2", "sparsegpt", 2),
         ("llama", "wanda", 5), ("llama", "sparsegpt", 5),
         # MoE: expert views of fused parameters shared out between ranks (gpt-oss stores them transposed)
         ("qwen2_moe", "wanda", 2), ("gpt_oss", "sparsegpt", 2)]


def run_case(arch: str, method: str, n_samples: int, engine: EngineOptions,
             hooks: DistributedHooks | None = None) -> dict[str, torch.Tensor]:
    """The case's pruned weights; shared with the test for the one-process reference."""
    loaded = tiny_model(arch)
    spec = loaded.spec
    target = SparsityTarget.build(0.5, "unstructured", spec.num_layers(loaded.model.config))
    pruner = method_class(method)(target)
    run_blocks(loaded.model, spec, pruner, random_ids(n_samples, 16, seed=1), engine, hooks=hooks)
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def owl_schedule(engine: EngineOptions, hooks: DistributedHooks | None = None) -> list[float]:
    loaded = tiny_model("llama")
    target = SparsityTarget.build(0.6, "unstructured", 3)
    return list(owl_target(loaded.model, loaded.spec, target, random_ids(2, 16, seed=1), engine, OwlOptions(), hooks).per_block)


def main(out: str, mode: str) -> None:
    group = init_from_env(torch.device("cpu"))
    assert group is not None and group.backend == "gloo"
    engine, hooks = EngineOptions(device="cpu"), DistributedHooks(group)
    if mode == "die":
        original = DistributedHooks.reduce_stats

        def dies(self, index, stats):
            if index == 1 and group.rank == 1:
                os._exit(3)
            original(self, index, stats)

        DistributedHooks.reduce_stats = dies
    cases = CASES if mode != "one" else [("llama", "wanda", 2)]
    results = {f"{a}-{m}-{n}": run_case(a, m, n, engine, hooks) for a, m, n in cases}
    if mode != "one":
        results["owl"] = owl_schedule(engine, hooks)
    torch.save(results, os.path.join(out, f"rank{group.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ok")
