"""SparseGPT: prune column by column and let the kept weights absorb the error (OBS updates).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(2023). For each linear the layer-wise Hessian of the reconstruction error is H = 2XXᵀ over the
calibration inputs. With U the upper Cholesky factor of H⁻¹, removing weight w_i (column i) changes
the later columns of its row by −(w_i / U_ii)·U_i,i+1: — the optimal correction for the columns not
yet processed. Defaults are the paper's: dampening 1% of the mean diagonal, lazy blocks of 128
columns (rounded down to a multiple of M for N:M), the mask chosen adaptively per block (the ``sparsity`` share of each block's lowest
w²/U_ii² scores) or per N:M group at its first column.

What is unique here and not in the reference code:
- Linears fed the same input (q/k/v, gate/up) share one Hessian: their rows are stacked and solved
  together, which is exact (rows are independent given H) and halves the number of column sweeps.
  The unstructured mask is still chosen per original matrix.
- Dead inputs (zero diagonal, never active on the calibration data) get unit curvature and the
  lowest scores, so they are pruned first, without an update, but never beyond the sparsity budget.
- A Cholesky failure retries with ten times the damping, up to ``retries`` times.
All Hessian and update math is float32 whatever the model dtype.

Memory (what sets the peak on a 70B block, where the down projection's Hessian is 28,672² float32,
3.1 GiB): each group's Hessian is taken out of the block's statistics as it is solved, scaled in
place and released once its Cholesky factor exists, so at most one in×in matrix of another group
(the down projection's sums) lives beside the solve, and the solve itself holds at most the factor
and the inverse the linear-algebra library builds from it (see :func:`inverse_cholesky`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine.sequential import Stats
from ..engine.stats import Hessian
from ..errors import NumericalError, UsageError
from ..model.linear import weight_matrix
from .base import SparsityMethod, SparsityTarget
from .masks import Pattern


@dataclass(frozen=True)
class SparseGPTOptions:
    dampening: float = 0.01
    block_size: int = 128
    retries: int = 3


class SparseGPT(SparsityMethod):
    name = "sparsegpt"
    Options = SparseGPTOptions
    needs_calibration = True
    statistics = {"hessian": Hessian}

    def __init__(self, target: SparsityTarget, options: SparseGPTOptions | None = None) -> None:
        super().__init__(target, options)
        opts = self.options
        if not opts.dampening > 0:
            raise UsageError(f"option dampening must be > 0 (the paper uses 0.01), got {opts.dampening:g}")
        if opts.block_size < 1 or opts.retries < 0:
            raise UsageError("options block_size must be ≥ 1 and retries ≥ 0")

    def process_block(
        self, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats
    ) -> None:
        sparsity = self.target.per_block[index]
        if sparsity == 0.0:  # a block left dense, also under N:M
            return
        self.prepare_statistics(index, linears, stats)
        if self.permutation is not None:
            self.permutation(index, block, linears, stats, self.score_matrix)
        for names in shared_hessian_groups(stats):
            weights = [weight_matrix(linears[name]) for name in names]
            stacked = torch.cat([w.to(torch.float32) for w in weights])
            rows = [w.shape[0] for w in weights]
            where = f"block {index} {'/'.join(names)}"
            # The group's accumulators leave the statistics here: nothing reads them after the solve,
            # and the solve consumes the (in-place scaled) matrix, so its memory goes with it.
            hessian = [stats[name].pop("hessian") for name in names][0].release_matrix()
            pruned = reconstruct(stacked, hessian, sparsity, self.target.pattern, self.options, rows, where)
            del hessian
            for weight, part in zip(weights, pruned.split(rows), strict=True):
                weight.copy_(part)
            del stacked, pruned


def shared_hessian_groups(stats: Stats) -> list[list[str]]:
    """Linears whose Hessians are identical (the same input), in block order."""
    groups: list[list[str]] = []
    for name, accs in stats.items():
        xtx = accs["hessian"].xtx
        for group in groups:
            other = stats[group[0]]["hessian"].xtx
            if other.shape == xtx.shape and torch.equal(other, xtx):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def inverse_cholesky(hessian: torch.Tensor, options: SparseGPTOptions, where: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening · mean diag(H), raised ×10 on failure.

    ``hessian`` is consumed: it is damped in place (its diagonal is rewritten exactly before a retry,
    so a retry sees H + 10λI as if from a fresh copy) and its storage is released as soon as its
    factor exists. The factor is kept until the inverse's factor exists (a retry after that stage
    rebuilds H from it), so three in×in float32 matrices are alive at the peak, counting the working
    copy the library makes inside ``cholesky_inverse``; a 70B down projection (in = 28,672) needs
    9.2 GiB, where a copy of H for damping and one for scaling made it five matrices, 15.3 GiB.
    The operations and their order are the plain version's, so the factor is bit for bit the same.
    """
    damp = options.dampening * hessian.diagonal().mean()  # over the strided view, as before: same rounding
    diagonal = hessian.diagonal().clone()
    for _ in range(options.retries + 1):
        hessian.diagonal().copy_(diagonal + damp)
        lower, info = torch.linalg.cholesky_ex(hessian)
        if info == 0:
            hessian.set_()  # H itself is no longer needed, whoever else still names it
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0 and torch.isfinite(upper).all():
                return upper
            del upper
            hessian = lower @ lower.mT  # H + λI again, up to rounding, for the retry
        del lower
        damp = damp * 10
    raise NumericalError(
        f"{where}: the Hessian is not positive definite even with damping {float(damp) / 10:.3g}; "
        "use more calibration samples or raise -o dampening"
    )


def _scores(columns: torch.Tensor, diag: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """w² / U_ii² per weight of (cols, rows) ``columns``; dead inputs score in [−1, 0), below any live one."""
    scores = columns.square() / diag.square().unsqueeze(1)
    sq = columns.square()
    return torch.where(dead.unsqueeze(1), sq / (1 + sq) - 1, scores)


def _block_drop(scores: torch.Tensor, sparsity: float, rows: list[int]) -> torch.Tensor:
    """Drop the ``sparsity`` share of the lowest scores of each original matrix within this block."""
    drop = torch.zeros_like(scores, dtype=torch.bool)
    start = 0
    for n_rows in rows:
        part = scores[:, start : start + n_rows]
        k = int(part.numel() * sparsity)
        if k:
            flat = torch.zeros(part.numel(), dtype=torch.bool, device=scores.device)
            flat[part.flatten().argsort(stable=True)[:k]] = True
            drop[:, start : start + n_rows] = flat.view_as(part)
        start += n_rows
    return drop


def reconstruct(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    options: SparseGPTOptions,
    rows: list[int],
    where: str,
) -> torch.Tensor:
    """Prune float32 (out, in) ``weight`` (stacked matrices of ``rows`` rows each) with OBS updates."""
    if not torch.isfinite(hessian).all():
        raise NumericalError(f"{where}: the calibration Hessian contains NaN or inf")
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1.0
    upper = inverse_cholesky(hessian, options, where)
    cols = weight.shape[1]
    step = options.block_size
    if pattern.is_nm:  # an N:M group never straddles two lazy blocks
        step = max(step - step % pattern.m, pattern.m)
    w_t = weight.t().contiguous()  # one row per input column: the sweep reads contiguous memory
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        block = w_t[i1:i2]
        u = upper[i1:i2, i1:i2]
        diag = u.diagonal()
        errors = torch.empty_like(block)
        if pattern.is_nm:
            drop = torch.zeros_like(block, dtype=torch.bool)
            scale = torch.zeros_like(block)
        else:
            drop = _block_drop(_scores(block, diag, dead[i1:i2]), sparsity, rows)
            scale = drop.to(block.dtype) / diag.unsqueeze(1)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                scores = _scores(block[group], diag[group], dead[i1:i2][group])
                drop[group].scatter_(0, scores.argsort(dim=0, stable=True)[: pattern.m - pattern.n], True)
                scale[group] = drop[group].to(block.dtype) / diag[group].unsqueeze(1)
            torch.mul(block[i], scale[i], out=errors[i])
            block[i:].addr_(u[i, i:], errors[i], alpha=-1)
        block.masked_fill_(drop, 0.0)
        w_t[i2:].addmm_(upper[i1:i2, i2:].t(), errors, alpha=-1)
    return w_t.t()
