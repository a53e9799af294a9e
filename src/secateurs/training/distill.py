"""Knowledge distillation from the dense model as a loss of the one training loop (not a loop of its own).

Why: a pruned model trained on the LM loss sees one target token per position; its teacher's whole
next-token distribution carries far more per token, which is why NVIDIA's Minitron recovers pruned
models with distillation from the unpruned one using far fewer tokens (Muralidharan et al. 2024;
Sreenivas et al. 2024). The loss (settings: :class:`secateurs.training.config.DistillConfig`):

    KD = T² · mean over positions of KL(softmax(teacher / T) ‖ softmax(student / T))

(Hinton, Vinyals & Dean 2015; Minitron's defaults: logit KD alone, T = 1), optionally mixed with the
LM loss (``kl+lm``: alpha · KD + (1 − alpha) · LM) and plus hidden-state matching of chosen blocks
(cosine or MSE between each model's block output after its own final norm).

The teacher runs in eval mode without gradients on the student's device, its logits computed for
each micro-batch (:class:`Distillation`), or, where it cannot share memory with the student, once
ahead of training: the teacher's top-k logits over every training window of the run are cached as
safetensors (values fp16, indices int32, and the windows' ids to check that the run reads what was
cached), and the loss then uses the teacher's distribution renormalised over its top k,

    KD_k = T² · mean Σ_{i ∈ top-k} p̃_i (log p̃_i − log q_i),  p̃ = softmax over the top-k logits / T,

where q is the student's full softmax: the teacher's tail mass is dropped (exact at k = vocab).
A teacher whose tokenizer or vocabulary differs from the student's, or that does not fit beside it,
is refused before any work (:func:`load_teacher`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import UsageError
from ..model.arch import ArchSpec
from ..model.load import LoadedModel, load_config, load_model, model_bytes
from ..progress import track
from .config import DEFAULT_TOP_K, DistillConfig
from .loop import Batches, Objective

RECORD = "secateurs.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over positions (float32)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    return per_position.mean() * temperature**2


def topk_kd_loss(
    student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The KD loss against a teacher known only by its top-k logits ``values`` at ``indices``: its
    distribution renormalised over those k tokens, the student's full softmax read at them."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices.long())
    teacher = F.log_softmax(values.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    return per_position.mean() * temperature**2


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Cosine distance (1 − cos over the hidden dimension) or mean squared error, averaged over positions."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.mse_loss(student.float(), teacher.float())


def recorded_teacher(student: LoadedModel) -> str:
    """The model the student came from: ``input`` in its ``secateurs.json`` (a relative path is read
    from the working directory, else beside the student's folder)."""
    folder = student.local_path
    record = folder / RECORD if folder is not None else None
    if record is None or not record.is_file():
        raise UsageError(f"{student.source} has no {RECORD} naming the model it was pruned from; pass --teacher")
    try:
        source = json.loads(record.read_text()).get("input")
    except (json.JSONDecodeError, AttributeError):
        source = None
    if not isinstance(source, str) or not source:
        raise UsageError(f"{record} names no input model; pass --teacher")
    beside = folder.parent / source
    if not Path(source).expanduser().exists() and beside.exists():
        return str(beside)
    return source


def _vocab_size(config) -> int | None:
    return getattr(getattr(config, "text_config", None) or config, "vocab_size", None)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: the GPU's free bytes, or the host's available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_fits(teacher_bytes: int | None, student: nn.Module, config: DistillConfig, device: torch.device,
               free: int | None = None) -> None:
    """Refuse a teacher that cannot share ``device`` with the student (on a CPU the student is in
    memory already); with a top-k cache only the teacher has to fit, for the one pass that caches it."""
    free = available_bytes(device) if free is None else free
    if teacher_bytes is None or free is None:
        return
    student_bytes = 0 if device.type == "cpu" or config.top_k is not None else _param_bytes(student)
    if teacher_bytes + student_bytes <= free:
        return
    gb = 2**30
    if config.top_k is not None:
        raise UsageError(f"the teacher ({teacher_bytes / gb:.1f} GiB) does not fit in the {free / gb:.1f} GiB free on {device}")
    beside = f" beside the student ({student_bytes / gb:.1f} GiB)" if student_bytes else ""
    raise UsageError(
        f"the teacher ({teacher_bytes / gb:.1f} GiB) does not fit{beside} in the {free / gb:.1f} GiB free on {device}; "
        f"pass --distill-top-k {DEFAULT_TOP_K} to cache its top-{DEFAULT_TOP_K} logits once instead"
    )


def _check_tokenizers(student: LoadedModel, teacher: LoadedModel, source: str) -> None:
    ours, theirs = student.tokenizer, teacher.tokenizer
    if ours is None or theirs is None:
        return
    a, b = ours.get_vocab(), theirs.get_vocab()
    if a != b:
        differ = len(set(a.items()) ^ set(b.items()))
        raise UsageError(f"the teacher {source}'s tokenizer differs from the student's ({differ} token ids disagree); "
                         "distill from the model the student was pruned from")


def load_teacher(student: LoadedModel, config: DistillConfig, device: torch.device,
                 dense: bool = False) -> LoadedModel:
    """The teacher, checked against the student before any training: ``config.teacher``, or (None)
    a frozen copy of the model as given when ``dense`` (the method prunes it itself), else the model
    recorded in the student's ``secateurs.json``. Same vocabulary and tokenizer, and room on ``device``."""
    dtype = next(student.model.parameters()).dtype
    if config.teacher is None and dense:
        check_fits(_param_bytes(student.model), student.model, config, device)
        teacher = LoadedModel(copy.deepcopy(student.model), student.tokenizer, student.spec, student.source,
                              student.local_path)
    else:
        source = config.teacher or recorded_teacher(student)
        vocab, ours = _vocab_size(load_config(source)), _vocab_size(student.model.config)
        if vocab != ours:
            raise UsageError(f"the teacher {source} has a vocabulary of {vocab} tokens, the student {ours}; "
                             "distill from the model the student was pruned from")
        check_fits(model_bytes(source, _DTYPE_NAMES.get(dtype, "float32")), student.model, config, device)
        teacher = load_model(source, _DTYPE_NAMES.get(dtype, "float32"))
        _check_tokenizers(student, teacher, source)
    teacher.model.eval()
    teacher.model.requires_grad_(False)
    return teacher


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output


class _Capture:
    """Forward hooks keeping chosen blocks' outputs, passed through the model's final norm."""

    def __init__(self, model: nn.Module, spec: ArchSpec, layers: list[int]) -> None:
        blocks = spec.blocks_of(model)
        self.norm = model.get_submodule(spec.final_norm) if spec.final_norm else nn.Identity()
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for layer in layers:
            if not -len(blocks) <= layer < len(blocks):
                raise UsageError(f"--distill-hidden {layer} is not a block of a {len(blocks)}-block model")
            self.handles.append(blocks[layer].register_forward_hook(self._keep(layer)))

    def _keep(self, layer: int):
        def hook(module, args, output) -> None:
            self.outputs[layer] = self.norm(_block_output(output))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.outputs.clear()


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Distillation(Objective):
    """The distillation loss of one run: :meth:`start` before the first step (teacher to the device,
    or the top-k cache built), :meth:`loss` per micro-batch, :meth:`finish` after the last."""

    def __init__(self, teacher: LoadedModel, config: DistillConfig, student_spec: ArchSpec,
                 cache: Path | None = None) -> None:
        config.validate()
        self.teacher, self.config, self.student_spec = teacher, config, student_spec
        self.cache_path = cache
        self._cache = None
        self._student: _Capture | None = None
        self._teacher: _Capture | None = None
        self._home = next(teacher.model.parameters()).device

    def fingerprint(self) -> dict:
        shapes = {name: list(p.shape) for name, p in self.teacher.model.named_parameters()}
        return {"config": self.config.fingerprint(), "teacher": self.teacher.source,
                "teacher_shapes": json.dumps(shapes, sort_keys=True)}

    def start(self, student: nn.Module, batches: Batches, windows: int, device: torch.device) -> None:
        """Ready the teacher for ``windows`` micro-batches of ``batches`` on ``device``."""
        if self.config.top_k is not None:
            self._build_cache(batches, windows, device)
            return
        self.teacher.model.to(device)
        if self.config.hidden:
            base = _base(student)
            if base.config.hidden_size != self.teacher.model.config.hidden_size:
                raise UsageError("--distill-hidden needs equal hidden sizes; the student's "
                                 f"{base.config.hidden_size} is not the teacher's {self.teacher.model.config.hidden_size}")
            self._student = _Capture(base, self.student_spec, [s for s, _ in self.config.hidden])
            self._teacher = _Capture(self.teacher.model, self.teacher.spec, [t for _, t in self.config.hidden])

    def loss(self, batch: torch.Tensor, logits: torch.Tensor, lm: torch.Tensor, index: int) -> torch.Tensor:
        """The training objective of micro-batch ``index`` (``batch`` its ids, ``logits`` and ``lm`` the student's)."""
        temperature = self.config.temperature
        if self._cache is not None:
            values, indices = self._cached(batch, index)
            kd = topk_kd_loss(logits, values, indices, temperature)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher.model(input_ids=batch, use_cache=False).logits
            kd = kd_loss(logits, teacher_logits, temperature)
        total = kd if self.config.loss == "kl" else self.config.alpha * kd + (1.0 - self.config.alpha) * lm
        if self._student is not None:
            pairs = self.config.hidden
            matched = [hidden_loss(self._student.outputs[s], self._teacher.outputs[t], self.config.hidden_loss)
                       for s, t in pairs]
            total = total + self.config.hidden_weight * torch.stack(matched).mean()
        return total

    def finish(self) -> None:
        """Teacher back where it was, hooks removed, the cache closed."""
        for capture in (self._student, self._teacher):
            if capture is not None:
                capture.remove()
        self._student = self._teacher = None
        self._cache = None
        self.teacher.model.to(self._home)

    def _cached(self, batch: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._cache.get_slice("ids")[index : index + 1][0]
        if not torch.equal(ids.long(), batch.cpu()):
            raise UsageError(f"the teacher cache {self.cache_path} does not hold this run's windows; delete it")
        values = self._cache.get_slice("values")[index : index + 1][0]
        indices = self._cache.get_slice("indices")[index : index + 1][0]
        return values.to(batch.device), indices.to(batch.device)

    def _build_cache(self, batches: Batches, windows: int, device: torch.device) -> None:
        """The teacher's top-k logits over the run's ``windows`` micro-batches, computed once (a cache
        for the same teacher, k and windows is reused: a resumed run does not recompute it)."""
        if not batches.fixed:
            raise UsageError("--distill-top-k caches the teacher over windows known before training; "
                             "this method draws its batches as it trains, so it distills on the fly")
        if self.cache_path is None:
            raise UsageError("--distill-top-k needs a folder for its cache (--checkpoint-dir)")
        with torch.random.fork_rng():
            ids = torch.stack([batches.next(index) for index in range(windows)])
        key = json.dumps({"k": self.config.top_k, "teacher": self.fingerprint()["teacher_shapes"],
                          "source": self.teacher.source, "ids": hash_ids(ids)}, sort_keys=True)
        path = self.cache_path
        if not (path.is_file() and _cache_key(path) == key):
            k = min(self.config.top_k, self.teacher.model.config.vocab_size)
            values = torch.empty((*ids.shape, k), dtype=torch.float16)
            indices = torch.empty((*ids.shape, k), dtype=torch.int32)
            self.teacher.model.to(device)
            try:
                with torch.no_grad():
                    for index in track(range(windows), "caching the teacher's top-k logits", total=windows):
                        logits = self.teacher.model(input_ids=ids[index].to(device), use_cache=False).logits
                        top = logits.float().topk(k, dim=-1)
                        values[index], indices[index] = top.values.half().cpu(), top.indices.int().cpu()
            finally:
                self.teacher.model.to(self._home)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            save_file({"values": values, "indices": indices, "ids": ids.int()}, str(partial), metadata={"key": key})
            os.replace(partial, path)
        self._cache = safe_open(str(path), "pt", device="cpu")


def hash_ids(ids: torch.Tensor) -> str:
    """A digest of token windows (what a cache was computed over)."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _cache_key(path: Path) -> str | None:
    try:
        with safe_open(str(path), "pt", device="cpu") as handle:
            return (handle.metadata() or {}).get("key")
    except Exception:  # an unreadable cache is rebuilt
        return None
