"""Hard-concrete (L0) masks over layers, hidden dimensions, head groups and MLP channels, and the
Lagrange multipliers of each kind's size constraint (Louizos et al., 2018; Xia et al., Eq. 2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .target import Plan

LIMIT_LOW, LIMIT_HIGH = -0.1, 1.1  # stretch interval of the hard-concrete distribution
TEMPERATURE = 2.0 / 3.0
INIT_LOGIT = 5.0
LOGIT_RANGE = (math.log(1e-2), math.log(1e2))
EPS = 1e-6


class ShearMasks(nn.Module):
    """Hard-concrete mask logits per kind and the Lagrange multipliers of each kind's constraint."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan
        source = plan.source
        shapes = {"layers": (source["layers"],), "hidden": (source["hidden"],),
                  "heads": (source["layers"], source["heads"]), "channels": (source["layers"], source["channels"])}
        self.logits = nn.ParameterDict(
            {kind: nn.Parameter(torch.full(shapes[kind], INIT_LOGIT)) for kind in plan.kinds}
        )
        self.lambdas = nn.ParameterDict(
            {f"{kind}_{i}": nn.Parameter(torch.zeros(())) for kind in plan.kinds for i in (1, 2)}
        )
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for logit in self.logits.values():
                logit.add_(torch.randn(logit.shape, generator=generator) * 1e-2)

    def constrain(self) -> None:
        with torch.no_grad():
            for logit in self.logits.values():
                logit.clamp_(*LOGIT_RANGE)

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One reparameterised draw of every mask (values in [0, 1], exactly 0 or 1 with some probability)."""
        z = {}
        for kind, logit in self.logits.items():
            u = torch.rand(logit.shape, generator=generator).clamp(EPS, 1 - EPS).to(logit.device)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logit) / TEMPERATURE)
            z[kind] = (s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0.0, 1.0)
        return z

    def expected(self) -> dict[str, torch.Tensor]:
        """P(mask != 0) of every unit: 1 - Q(0) of the stretched concrete distribution."""
        at_zero = math.log(-LIMIT_LOW / LIMIT_HIGH)
        return {kind: 1 - torch.sigmoid(at_zero * TEMPERATURE - logit).clamp(EPS, 1 - EPS)
                for kind, logit in self.logits.items()}

    def expected_params(self) -> torch.Tensor:
        """Expected attention + MLP weights under the masks (the paper's expected size)."""
        scores = self.expected()
        counts = {k: torch.tensor(float(v)) for k, v in self.plan.source.items()}
        counts.update({k: s.sum() if s.ndim == 1 else s.sum(-1) for k, s in scores.items()})
        layer = scores.get("layers", torch.ones(self.plan.source["layers"]))
        per_block = counts["heads"] * self.plan.group_params + counts["channels"] * self.plan.channel_params
        return (layer * per_block).sum() * counts["hidden"] / self.plan.source["hidden"]

    def lagrangian(self, progress: float) -> torch.Tensor:
        """Sum over kinds of lambda_1 (s - t) + lambda_2 (s - t)^2, ``t`` ramped by ``progress`` in [0, 1]."""
        total = torch.zeros(())
        for kind, score in self.expected().items():
            size = self.plan.source[kind]
            target = (1 - self.plan.target[kind] / size) * progress
            gap = (1 - score.sum(-1) / size) - target
            terms = self.lambdas[f"{kind}_1"] * gap + self.lambdas[f"{kind}_2"] * gap**2
            total = total + terms.mean()
        return total

    def keep(self) -> dict[str, torch.Tensor]:
        """Binarised decision: the indices of the target count of highest-logit units, sorted."""
        chosen = {}
        for kind, logit in self.logits.items():
            k = self.plan.target[kind]
            chosen[kind] = logit.detach().topk(k, dim=-1).indices.sort(dim=-1).values.cpu()
        return chosen

    def binary(self, keep: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """0/1 masks of a keep decision (default: :meth:`keep`)."""
        keep = self.keep() if keep is None else keep
        masks = {}
        for kind, logit in self.logits.items():
            mask = torch.zeros(logit.shape)
            mask.scatter_(-1, keep[kind], 1.0)
            masks[kind] = mask.to(logit.device)
        return masks
