"""LLM-Shearing: prune to a chosen architecture with learned L0 masks (Xia et al., ICLR 2024).

Targeted structured pruning learns hard-concrete masks (Louizos et al., 2018) over four kinds of
structure, jointly with the model's weights:

* ``layers``: one mask per decoder block; 0 makes the block the identity (its attention and MLP
  outputs are scaled by it), so the block is removed (:mod:`secateurs.model.drop_layers`);
* ``heads``: per block, one mask per KV group (a single head where every head has its own K/V; under
  grouped-query attention the K/V head and the query heads that read it go together, since a group
  cannot be split without breaking GQA); it scales the group's columns of the output projection;
* ``channels``: per block, one mask per MLP channel; it scales the down projection's columns;
* ``hidden``: one mask per residual dimension, shared by all blocks; it scales the embeddings and
  every block's output projections, and the RMSNorms normalise over the dimensions still alive.

The loss is the LM loss plus, for each kind, ``lambda_1 (s - t) + lambda_2 (s - t)^2`` where ``s`` is
the expected fraction pruned under the masks' distributions (per block for heads and channels, then
averaged) and ``t`` the target fraction, ramped linearly from 0 over the first ``lagrangian_warmup``
of the steps; the multipliers are learned by gradient *ascent*, so the constraint is pushed harder
the longer it is missed (the paper's Eq. 2). Paper defaults: mask logits initialised at 5 (masks
almost surely on), clamped to [ln 0.01, ln 100], temperature 2/3, stretch (-0.1, 1.1), mask and
multiplier learning rate 1.0, model learning rate 1e-4, warm-up of the target over 20% of the steps.

At the end each kind keeps exactly the target count of its highest-logit units (the paper's
``eval_target_model``), and the model is sliced physically: hidden dimensions from embeddings, norms
and every projection (here), blocks with :func:`~secateurs.model.drop_layers.drop_layers`, heads and
channels with :func:`~secateurs.model.slice.apply_widths`. The target shape is the same in every
block, so the config is a plain ``transformers`` config.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers import PreTrainedModel

from ..engine.sequential import EngineOptions
from ..errors import UsageError
from ..model.arch import SPECS, ArchSpec
from ..model.drop_layers import check_removal, drop_layers
from ..model.groups import GroupSet, block_groups, check_target, head_geometry
from ..model.linear import weight_matrix
from ..model.load import LoadedModel
from ..model.slice import apply_widths, keep_linear
from ..record import peak_memory_mb
from ..recover.dynamic_batch import Domains, TrainExtra, TrainLog, TrainSettings, held_out_losses, train

LIMIT_LOW, LIMIT_HIGH = -0.1, 1.1  # stretch interval of the hard-concrete distribution
TEMPERATURE = 2.0 / 3.0
INIT_LOGIT = 5.0
LOGIT_RANGE = (math.log(1e-2), math.log(1e2))
EPS = 1e-6
MASK_KINDS = ("layers", "hidden", "heads", "channels")
# Resume checkpoints of the two phases in --checkpoint-dir (safetensors + JSON, never pickle).
PRUNE_CHECKPOINT = "prune.safetensors"
CONTINUE_CHECKPOINT = "continue.safetensors"
HIDDEN_ARCHS = tuple(spec.name for spec in SPECS if spec.prunable_hidden)  # see ArchSpec
_JSON_KEYS = {
    "num_hidden_layers": "layers", "n_layers": "layers", "hidden_size": "hidden", "d_model": "hidden",
    "num_attention_heads": "heads", "n_heads": "heads", "num_key_value_heads": "kv_heads",
    "intermediate_size": "intermediate",
}


@dataclass(frozen=True)
class ShearTarget:
    """The architecture to shear to; a size left as None keeps the source's."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None

    @classmethod
    def parse(cls, text: str) -> ShearTarget:
        """``layers=20,hidden=448,heads=6,kv_heads=2,intermediate=1024`` (any subset)."""
        values = {}
        names = {f.name for f in fields(cls)}
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise UsageError(f"--target part {part!r} must be one of {', '.join(sorted(names))} = a number")
            try:
                values[key] = int(value)
            except ValueError:
                raise UsageError(f"--target {key}={value!r} is not a whole number") from None
        if not values:
            raise UsageError("--target is empty; e.g. --target layers=20,hidden=448,heads=6,kv_heads=2,intermediate=1024")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> ShearTarget:
        """A JSON file with our keys or a transformers config's (``num_hidden_layers``, ``hidden_size``, ...)."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise UsageError(f"--target-config {path} not found")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--target-config {path} is not valid JSON ({exc.msg})") from None
        names = {f.name for f in fields(cls)}
        values = {}
        for key, value in (data.items() if isinstance(data, dict) else []):
            name = key if key in names else _JSON_KEYS.get(key)
            if name is not None and value is not None:
                values[name] = int(value)
        if not values:
            raise UsageError(f"--target-config {path} names no size (layers, hidden, heads, kv_heads, intermediate)")
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    """Source and target counts per mask kind (only kinds that shrink), resolved against a model."""

    source: dict[str, int]
    target: dict[str, int]
    per_group: int
    group_params: int  # weights of one head group at the source hidden size
    channel_params: int  # weights of one MLP channel at the source hidden size

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in MASK_KINDS if self.target[k] < self.source[k])

    def params(self, counts: dict[str, float]) -> float:
        """Non-embedding weights of attention + MLP for the given (expected) counts of each kind."""
        per_block = counts["heads"] * self.group_params + counts["channels"] * self.channel_params
        return counts["layers"] * per_block * counts["hidden"] / self.source["hidden"]

    @property
    def target_params(self) -> float:
        return self.params({k: float(v) for k, v in self.target.items()})

    @property
    def source_params(self) -> float:
        return self.params({k: float(v) for k, v in self.source.items()})


def plan_for(loaded: LoadedModel, target: ShearTarget) -> Plan:
    """Check ``target`` against the model and return the counts to shear between."""
    model, spec = loaded.model, loaded.spec
    config = model.config
    blocks = spec.blocks_of(model)
    first = blocks[0]
    groups = block_groups(spec, config, first, ("channels",))
    geo = head_geometry(spec, config, first)
    shapes = {(head_geometry(spec, config, b).heads, block_groups(spec, config, b, ("channels",))["channels"].count)
              for b in blocks}
    if len(shapes) > 1:
        raise UsageError("this model already has different widths per layer; shear a uniform model")
    source = {"layers": len(blocks), "hidden": int(config.hidden_size), "heads": geo.kv_heads,
              "channels": groups["channels"].count}
    heads = target.heads
    kv = target.kv_heads
    if heads is not None and heads % geo.per_group:
        raise UsageError(
            f"heads={heads} is not a multiple of the {geo.per_group} query heads that share each K/V head "
            f"in this model; use heads={geo.per_group * max(1, round(heads / geo.per_group))}"
        )
    if heads is not None and kv is not None and heads != kv * geo.per_group:
        raise UsageError(
            f"heads={heads} with kv_heads={kv} changes the {geo.per_group}:1 query/KV sharing of this model; "
            f"use heads={kv * geo.per_group}"
        )
    groups_target = kv if kv is not None else (heads // geo.per_group if heads is not None else source["heads"])
    wanted = {"layers": target.layers, "hidden": target.hidden, "heads": groups_target, "channels": target.intermediate}
    resolved = {}
    for kind, value in wanted.items():
        value = source[kind] if value is None else value
        if not 1 <= value <= source[kind]:
            raise UsageError(f"target {kind} must be between 1 and the source's {source[kind]}, got {value}")
        resolved[kind] = value
    if resolved["layers"] < source["layers"]:
        check_removal(model, spec, list(range(source["layers"] - resolved["layers"])))
    if resolved["heads"] < source["heads"]:
        check_target(spec, ("heads",))
    if resolved["hidden"] < source["hidden"] and not spec.prunable_hidden:
        raise UsageError(
            f"{spec.name}: pruning the hidden size is supported for {', '.join(HIDDEN_ARCHS)}; leave hidden= out"
        )
    _check_config(model, spec, resolved, geo.per_group)
    group_params = block_groups(spec, config, first, ("heads",))["heads"].params_per_group(first)
    return Plan(source, resolved, geo.per_group, group_params, groups["channels"].params_per_group(first))


def _check_config(model: PreTrainedModel, spec: ArchSpec, counts: dict[str, int], per_group: int) -> None:
    """Refuse a target shape the model's own config class would reject on reload."""
    values = model.config.to_dict()
    if spec.head_dim_key and not values.get(spec.head_dim_key):
        values[spec.head_dim_key] = values["hidden_size"] // values[spec.heads_key]
    values["hidden_size"] = counts["hidden"]
    values[spec.num_layers_key] = counts["layers"]
    if spec.head_dim_key:
        values[spec.heads_key] = counts["heads"] * per_group
        if spec.kv_heads_key:
            values[spec.kv_heads_key] = counts["heads"]
    for key in [k for k, v in values.items() if "layer" in k and isinstance(v, list)]:
        values[key] = values[key][: counts["layers"]]
    try:
        model.config.__class__.from_dict(values)
    except (ValueError, StrictDataclassClassValidationError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{model.config.model_type} cannot load the target shape ({reason}); pick hidden a multiple of heads"
        ) from None


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


class MaskedForward:
    """Hooks that make the model compute with the masks in ``self.z`` (set them before each forward).

    Equivalent to the sliced model when the masks are 0/1: a removed block adds nothing to the
    residual, a removed head group / channel feeds nothing to its output projection, and a removed
    hidden dimension stays exactly 0 in the residual while the norms average over live dimensions.
    """

    def __init__(self, loaded: LoadedModel, plan: Plan) -> None:
        self.loaded, self.plan = loaded, plan
        self.z: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def _owners(self, group_set: GroupSet, n_cols: int) -> torch.Tensor:
        owner = torch.empty(n_cols, dtype=torch.long)
        for g, cols in enumerate(group_set.consumer.index):
            owner[cols] = g
        return owner

    def _scale_output(self, layer: int):
        def hook(module, args, output):
            scale = None
            if "layers" in self.z:
                scale = self.z["layers"][layer]
            if "hidden" in self.z:
                scale = self.z["hidden"] if scale is None else scale * self.z["hidden"]
            return output if scale is None else output * scale.to(output.dtype)
        return hook

    def _scale_input(self, kind: str, layer: int, owner: torch.Tensor):
        def hook(module, args):
            if kind not in self.z:
                return None
            mult = self.z[kind][layer][owner.to(args[0].device)]
            return (args[0] * mult.to(args[0].dtype), *args[1:])
        return hook

    def _live_scale(self) -> torch.Tensor | None:
        """sqrt(D / live dims): an RMSNorm of the input scaled by it averages over live dims only."""
        hidden = self.z.get("hidden")
        if hidden is None:
            return None
        live = (hidden > 0).sum().clamp(min=1)
        return torch.sqrt(hidden.numel() / live.to(hidden.dtype))

    def _norm_pre(self, module, args):
        scale = self._live_scale()
        return None if scale is None else (args[0] * scale.to(args[0].dtype), *args[1:])

    def _norm_post(self, module, args, output):
        scale = self._live_scale()
        return output if scale is None else output / scale.to(output.dtype)

    def _embed_post(self, module, args, output):
        hidden = self.z.get("hidden")
        return output if hidden is None else output * hidden.to(output.dtype)

    def __enter__(self) -> MaskedForward:
        model, spec = self.loaded.model, self.loaded.spec
        kinds = self.plan.kinds
        add = self.handles.append
        for i, block in enumerate(spec.blocks_of(model)):
            groups = block_groups(spec, model.config, block, tuple(k for k in ("heads", "channels") if k in kinds))
            for path, kind in ((spec.attention[-1], "heads"), (spec.mlp[-1], "channels")):
                module = block.get_submodule(path)
                if kind in groups:
                    owner = self._owners(groups[kind], weight_matrix(module).shape[1])
                    add(module.register_forward_pre_hook(self._scale_input(kind, i, owner)))
                add(module.register_forward_hook(self._scale_output(i)))
            if "hidden" in kinds:
                for path in spec.norms:
                    add(block.get_submodule(path).register_forward_pre_hook(self._norm_pre))
                    add(block.get_submodule(path).register_forward_hook(self._norm_post))
        if "hidden" in kinds:
            final = model.get_submodule(spec.final_norm)
            add(final.register_forward_pre_hook(self._norm_pre))
            add(final.register_forward_hook(self._norm_post))
            for path in spec.embeddings:
                add(model.get_submodule(path).register_forward_hook(self._embed_post))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.z = {}


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=False))


def slice_hidden(model: PreTrainedModel, spec: ArchSpec, keep: torch.Tensor) -> None:
    """Keep residual dimensions ``keep`` everywhere they appear: embeddings, norms, every projection."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    config = model.config
    if spec.head_dim_key and not getattr(config, spec.head_dim_key, None):
        # Qwen2 / Phi-3 derive the head size from hidden_size when the config has none: pin it.
        setattr(config, spec.head_dim_key, config.hidden_size // getattr(config, spec.heads_key))
    head = model.get_submodule(spec.lm_head)
    embeddings = [model.get_submodule(path) for path in spec.embeddings]
    tied = any(head.weight is e.weight for e in embeddings)
    for embedding in embeddings:
        _replace(embedding, "weight", embedding.weight.data.index_select(1, keep.to(embedding.weight.device)))
        embedding.embedding_dim = len(keep)
    if tied:
        head.weight = embeddings[0].weight
        head.in_features = len(keep)
    else:
        keep_linear(head, "in", keep)
    norms = [model.get_submodule(spec.final_norm)]
    for block in spec.blocks_of(model):
        norms += [block.get_submodule(path) for path in spec.norms]
        for path in (*spec.attention[:-1], *spec.mlp[:-1]):
            keep_linear(block.get_submodule(path), "in", keep)
        for path in (spec.attention[-1], spec.mlp[-1]):
            keep_linear(block.get_submodule(path), "out", keep)
    for norm in norms:
        _replace(norm, "weight", norm.weight.data.index_select(0, keep.to(norm.weight.device)))
        if getattr(norm, "bias", None) is not None:
            _replace(norm, "bias", norm.bias.data.index_select(0, keep.to(norm.bias.device)))
    config.hidden_size = len(keep)


def apply_keep(loaded: LoadedModel, plan: Plan, keep: dict[str, torch.Tensor]) -> None:
    """Slice the model in place to a binarised mask decision (indices from :meth:`ShearMasks.keep`)."""
    model, spec = loaded.model, loaded.spec
    if "hidden" in keep:
        slice_hidden(model, spec, keep["hidden"])
    n = plan.source["layers"]
    kept_layers = keep["layers"].tolist() if "layers" in keep else list(range(n))
    if len(kept_layers) < n:
        drop_layers(model, spec, [i for i in range(n) if i not in set(kept_layers)])
    widths = [{kind: keep[kind][i] for kind in ("heads", "channels") if kind in keep} for i in kept_layers]
    apply_widths(model, spec, widths)


def non_embedding_params(loaded: LoadedModel) -> int:
    """Parameters of the decoder blocks (what the target sizes and the 60% goal refer to)."""
    return sum(p.numel() for p in loaded.spec.blocks_of(loaded.model).parameters())


@dataclass
class ShearConfig:
    """A shearing request: the target shape, the two phases' lengths and their shared settings.

    ``steps``: mask-learning steps (the paper: 3,200 of 32 x 4,096 tokens); ``continue_steps``:
    continued pretraining of the sliced model. ``mask_lr`` is the paper's ``lag_lr`` (1.0) for
    mask logits and multipliers; ``lagrangian_warmup`` the fraction of ``steps`` over which the target
    ramps in (the paper: 20%). ``reference_loss``: per-domain reference for dynamic batch loading
    (default: the source model's held-out loss). The Lagrangian game needs hundreds of steps or more to
    settle: with tens, the masks overshoot the target together and the cut is close to random
    (benchmarks/sections/shearing.md).
    """

    target: ShearTarget
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    steps: int = 100
    continue_steps: int = 0
    lr: float = 1e-4
    mask_lr: float = 1.0
    lagrangian_warmup: float = 0.2
    batch_size: int = 4
    seq_len: int = 512
    update_every: int = 50
    eval_windows: int = 4
    reference_loss: list[float] | None = None
    domain_weights: list[float] | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    data_dir: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100

    def settings(self, steps: int, seed_offset: int) -> TrainSettings:
        return TrainSettings(
            steps=steps, lr=self.lr, batch_size=self.batch_size, seq_len=self.seq_len,
            update_every=self.update_every, bf16=self.bf16, gradient_checkpointing=self.gradient_checkpointing,
            seed=self.seed + seed_offset, checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every,
        )

    def validate(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1 (mask learning), got {self.steps}")
        if self.continue_steps < 0:
            raise UsageError(f"--continue-steps must be at least 0, got {self.continue_steps}")
        if not 0 <= self.lagrangian_warmup <= 1:
            raise UsageError(f"--lagrangian-warmup must be in [0, 1], got {self.lagrangian_warmup:g}")
        if self.mask_lr <= 0:
            raise UsageError(f"--mask-lr must be positive, got {self.mask_lr:g}")
        if self.eval_windows < 1:
            raise UsageError(f"--eval-windows must be at least 1, got {self.eval_windows}")
        if self.reference_loss is not None and len(self.reference_loss) != len(self.datasets):
            raise UsageError(f"--reference-loss needs one value per --data domain ({len(self.datasets)})")
        self.settings(self.steps, 0).validate()


class ShearTraining(TrainExtra):
    """The mask-learning phase's additions to LM training: masks, multipliers, their optimiser."""

    def __init__(self, masks: ShearMasks, forward: MaskedForward, config: ShearConfig) -> None:
        self.masks, self.forward, self.config = masks, forward, config
        self.optimizer = torch.optim.Adam(masks.parameters(), lr=config.mask_lr)
        self.step = 0

    def begin_step(self, step: int) -> None:
        self.step = step
        self.masks.constrain()
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        self.forward.z = self.masks.sample(generator)

    def loss(self, step: int) -> torch.Tensor:
        warm = self.config.lagrangian_warmup * self.config.steps
        progress = 1.0 if warm <= 0 else min(1.0, step / warm)
        return self.masks.lagrangian(progress)

    def after_backward(self) -> None:
        for lam in self.masks.lambdas.values():
            if lam.grad is not None:
                lam.grad.neg_()  # gradient ascent on the multipliers

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def status(self) -> str:
        with torch.no_grad():
            expected = float(self.masks.expected_params())
        return f"size {expected / 1e6:.2f}M → {self.masks.plan.target_params / 1e6:.2f}M"

    @contextmanager
    def eval_mode(self):
        """Held-out losses with each kind's currently expected number of units kept (the paper's
        ``eval_target_model=false``)."""
        saved = self.forward.z
        with torch.no_grad():
            z = {}
            for kind, score in self.masks.expected().items():
                k = score.sum(-1, keepdim=True).round().clamp(min=1).long()
                rank = score.argsort(-1, descending=True).argsort(-1)
                z[kind] = (rank < k).to(score.dtype)
        self.forward.z = z
        try:
            yield
        finally:
            self.forward.z = saved

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.optimizer.load_state_dict(state["optimizer"])


@dataclass
class ShearReport:
    """What shearing did: the shape reached, sizes, both phases' logs, time and memory."""

    config: ShearConfig
    plan: Plan
    kept: dict[str, list]
    params_before: int
    params_after: int
    prune_log: TrainLog
    continue_log: TrainLog | None
    reference_loss: list[float] | None
    seconds: float
    peak_memory_mb: float
    device: str

    @property
    def tokens(self) -> int:
        return self.prune_log.tokens + (self.continue_log.tokens if self.continue_log else 0)

    def stage_record(self) -> dict:
        config = asdict(self.config)
        config["target"] = asdict(self.config.target)
        return {
            "stage": "shear",
            "method": "llm-shearing",
            "config": config,
            "source_shape": self.plan.source,
            "target_shape": self.plan.target,
            "kept": self.kept,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "reference_loss": self.reference_loss,
            "prune": self.prune_log.to_dict(),
            "continue": self.continue_log.to_dict() if self.continue_log else None,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "device": self.device,
        }


def shear(loaded: LoadedModel, config: ShearConfig, engine: EngineOptions | None = None) -> ShearReport:
    """Learn masks toward ``config.target``, slice the model to it in place, then continue pretraining."""
    config.validate()
    plan = plan_for(loaded, config.target)
    if not plan.kinds:
        raise UsageError("the target is the model's own shape; ask for fewer layers, hidden, heads or intermediate")
    device = (engine or EngineOptions()).torch_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    domains = Domains.load(config.datasets, loaded.tokenizer, config.seq_len, config.eval_windows,
                           config.data_dir, config.domain_weights)
    model = loaded.model
    home = next(model.parameters()).device
    clock = time.perf_counter()
    params_before = non_embedding_params(loaded)
    model.to(device)
    reference = None
    try:
        if domains.dynamic:
            reference = config.reference_loss or held_out_losses(model, domains, device).tolist()
            domains.reference = torch.tensor(reference, dtype=torch.float64)
        masks = ShearMasks(plan).to(device)
        fingerprint = {"source": loaded.source, "config": asdict(config) | {"checkpoint_dir": None}}
        with MaskedForward(loaded, plan) as forward:
            extra = ShearTraining(masks, forward, config)
            prune_log = train(model, domains, config.settings(config.steps, 0), device, extra,
                              PRUNE_CHECKPOINT, fingerprint, "shear: learn masks")
        keep = masks.keep()
        apply_keep(loaded, plan, keep)
        continue_log = None
        if config.continue_steps:
            continue_log = train(model, domains, config.settings(config.continue_steps, 1), device, None,
                                 CONTINUE_CHECKPOINT, fingerprint, "shear: continue pretraining")
    finally:
        model.to(home)
        model.requires_grad_(False)
    return ShearReport(
        config=config, plan=plan, kept={k: v.tolist() for k, v in keep.items()},
        params_before=params_before, params_after=non_embedding_params(loaded),
        prune_log=prune_log, continue_log=continue_log, reference_loss=reference,
        seconds=time.perf_counter() - clock, peak_memory_mb=peak_memory_mb(device), device=str(device),
    )
