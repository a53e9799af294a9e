"""Calibration spread over processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Every rank holds the model (or streams it) and runs the same block loop. What differs per rank:

- its share of the calibration samples (contiguous slices, so ranks differ by at most one sample);
- nothing else: after each block's statistics pass the accumulators' sums and token counts are
  all-reduced, so every rank sees the statistics of all samples, exactly as one process would up to
  the order of the floating-point additions;
- the solves of a block are shared out (largest first, to the least loaded rank) when the method
  allows it (``BlockMethod.splits_by_linear``), then each pruned weight is broadcast from the rank
  that computed it, so every rank ends the block with the same weights.

The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``…),
so a multi-node launch through torchrun's rendezvous needs no change here. Only rank 0 writes.

A rank that dies or hangs must not leave the others waiting forever or dying with a traceback:
every collective runs under the group's timeout (``SECATEURS_DIST_TIMEOUT``), and a failed one
(gloo reports a closed connection at once, a silent peer after the timeout) becomes
:class:`RankLost`, one line that names the rank, the block and the rerun that resumes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SecateursError, UsageError
from ..model.linear import weight_matrix
from .sequential import BlockMethod, EngineHooks, Stats

# Seconds a collective waits for a silent rank before failing (a rank that died fails the others).
TIMEOUT_ENV = "SECATEURS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


class RankLost(SecateursError):
    """Another rank of the job died or stopped answering; this one stops too, with one line."""


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the job."""

    rank: int
    world: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def choose_backend(device: torch.device) -> str:
    """NCCL for CUDA when this torch has it, else gloo (which also moves CUDA tensors, more slowly)."""
    if device.type == "cuda":
        if dist.is_nccl_available():
            return "nccl"
        print("secateurs: NCCL is not available in this torch build; using gloo for GPU tensors", file=sys.stderr)
    if not dist.is_gloo_available():
        raise UsageError("this torch build has neither NCCL nor gloo; install a standard torch wheel")
    return "gloo"


def init_from_env(device: torch.device) -> RankGroup | None:
    """Join the process group torchrun described; None when this is a one-process run.

    On CUDA each rank takes the GPU of its ``LOCAL_RANK``, so ``--device cuda`` means "my GPU".
    """
    if not launched_by_torchrun():
        return None
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); use --nproc ≤ the GPU count"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        seconds = int(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        backend = choose_backend(device)
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
        except dist.DistError as exc:
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise UsageError(
                f"rank {os.environ.get('RANK', '?')} could not join the {os.environ.get('WORLD_SIZE')}-process job "
                f"at {where} within {seconds} s ({str(exc).splitlines()[0]}); start every process, check that "
                f"the address is reachable, or raise {TIMEOUT_ENV}"
            ) from exc
    return RankGroup(dist.get_rank(), dist.get_world_size(), dist.get_backend())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_samples(n_samples: int, world: int) -> None:
    """Every rank needs at least one calibration sample (checked before any output is started)."""
    if world > n_samples:
        raise UsageError(
            f"{world} ranks but only {n_samples} calibration samples: pass --n-samples ≥ {world} or use fewer processes"
        )


def split_samples(calib_ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of the calibration samples (sizes differ by at most one)."""
    check_samples(calib_ids.shape[0], world)
    return calib_ids.tensor_split(world)[rank]


def collective(what: str, call, *args, **kwargs):
    """Run one ``torch.distributed`` call; a peer that died or hung becomes :class:`RankLost`."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and gloo's errors are RuntimeErrors
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        world = dist.get_world_size() if dist.is_initialized() else os.environ.get("WORLD_SIZE", "?")
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        reason = re.sub(r"^(\[[^\]]*\]\s*)+", "", reason).split(". ")[0]  # no build paths, one sentence
        raise RankLost(
            f"rank {rank} of the {world}-process job: {what} failed because another rank died or stopped answering "
            f"({reason[:200]}); nothing was saved to OUT: rerun the same command (a --stream run resumes after "
            "its last finished block)"
        ) from None


def input_groups(linears: dict[str, nn.Module], stats: Stats) -> list[list[str]]:
    """Linears fed the same input (equal accumulators), in block order; each is solved as one unit."""
    groups: list[list[str]] = []
    for name in linears:
        mine = [t for acc in stats.get(name, {}).values() for t in acc.tensors()]
        for group in groups:
            theirs = [t for acc in stats.get(group[0], {}).values() for t in acc.tensors()]
            if mine and len(mine) == len(theirs) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs, strict=True)
            ):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def assign(costs: list[float], world: int) -> list[int]:
    """Owner rank per item: largest first to the least loaded rank (deterministic on every rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


def _solve_cost(linears: dict[str, nn.Module], names: list[str]) -> float:
    """Proportional to an OBS sweep: rows × in_features² (also a fair order for cheaper methods)."""
    rows = sum(weight_matrix(linears[n]).shape[0] for n in names)
    cols = weight_matrix(linears[names[0]]).shape[1]
    return float(rows) * cols * cols


class DistributedHooks(EngineHooks):
    """Engine hooks for one rank of a ``torch.distributed`` job (see the module docstring)."""

    def __init__(self, group: RankGroup) -> None:
        self.group = group

    def local_samples(self, calib_ids: torch.Tensor) -> torch.Tensor:
        return split_samples(calib_ids, self.group.rank, self.group.world)

    def reduce_stats(self, index: int, stats: Stats) -> None:
        counts = []
        for accs in stats.values():
            for acc in accs.values():
                for tensor in acc.tensors():
                    collective(f"summing block {index}'s statistics", dist.all_reduce, tensor)
                counts.append(acc.n_tokens)
        if counts:
            device = next(t for accs in stats.values() for acc in accs.values() for t in acc.tensors()).device
            total = torch.tensor(counts, dtype=torch.int64, device=device)
            collective(f"summing block {index}'s token counts", dist.all_reduce, total)
            for acc, n in zip((a for accs in stats.values() for a in accs.values()), total.tolist(), strict=True):
                acc.n_tokens = int(n)

    def process_block(
        self, method: BlockMethod, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats
    ) -> None:
        if not method.splits_by_linear:
            method.process_block(index, block, linears, stats)
            return
        groups = input_groups(linears, stats)
        owners = assign([_solve_cost(linears, g) for g in groups], self.group.world)
        mine = [name for g, owner in zip(groups, owners, strict=True) if owner == self.group.rank for name in g]
        if mine:
            method.process_block(index, block, {n: linears[n] for n in mine}, {n: stats[n] for n in mine if n in stats})
        for names, owner in zip(groups, owners, strict=True):
            for name in names:
                collective(f"sharing block {index}'s {name} from rank {owner}", dist.broadcast, linears[name].weight.data, src=owner)


def relaunch(nproc: int, argv: list[str]) -> None:
    """Run ``python -m secateurs ARGV`` under torchrun with ``nproc`` processes on this machine; ``argv``
    names one stage and its flags without ``--nproc`` (:func:`secateurs.stages.launch` builds it from
    the request), so each rank runs exactly that stage, as one share of the job.

    For several machines run ``torchrun --nnodes … -m secateurs prune …`` yourself: the ranks read
    everything they need from torchrun's environment.
    """
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "secateurs", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    code = subprocess.run(command, env=env, check=False).returncode
    if code:
        raise UsageError(f"the {nproc}-process run failed (torchrun exit code {code}); the failing rank's message is above")
