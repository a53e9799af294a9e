"""Sequential block-by-block calibration, the loop SparseGPT and Wanda run, shared by every method.

1. Capture: run the model once per calibration batch with every block replaced by a recorder, so
   we get block 0's input hidden states and, for every block, the exact keyword arguments the model
   passes it (attention mask, rotary embeddings, per-layer-type masks as in Gemma or Qwen).
2. For each block: move it to the accelerator; run the calibration batches through it with hooks
   that feed the method's statistics; let the method act on the block; run the batches again
   through the (now pruned) block to produce the next block's inputs; move it back.

Only one block and the calibration activations are on the accelerator at a time.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NumericalError, UsageError
from ..model.arch import ArchSpec
from ..model.linear import in_features, weight_matrix
from ..progress import track
from .options import EngineOptions
from .stats import Accumulator

Stats = dict[str, dict[str, Accumulator]]


class BlockMethod:
    """What a method tells the engine, and the one decision it makes per block.

    ``statistics`` maps a name to an Accumulator class collected on the input of every prunable
    linear of the block; ``process_block`` gets them and edits the block in place.
    ``modifies_weights = False`` marks an observe-only pass: the engine then reuses the first pass's
    outputs instead of running the block twice.
    """

    needs_calibration: bool = False
    modifies_weights: bool = True
    statistics: dict[str, type[Accumulator]] = {}
    # True when ``process_block`` may be called on any subset of the block's linears that keeps
    # linears fed the same input together (each linear's edit depends only on its own weight and
    # statistics): ranks can then split a block's solves between them.
    splits_by_linear: bool = False

    def process_block(
        self, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats
    ) -> None:
        raise NotImplementedError

    def observe(self, index: int, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Called per calibration batch with a block's input and (pre-edit) output hidden states."""

    # True when :meth:`refine` should run: the engine then keeps the block's pre-edit outputs of the
    # statistics pass (the dense block applied to the pruned model's own inputs) as its targets.
    keeps_dense_outputs: bool = False

    def refine(self, index: int, block: nn.Module, linears: dict[str, nn.Module], data: BlockData) -> None:
        """Called after :meth:`process_block` with the block's calibration inputs and dense outputs."""


@dataclass
class BlockData:
    """One block's calibration batches, for a step that trains the edited block (reconstruction).

    ``inputs[b]`` is what the block receives from the already-pruned blocks before it, ``targets[b]``
    what the dense block made of it; ``kwargs[b]`` the exact keyword arguments the model passes.
    """

    inputs: list[torch.Tensor]
    kwargs: list[dict]
    targets: list[torch.Tensor]
    device: torch.device

    def output(self, block: nn.Module, b: int) -> torch.Tensor:
        """The block's output hidden states for batch ``b`` on ``device`` (differentiable)."""
        return _block_output(block(self.inputs[b].to(self.device), **_to(self.kwargs[b], self.device)))


class EngineHooks:
    """Extension points of :func:`run_blocks` for running the same loop elsewhere; the defaults keep
    the plain in-memory, one-process behaviour.

    Streaming (``engine/stream.py``) materialises each block's weights from safetensors shards when
    it is reached and writes it out when done; several ranks (``engine/distributed.py``) split the
    calibration samples, sum statistics across ranks and share out the solves.
    """

    def local_samples(self, calib_ids: torch.Tensor) -> torch.Tensor:
        """The calibration samples this process runs (all of them in one process)."""
        return calib_ids

    def load_block(self, index: int, block: nn.Module, method: BlockMethod) -> bool:
        """Make the block's weights present; True means it was finished by an earlier, interrupted
        run and must only propagate the calibration activations."""
        return False

    def reduce_stats(self, index: int, stats: Stats) -> None:
        """Combine statistics gathered on this process's samples with the other processes' (in place)."""

    def process_block(
        self, method: BlockMethod, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats
    ) -> None:
        method.process_block(index, block, linears, stats)

    def release_block(self, index: int, block: nn.Module, method: BlockMethod, resumed: bool) -> None:
        """Called once the block is done and back on its home device."""

    def settle(self) -> None:
        """Called when the block loop ends, normally or not: finish any work left in the background."""


@dataclass
class Captured:
    """Block 0's inputs per batch, and the keyword arguments every block receives per batch."""

    hidden: list[torch.Tensor]
    block_kwargs: list[list[dict]] = field(default_factory=list)  # [block][batch] -> kwargs


class _StopForward(Exception):
    """Raised by the last recorder so the capture pass never computes the LM head."""


_DROP = ("past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions")


def _record_kwargs(kwargs: dict) -> dict:
    kept = {k: v for k, v in kwargs.items() if k not in _DROP}
    kept["use_cache"] = False
    return kept


def activations_fit(n_samples: int, seq_len: int, hidden: int, itemsize: int, free_bytes: int) -> bool:
    """Whether one rank's block inputs fit in half the free GPU memory (the other half is left for
    the block's weights, its statistics and the forward pass's workspace)."""
    return n_samples * seq_len * hidden * itemsize <= free_bytes // 2


def activation_store(
    model: nn.Module, spec: ArchSpec, calib_ids: torch.Tensor, options: EngineOptions, device: torch.device
) -> torch.device:
    """Where the calibration activations live: on the accelerator when they fit beside a block,
    else in (pinned) host memory, chosen from the free memory and said on stderr;
    ``offload_activations`` forces host memory."""
    if options.offload_activations or device.type != "cuda":
        return torch.device("cpu") if options.offload_activations else device
    embedding = model.get_submodule(spec.embeddings[0]).weight
    n, seq_len = calib_ids.shape
    free, _ = torch.cuda.mem_get_info(device)
    if activations_fit(n, seq_len, embedding.shape[1], embedding.element_size(), free):
        return device
    need = n * seq_len * embedding.shape[1] * embedding.element_size()
    print(f"secateurs: the calibration activations ({need / 2**30:.1f} GiB) do not fit beside a block in the "
          f"GPU's free memory ({free / 2**30:.1f} GiB); keeping them in pinned host memory", file=sys.stderr)
    return torch.device("cpu")


def _stored(hidden: torch.Tensor, store: torch.device) -> torch.Tensor:
    """``hidden`` moved to ``store``; host copies of GPU activations are pinned (faster transfers)."""
    moved = hidden.detach().to(store)
    return moved.pin_memory() if store.type == "cpu" and hidden.is_cuda else moved


def capture_inputs(
    model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], store: torch.device
) -> Captured:
    """Block 0's input hidden states and every block's kwargs, for each calibration batch."""
    blocks = spec.blocks_of(model)
    n_blocks = len(blocks)
    captured = Captured(hidden=[], block_kwargs=[[] for _ in range(n_blocks)])
    by_shape: dict[tuple[int, ...], list[dict]] = {}
    current: list[dict] = []

    def recorder(index: int) -> Callable:
        # Some blocks (GPT-2) get arguments positionally: name them from the real signature.
        names = list(inspect.signature(type(blocks[index]).forward).parameters)[2:]

        def forward(hidden_states, *args, **kwargs):
            kwargs = {**dict(zip(names, args)), **kwargs}
            if index == 0:
                captured.hidden.append(_stored(hidden_states, store))
            current.append(_record_kwargs(kwargs))
            if index == n_blocks - 1:
                raise _StopForward
            return hidden_states

        return forward

    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        home = _model_input_device(model, spec)
        with torch.no_grad():
            for batch in batches:
                current = []
                try:
                    model(input_ids=batch.to(home), use_cache=False)
                except _StopForward:
                    pass
                shape = tuple(batch.shape)
                per_block = by_shape.setdefault(shape, current)
                for i in range(n_blocks):
                    captured.block_kwargs[i].append(per_block[i])
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    return captured


def _model_input_device(model: nn.Module, spec: ArchSpec) -> torch.device:
    return model.get_submodule(spec.embeddings[0]).weight.device


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _check_weights(index: int, linears: dict[str, nn.Module]) -> None:
    for name, module in linears.items():
        if not torch.isfinite(weight_matrix(module)).all():
            raise NumericalError(f"block {index}: weights of {name} contain NaN or inf")


def _check_activations(index: int, out: torch.Tensor, stage: str) -> None:
    if not torch.isfinite(out).all():
        raise NumericalError(f"block {index}: NaN or inf in the block's output {stage}")


class _StatHooks:
    """Forward hooks that feed each linear's accumulators with its input.

    Linears that receive the very same input tensor in a forward pass (q/k/v, gate/up) are fed
    once: the first of them accumulates and the others get a copy of its sums after the pass, so
    every linear still owns its own accumulators while the work is done once per distinct input.
    """

    def __init__(self, linears: dict[str, nn.Module], kinds: dict[str, type[Accumulator]], device) -> None:
        self.stats: Stats = {
            name: {kind: cls(in_features(module), device) for kind, cls in kinds.items()}
            for name, module in linears.items()
        }
        self._owner: dict[str, str] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = [
            module.register_forward_hook(functools.partial(self._hook, name)) for name, module in linears.items()
        ]

    def _hook(self, name: str, _module: nn.Module, args: tuple, _output) -> None:
        x = args[0]
        seen = self._seen.get(id(x))
        shared = seen is not None and seen[0] is x
        owner = self._owner.setdefault(name, seen[1] if shared else name)
        if owner != name:
            if not (shared and seen[1] == owner):
                raise RuntimeError(f"{name} stopped sharing its input with {owner} between batches")
            return
        self._seen[id(x)] = (x, name)
        for acc in self.stats[name].values():
            acc.update(x)

    def next_batch(self) -> None:
        """Forget the inputs of the last forward pass (sharing is judged within one pass)."""
        self._seen.clear()

    def finish(self) -> Stats:
        """Remove the hooks; :meth:`share` then gives every sharing linear a copy of its owner's sums."""
        for handle in self._handles:
            handle.remove()
        self._seen.clear()
        return self.stats

    def owners(self) -> list[str]:
        """Linears whose accumulators hold their own sums (the others copy an owner's in :meth:`share`)."""
        return [name for name in self.stats if self._owner.get(name, name) == name]

    def share(self) -> None:
        """Give every linear that shared its input a copy of its owner's (possibly reduced) sums."""
        for name, owner in self._owner.items():
            if owner != name:
                for kind, acc in self.stats[name].items():
                    source = self.stats[owner][kind]
                    for mine, theirs in zip(acc.tensors(), source.tensors(), strict=True):
                        mine.copy_(theirs)
                    acc.n_tokens = source.n_tokens


@dataclass
class BlockTimes:
    """What :func:`run_blocks` spent: wall seconds per block, and per engine stage (capture,
    statistics, solve, refine, propagate, transfer) summed over the blocks; CUDA is synchronised at
    each stage boundary so the split is honest."""

    per_block: list[float] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)


class _StageClock:
    """Adds wall seconds per stage into ``BlockTimes.stages``."""

    def __init__(self, seconds: dict[str, float], device: torch.device) -> None:
        self.seconds = seconds
        self.device = device
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now


def run_blocks(
    model: nn.Module,
    spec: ArchSpec,
    method: BlockMethod,
    calib_ids: torch.Tensor | None,
    options: EngineOptions | None = None,
    description: str = "pruning",
    hooks: EngineHooks | None = None,
) -> BlockTimes:
    """Apply ``method`` to every block in order; returns what each block and each engine stage took.

    ``hooks``: what a streamed or multi-process run does differently (None: the in-memory loop)."""
    options = options or EngineOptions()
    hooks = hooks or EngineHooks()
    device = options.torch_device()
    blocks = spec.blocks_of(model)
    if options.batch_size < 1:
        raise UsageError(f"the calibration batch size must be at least 1, got {options.batch_size}")
    if method.needs_calibration and calib_ids is None:
        raise UsageError(f"{type(method).__name__} needs calibration data: pass --calib")
    times = BlockTimes()
    clock = _StageClock(times.stages, device)
    captured = None
    if calib_ids is not None and (method.statistics or method.needs_calibration or method.keeps_dense_outputs):
        local = hooks.local_samples(calib_ids)
        store = activation_store(model, spec, local, options, device)
        captured = capture_inputs(model, spec, list(local.split(options.batch_size)), store)
        clock.lap("capture")
    try:
        for index in track(range(len(blocks)), description, total=len(blocks)):
            start = time.perf_counter()
            block = blocks[index]
            resumed = hooks.load_block(index, block, method)
            home = next(block.parameters()).device
            block.to(device)
            linears = spec.linears(block)
            _check_weights(index, linears)
            clock.lap("transfer")
            if captured is None:
                if not resumed:
                    hooks.process_block(method, index, block, linears, {})
                clock.lap("solve")
            else:
                _calibrate_block(index, block, linears, method, captured, device, clock, hooks, resumed)
            block.to(home)
            clock.lap("transfer")
            hooks.release_block(index, block, method, resumed)
            times.per_block.append(time.perf_counter() - start)
    finally:
        hooks.settle()
    return times


def _calibrate_block(
    index: int,
    block: nn.Module,
    linears: dict[str, nn.Module],
    method: BlockMethod,
    captured: Captured,
    device: torch.device,
    clock: _StageClock,
    engine_hooks: EngineHooks,
    resumed: bool = False,
) -> None:
    """Statistics pass, method decision, propagation pass for one block (in place in ``captured``).

    A ``resumed`` block is already pruned: only the propagation pass runs.
    """
    if resumed:
        _propagate(index, block, captured, device)
        clock.lap("propagate")
        return
    hooks = _StatHooks(linears, method.statistics, device)
    outputs: list[torch.Tensor] = []
    keep_outputs = not method.modifies_weights or method.keeps_dense_outputs
    try:
        with torch.no_grad():
            for b, hidden in enumerate(captured.hidden):
                hooks.next_batch()
                x = hidden.to(device, non_blocking=True)
                out = _block_output(block(x, **_to(captured.block_kwargs[index][b], device)))
                _check_activations(index, out, "during calibration")
                method.observe(index, x, out)
                if keep_outputs:
                    outputs.append(out.to(hidden.device))
    finally:
        stats = hooks.finish()
    engine_hooks.reduce_stats(index, {name: stats[name] for name in hooks.owners()})
    hooks.share()
    clock.lap("statistics")
    engine_hooks.process_block(method, index, block, linears, stats)
    del stats, hooks
    clock.lap("solve")
    if not method.modifies_weights:
        captured.hidden = outputs
        return
    if method.keeps_dense_outputs:
        method.refine(index, block, linears, BlockData(captured.hidden, captured.block_kwargs[index], outputs, device))
        del outputs
        clock.lap("refine")
    _check_weights(index, linears)
    _propagate(index, block, captured, device)
    clock.lap("propagate")


def _propagate(index: int, block: nn.Module, captured: Captured, device: torch.device) -> None:
    """Replace the captured activations by this (pruned) block's outputs: the next block's inputs."""
    with torch.no_grad():
        for b, hidden in enumerate(captured.hidden):
            out = _block_output(block(hidden.to(device, non_blocking=True), **_to(captured.block_kwargs[index][b], device)))
            _check_activations(index, out, "after pruning")
            if hidden.is_pinned():
                hidden.copy_(out)  # back into the same pinned buffer
            else:
                captured.hidden[b] = out.to(hidden.device)
