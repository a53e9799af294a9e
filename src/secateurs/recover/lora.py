"""LoRA recovery over ``peft`` that keeps every pruned weight at exactly zero.

The recipe is LLM-Pruner's post-training (Ma, Fang, Wang, NeurIPS 2023, §3.3 and its
``post_training.py``): LoRA adapters of rank 8 (alpha 16, dropout 0.05) on every block linear
(q/k/v/o, gate/up/down), AdamW at learning rate 1e-4 with 100 warm-up steps then linear decay,
gradient clipping at 1.0, sequences of 256 tokens; then the adapters are merged into the weights.
LLM-Pruner tunes on Alpaca; here the data is language-modelling text (WikiText-2 / C4 train, or any
.txt / .jsonl), as the issue asks, and the number of steps is explicit.

Sparse models need more than a plain merge: W + s·BA is dense, so it would undo the pruning.
A linear that is sparse (at least ``mask_min_sparsity`` of its weights exactly zero) gets a
*masked adapter*: a peft ``LoraVariant`` whose forward adds ``x · ((s·BA) ⊙ M)ᵀ`` with M the
keep-mask, and whose merge adds the same masked delta. Training therefore sees exactly the model
that the merge produces, the gradients of A and B are those of the masked model, and the merged
weights are zero wherever M is. Width- and layer-pruned models are dense and take the plain
(faster) LoRA path. The threshold exists because dense weights can hold a few exact zeros too:
SmolLM2-135M dequantized from its Q4_1 GGUF has up to 0.07% per linear, pruned linears have tens
of percent.

Training is one plain loop (no Trainer): the batch of step t is a seeded function of (seed, t) and
dropout is seeded per step, so a run stopped and resumed from its last checkpoint (adapters,
optimizer, schedule, losses; written atomically every ``save_every`` steps) ends bit-identical to
an uninterrupted one. Mixed precision (bf16 autocast, or fp16 with a gradient scaler) and gradient
checkpointing are on by default on CUDA; a progress bar shows the loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose
from torch import nn

from ..data.calib import random_windows, tokenize
from ..data.sources import check_name, load_text
from ..errors import NumericalError, UsageError
from ..model.linear import is_transposed, weight_matrix
from ..model.load import LoadedModel
from ..progress import meter
from ..record import peak_memory_mb
from ..sparsity.masks import sparsity_of
from .checkpoint import load_checkpoint, restoring, save_checkpoint
from .dynamic_batch import enable_checkpointing

ADAPTER = "default"
KEEP = "secateurs_keep"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT = "recover_state.safetensors"


@dataclass
class RecoverConfig:
    """How to train the adapters. Defaults: LLM-Pruner's post-training recipe (see the module doc).

    ``batch_size`` sequences per micro-batch, ``grad_accum`` micro-batches per optimizer step
    (LLM-Pruner: 4 × 16 = 64; the default here is 4 × 1 so that a short schedule still takes
    many steps). ``warmup_steps`` None means min(100, steps // 10). ``checkpoint_dir`` None
    disables checkpoints; with one, a matching checkpoint found there is resumed.
    """

    steps: int = 200
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    data: str = "wikitext2"
    data_dir: str | None = None
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = True
    mask_min_sparsity: float = 0.01
    checkpoint_dir: str | None = None
    save_every: int = 50

    def validate(self) -> None:
        for name in ("steps", "rank", "batch_size", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr:g}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout:g}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown --precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.mask_min_sparsity <= 1.0:
            raise UsageError(f"mask_min_sparsity must be in [0, 1], got {self.mask_min_sparsity:g}")
        check_name(self.data)

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)

    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def fingerprint(self) -> dict:
        """Settings that change the result: a checkpoint resumes only under the same ones."""
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint_dir", "save_every", "data_dir")}


class MaskedLora(LoraVariant):
    """A peft LoRA variant whose update is (s·BA) ⊙ M in the forward pass and in the merge.

    M is the boolean buffer ``secateurs_keep`` on the layer, shaped (out, in) like the delta.
    """

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        """Nothing to set up: the mask is registered by :func:`set_keep`."""

    @staticmethod
    def delta(module: LoraLayer, adapter: str) -> torch.Tensor:
        """The masked update (out, in): s·BA with every pruned position exactly zero."""
        full = (module.lora_B[adapter].weight @ module.lora_A[adapter].weight) * module.scaling[adapter]
        return full.masked_fill(~getattr(module, KEEP), 0.0)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = transpose(MaskedLora.delta(module, active_adapter), module.fan_in_fan_out)
        keep = transpose(getattr(module, KEEP), module.fan_in_fan_out)
        return (orig_weight + delta.to(orig_weight.dtype)).masked_fill(~keep, 0.0)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = MaskedLora.merge_safe(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = transpose(MaskedLora.delta(module, active_adapter), module.fan_in_fan_out)
        return orig_weight.data - delta.to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        return result + F.linear(dropout(x), MaskedLora.delta(module, active_adapter))


def set_keep(layer: LoraLayer, keep: torch.Tensor) -> None:
    """Give ``layer`` a masked adapter with keep-mask ``keep`` (out, in), or update its mask."""
    keep = keep.to(device=layer.lora_A[ADAPTER].weight.device, dtype=torch.bool)
    if KEEP in layer._buffers:
        getattr(layer, KEEP).copy_(keep)
        return
    layer.register_buffer(KEEP, keep, persistent=False)
    layer.lora_variant[ADAPTER] = MaskedLora()


def base_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen weight under the adapter as (out, in) (a view: transposed for GPT-2's Conv1D)."""
    return weight_matrix(layer.get_base_layer())


@dataclass
class Adapters:
    """LoRA attached to every block linear: ``layers`` by (block index, path in the block)."""

    peft_model: nn.Module
    layers: dict[tuple[int, str], LoraLayer]
    masked: set[tuple[int, str]] = field(default_factory=set)

    def mask(self, key: tuple[int, str], keep: torch.Tensor) -> None:
        set_keep(self.layers[key], keep)
        self.masked.add(key)

    def keep(self, key: tuple[int, str]) -> torch.Tensor:
        """The keep-mask (out, in) of a masked layer."""
        return getattr(self.layers[key], KEEP)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def merge(self) -> bool:
        """Merge the adapters into the weights and remove them; True if every masked zero stayed zero."""
        keeps = {key: (self.layers[key].get_base_layer(), self.keep(key)) for key in self.masked}
        with torch.no_grad():
            self.peft_model.merge_and_unload()
        return all(bool((weight_matrix(base)[~keep.to(base.weight.device)] == 0).all()) for base, keep in keeps.values())

    def discard(self) -> None:
        """Remove the adapters without merging (after a failure), leaving the weights as they were."""
        self.peft_model.unload()


def attach(loaded: LoadedModel, config: RecoverConfig, mask_all: bool = False) -> Adapters:
    """Wrap every block linear of ``loaded.model`` in a LoRA adapter (in place).

    Linears at least ``config.mask_min_sparsity`` sparse, or all of them with ``mask_all`` (LoRAPrune
    prunes as it trains), get a masked adapter whose mask is their current non-zero pattern.
    """
    spec = loaded.spec
    paths = {
        (i, name): f"{spec.blocks}.{i}.{name}"
        for i, block in enumerate(spec.blocks_of(loaded.model))
        for name in spec.linears(block)
    }
    conv = any(is_transposed(loaded.model.get_submodule(p)) for p in paths.values())
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(paths.values()),
        fan_in_fan_out=conv,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # seeded adapter init without touching the caller's RNG
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(loaded.model, lora)
    adapters = Adapters(peft_model, {key: loaded.model.get_submodule(path) for key, path in paths.items()})
    for key, layer in adapters.layers.items():
        weight = base_weight(layer)
        if mask_all or sparsity_of(weight) >= max(config.mask_min_sparsity, 1e-12):
            adapters.mask(key, weight != 0)
    return adapters


class TrainHook:
    """What LoRAPrune (or a test) adds to the loop; the default does nothing.

    ``after_backward`` sees the step's gradients (unscaled, clipped) before the optimizer step.
    ``state_dict`` / ``load_state_dict`` travel in the checkpoint; ``fingerprint`` must match on resume.
    """

    def after_backward(self, step: int) -> None:
        """Called once per optimizer step, 0-based."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def fingerprint(self) -> dict:
        return {}


@dataclass
class TrainLog:
    """What the loop did: steps run in total, where it resumed, the loss of every step, time."""

    steps: int
    resumed_from: int
    losses: list[float]
    seconds: float
    precision: str


def _precision(config: RecoverConfig, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA (fp16 where bf16 is unsupported), float32 on the CPU."""
    if config.precision != "auto":
        return config.precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _schedule(config: RecoverConfig):
    """Linear warm-up then linear decay to zero (transformers' default schedule, as LLM-Pruner uses)."""
    warmup, total = config.warmup(), config.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_files(folder: str | Path) -> list[Path]:
    """Where a run in ``folder`` checkpoints: ``folder`` itself and its ``round-N`` subfolders (iterative)."""
    folder = Path(folder).expanduser()
    return [sub / CHECKPOINT for sub in [*sorted(folder.glob("round-*")), folder]]


def remove_checkpoints(folder: str | Path) -> None:
    """Delete the checkpoints a finished run left, and their folders if nothing else is in them."""
    for path in checkpoint_files(folder):
        path.unlink(missing_ok=True)
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()



def train(
    adapters: Adapters,
    config: RecoverConfig,
    ids: torch.Tensor,
    device: torch.device,
    hook: TrainHook | None = None,
    identity: dict | None = None,
    description: str = "lora",
) -> TrainLog:
    """Train the adapters for ``config.steps`` optimizer steps on windows of ``ids`` (1-D token ids).

    ``identity`` (e.g. the model source and size) joins the checkpoint fingerprint.
    """
    hook = hook or TrainHook()
    model = adapters.peft_model
    params = adapters.trainable()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    precision = _precision(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision in ("bf16", "fp16")
        else nullcontext()
    )
    folder = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None
    digest = _digest({"config": config.fingerprint(), "hook": hook.fingerprint(), "model": identity or {}})
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    start, losses = 0, []
    state = load_checkpoint(folder / CHECKPOINT, digest) if folder else None
    if state is not None:
        with restoring(folder / CHECKPOINT), torch.no_grad():
            for name, p in zip(names, params):
                p.copy_(state["adapters"][name])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            hook.load_state_dict(state["hook"])
            start, losses = int(state["step"]), [float(x) for x in state["losses"]]
    home = next(model.parameters()).device
    model.to(device)
    base = model.get_base_model()
    if config.gradient_checkpointing:
        enable_checkpointing(base)
    clock = time.perf_counter()
    bar = meter(description, config.steps, completed=start, loss="-")
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bar as update:
            for step in range(start, config.steps):
                total = 0.0
                for micro in range(config.grad_accum):
                    index = step * config.grad_accum + micro
                    batch = random_windows(ids, config.batch_size, config.seq_len, config.seed * 1_000_003 + index, config.data)
                    batch = batch.to(device)
                    torch.manual_seed(config.seed * 7_919 + index)
                    with autocast:
                        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                    if not torch.isfinite(loss):
                        raise NumericalError(f"the training loss became {loss.item()} at step {step}; lower --lr")
                    scaler.scale(loss / config.grad_accum).backward()
                    total += loss.item() / config.grad_accum
                scaler.unscale_(optimizer)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                hook.after_backward(step)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total)
                update(step + 1, loss=f"{total:.4f}")
                if folder and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
                    save_checkpoint(folder / CHECKPOINT, {
                        "digest": digest,
                        "step": step + 1,
                        "losses": losses,
                        "adapters": {name: p.detach().cpu() for name, p in zip(names, params)},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "hook": hook.state_dict(),
                    })
    finally:
        model.eval()
        if config.gradient_checkpointing:
            enable_checkpointing(base, on=False)
        optimizer.zero_grad(set_to_none=True)
        model.to(home)
    return TrainLog(config.steps, start, losses, time.perf_counter() - clock, precision)


def train_ids(loaded: LoadedModel, config: RecoverConfig) -> torch.Tensor:
    """The training text's token ids (the ``train`` split: never the evaluation text)."""
    ids = tokenize(loaded.tokenizer, load_text(config.data, "train", config.data_dir))
    if ids.numel() < config.seq_len + 1:
        raise UsageError(f"{config.data} has {ids.numel()} tokens, fewer than --seq-len {config.seq_len} + 1")
    return ids


def identity(loaded: LoadedModel) -> dict:
    """What identifies the model for a checkpoint: its source and every parameter's shape."""
    shapes = {name: list(p.shape) for name, p in loaded.model.named_parameters()}
    return {"source": loaded.source, "shapes": _digest(shapes)}


def mean_sparsity(loaded: LoadedModel) -> float:
    """Mean fraction of exact zeros over the block linears."""
    values = [sparsity_of(weight_matrix(module)) for module in loaded.spec.named_linears(loaded.model).values()]
    return sum(values) / max(len(values), 1)


@dataclass
class RecoverReport:
    """What a recovery did: the settings, steps and tokens, losses, sparsity kept, time and memory."""

    method: str
    config: RecoverConfig
    log: TrainLog
    masked_linears: int
    sparsity_before: float
    sparsity_after: float
    zeros_kept: bool
    seconds: float
    peak_memory_mb: float
    device: str
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.log.steps * self.config.tokens_per_step()

    def loss_start_end(self, window: int = 10) -> tuple[float, float]:
        """Mean training loss over the first and the last ``window`` steps (single steps are noisy)."""
        losses = self.log.losses
        n = max(1, min(window, len(losses) // 2))
        return (sum(losses[:n]) / n, sum(losses[-n:]) / n) if losses else (math.nan, math.nan)

    def stage_record(self) -> dict:
        first, last = self.loss_start_end()
        config = {k: v for k, v in asdict(self.config).items() if k not in ("checkpoint_dir", "data_dir")}
        return {
            "stage": "recover",
            "method": self.method,
            "config": config,
            "seed": self.config.seed,
            "steps": self.log.steps,
            "resumed_from": self.log.resumed_from,
            "tokens": self.tokens,
            "precision": self.log.precision,
            "loss": {"first": first, "last": last, "per_step": self.log.losses},
            "masked_linears": self.masked_linears,
            "sparsity": {"before": self.sparsity_before, "after": self.sparsity_after},
            "zeros_kept": self.zeros_kept,
            **self.extra,
            "seconds": round(self.seconds, 3),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "device": self.device,
        }


def recover_lora(
    loaded: LoadedModel, config: RecoverConfig, device: torch.device, hook: TrainHook | None = None
) -> RecoverReport:
    """Train masked LoRA adapters on ``loaded.model`` and merge them, in place."""
    config.validate()
    ids = train_ids(loaded, config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    before = mean_sparsity(loaded)
    who = identity(loaded)
    adapters = attach(loaded, config)
    try:
        log = train(adapters, config, ids, device, hook, who)
    except BaseException:
        adapters.discard()
        raise
    kept = adapters.merge()
    if not kept:
        raise NumericalError("a pruned weight became non-zero in the merge; please report this")
    return RecoverReport(
        method="lora",
        config=config,
        log=log,
        masked_linears=len(adapters.masked),
        sparsity_before=before,
        sparsity_after=mean_sparsity(loaded),
        zeros_kept=kept,
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(device),
        device=str(device),
    )
