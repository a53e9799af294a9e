"""Prune a model that never sits in memory whole: read each block from the input safetensors shards
when the engine reaches it, write it to the output shards when it is done.

The model is built as a skeleton whose parameters live on the meta device (no memory); only the
embeddings are read up front, because capturing block 0's inputs needs them. Then, per block:

1. :meth:`StreamSession.load_block` reads its tensors from the input shards, straight into the
   block's new tensors at the offsets the safetensors header gives (a memory map would be simpler,
   but its pages count as resident while mapped and would double a block's footprint),
2. the shared engine calibrates and prunes it exactly as in memory,
3. :meth:`StreamSession.release_block` writes it as its own output shard (tensor by tensor, no
   serialised copy) and returns its parameters to the meta device.

Tensors are read and written in the checkpoint's own layout (:class:`~secateurs.model.stored.StoredLayout`:
most MoE families store one tensor per expert, which the model holds fused), so a streamed folder
equals what ``save_pretrained`` writes after an in-memory run.

Reading and writing overlap the compute: while block *i* is calibrated, block *i+1* is read on a
background thread, and block *i*'s shard is written on another while block *i+1* computes (one
write in flight; the next waits for it, so a failed write stops the run at the following block).
On a GPU (known once the first block's statistics are on it) blocks are read into page-locked
memory, copied to the GPU by DMA in :meth:`StreamSession.load_block` (the engine then finds them in
place) and copied back by DMA into page-locked buffers that the writer thread waits for, so neither
direction makes a staging copy or holds up the compute. Peak host memory is therefore the
embeddings, three blocks and the calibration activations, whatever the depth. Output shards go to a folder beside OUT (``.OUT.partial``) with ``progress.json``; a rerun
with the same arguments finds the finished blocks there, propagates the calibration activations
through them (recomputed, so bit for bit the same as an uninterrupted run) and carries on. The last
step writes the remaining tensors, the index, config, tokenizer and ``secateurs.json``, and renames
the folder to OUT, so OUT is complete or absent. In a multi-process run only rank 0 writes.
"""

from __future__ import annotations

import ctypes
import errno
import json
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

from ..errors import UsageError
from ..files import replace_folder, write_atomic
from ..model.arch import ArchSpec, spec_for
from ..model.linear import sparsity_of, weight_matrix
from ..model.load import LoadedModel, load_config, resolve_dtype
from ..model.save import RECORD, check_out
from ..model.shards import DTYPES, INDEX, ShardReader, read_header, read_tensors, write_tensors
from ..model.sources import model_folder
from ..model.stored import StoredLayout
from ..model.tokenizer import _try_tokenizer
from ..model.validate import check_tensors
from .distributed import RankGroup, check_samples, collective
from .sequential import BlockMethod, EngineHooks, Stats

PROGRESS = "progress.json"


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc). A block's tensors are below glibc's largest
    mmap threshold, so once freed they stay in the heap, fragmented, and resident memory would creep
    up block after block instead of staying flat."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc() if sys.platform.startswith("linux") else None


def _set_tensor(root: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    module = root.get_submodule(path) if path else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """:func:`secateurs.files.write_atomic`, with a full disk as a one-line error that says a rerun resumes."""
    try:
        write_atomic(path, write, make_parents=False)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UsageError(
                f"disk full while writing {path.name} in {path.parent}; free space and rerun the same command to resume"
            ) from None
        raise


class StreamSession(EngineHooks):
    """A streamed model: meta skeleton, input shards, resumable output shards (see module docstring).

    ``source_index[i]`` is the input block that becomes output block ``i`` (layer removal renumbers);
    ``inner`` receives the hooks streaming does not own (multi-process statistics and solves).
    """

    def __init__(
        self,
        source: str | Path,
        out: str | Path,
        dtype: str = "float32",
        request: dict | None = None,
        overwrite: bool = False,
        group: RankGroup | None = None,
        inner: EngineHooks | None = None,
        overlap: bool = True,
    ) -> None:
        self.folder = (model_folder(str(source)) or Path(source).expanduser()).resolve()
        if not (self.folder / "config.json").is_file():
            raise UsageError(f"--stream reads a Hugging Face folder with safetensors shards; {source} is not one")
        self.out = check_out(out, self.folder, overwrite)
        self.overwrite = overwrite
        self.dtype = resolve_dtype(dtype)
        self.group = group
        self.inner = inner or EngineHooks()
        self.reader = ShardReader(self.folder)
        config = load_config(str(self.folder))  # sizes checked against the shards' headers
        if getattr(config, "auto_map", None):
            raise UsageError(f"{source} needs its own modeling code (auto_map); prune it without --stream")
        spec = spec_for(config)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=False)
        model.eval()
        model.requires_grad_(False)
        self.loaded = LoadedModel(model, _try_tokenizer(self.folder), spec, str(source), self.folder)
        self.spec: ArchSpec = spec
        # How the shards name and shape the block's tensors (MoE experts: one per expert, fused in the model).
        self.layout = StoredLayout(model)
        self.source_index = list(range(len(spec.blocks_of(model))))
        self._check_keys()
        check_tensors(model, self.reader, str(source), streamed_prefix=spec.blocks)
        self._load_embeddings()
        self.partial = self.out.parent / f".{self.out.name}.partial"
        self.fingerprint = {
            "source": str(self.folder),
            "shards": self.reader.fingerprint(),
            "dtype": dtype,
            "request": request or {},
        }
        self.done: dict[str, dict] = {}
        self.per_layer: dict[str, float] = {}
        self.overlap = overlap
        self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="secateurs-read") if overlap else None
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="secateurs-write") if overlap else None
        self._ahead: tuple[int, Future] | None = None
        self._pending: Future | None = None
        # The engine's accelerator, learnt from the first block's statistics: from then on blocks are
        # read into page-locked memory, copied to it here and copied back by DMA for the writer.
        self.device: torch.device | None = None

    @property
    def writes(self) -> bool:
        return self.group is None or self.group.is_main

    def _cast_dtype(self, stored: torch.dtype) -> torch.dtype:
        """Floating tensors take the requested dtype, as ``from_pretrained(dtype=…)`` does; others keep theirs."""
        return self.dtype if stored.is_floating_point else stored

    def _cast(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self._cast_dtype(value.dtype))

    def _block_key(self, index: int, name: str) -> str:
        return f"{self.spec.blocks}.{index}.{name}"

    def _stored_block(self, index: int, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors as the input shards store them, on the meta device (names and shapes)."""
        state = {self._block_key(index, name): torch.empty_like(value, device="meta")
                 for name, value in block.state_dict().items()}
        return self.layout.to_stored(state)

    def _check_keys(self) -> None:
        blocks = self.spec.blocks_of(self.loaded.model)
        for i, block in enumerate(blocks):
            for key, value in self._stored_block(i, block).items():
                if key not in self.reader.keys:
                    raise UsageError(
                        f"the shards of {self.folder} have no tensor {key}; this checkpoint names its weights "
                        "differently from the model code, so prune it without --stream"
                    )
                if self.reader.shapes[key] != list(value.shape):  # converted tensors: check_tensors sees fused names only
                    raise UsageError(
                        f"{self.folder}: tensor {key} in {self.reader.keys[key]} has shape {self.reader.shapes[key]}, "
                        f"but config.json builds {list(value.shape)}; the config does not belong to these weights"
                    )

    def _load_embeddings(self) -> None:
        model = self.loaded.model
        keys = [k for k in self.reader.keys if k.startswith(tuple(f"{e}." for e in self.spec.embeddings))]
        for key, value in self.reader.read(keys).items():
            _set_tensor(model, key, self._cast(value))

    # --- resumable output --------------------------------------------------------------------

    def open(self) -> StreamSession:
        """Create or resume the partial output; every rank then reads the same progress."""
        calibration = self.fingerprint["request"].get("calibration")
        if self.group is not None and calibration:  # before .OUT.partial exists: a bad request leaves nothing
            check_samples(calibration["n_samples"], self.group.world)
        if self.writes:
            progress = self.partial / PROGRESS
            if self.partial.exists():
                saved = self._read_progress()
                if saved.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
                    raise UsageError(
                        f"{self.partial} holds an interrupted run with other arguments or another input; "
                        "rerun that command to resume it, or delete the folder"
                    )
                if saved["done"]:
                    print(f"secateurs: resuming after {len(saved['done'])} finished blocks in {self.partial}", file=sys.stderr)
            else:
                self.partial.mkdir(parents=True)
                _write_atomic(progress, lambda p: p.write_text(json.dumps({"fingerprint": self.fingerprint, "done": {}})))
        self._barrier()
        if self.partial.exists():
            self.done = self._read_progress()["done"]
        return self

    def _read_progress(self) -> dict:
        try:
            return json.loads((self.partial / PROGRESS).read_text())
        except (OSError, json.JSONDecodeError):
            raise UsageError(f"{self.partial} is an unreadable partial output; delete it and rerun") from None

    def _barrier(self) -> None:
        if self.group is not None:
            collective("waiting for every rank", torch.distributed.barrier)

    def _shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{len(self.source_index) + 1:05d}.safetensors"

    # --- engine hooks ------------------------------------------------------------------------

    def local_samples(self, calib_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.local_samples(calib_ids)

    def reduce_stats(self, index: int, stats: Stats) -> None:
        tensors = [t for accs in stats.values() for acc in accs.values() for t in acc.tensors()]
        if tensors and tensors[0].is_cuda:
            self.device = tensors[0].device
        self.inner.reduce_stats(index, stats)

    def process_block(
        self, method: BlockMethod, index: int, block: nn.Module, linears: dict[str, nn.Module], stats: Stats
    ) -> None:
        self.inner.process_block(method, index, block, linears, stats)

    def load_block(self, index: int, block: nn.Module, method: BlockMethod) -> bool:
        names = list(block.state_dict())
        resumed = method.modifies_weights and str(index) in self.done
        if resumed:  # the block as this run wrote it (an edit may have changed its shapes): every tensor of its file
            entry = self.done[str(index)]
            path = self.partial / entry["file"]
            read = self.layout.to_model(read_tensors(path, list(read_header(path, self.partial)[0]), self._pin))
            tensors = {name: read[self._block_key(index, name)] for name in names}
            self.per_layer.update(entry["sparsity"])
        else:
            source = self.source_index[index]
            keys = list(self._stored_block(source, block))
            ahead, self._ahead = self._ahead, None
            read = ahead[1].result() if ahead is not None and ahead[0] == index else self.reader.read(keys, self._pin)
            read = self.layout.to_model(read)
            tensors = {name: read[self._block_key(source, name)] for name in names}
        self._read_ahead(index + 1, method)
        for name, value in tensors.items():
            if self.device is not None:  # the engine's .to(device) then finds the block in place
                value = value.to(self.device, non_blocking=value.is_pinned())
            _set_tensor(block, name, self._cast(value))
        return resumed

    @property
    def _pin(self) -> bool:
        return self.device is not None

    def _read_ahead(self, index: int, method: BlockMethod) -> None:
        """Start reading block ``index`` from the input shards while the current one computes."""
        blocks = self.spec.blocks_of(self.loaded.model)
        if self._reader_thread is None or index >= len(blocks) or (method.modifies_weights and str(index) in self.done):
            return
        keys = list(self._stored_block(self.source_index[index], blocks[index]))
        self._ahead = (index, self._reader_thread.submit(self.reader.read, keys, self._pin))

    def settle(self) -> None:
        self._drain()
        self.inner.settle()

    def _drain(self) -> None:
        """Wait for the shard write in flight; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def release_block(self, index: int, block: nn.Module, method: BlockMethod, resumed: bool) -> None:
        if method.modifies_weights and not resumed:
            sparsity = {
                f"{self.spec.blocks}.{index}.{name}": sparsity_of(weight_matrix(module))
                for name, module in self.spec.linears(block).items()
            }
            self.per_layer.update(sparsity)
            if self.writes:
                self._drain()
                state, copied = self._to_host(block)
                if self._writer_thread is None:
                    self._write_block(index, state, sparsity, copied)
                else:
                    self._pending = self._writer_thread.submit(self._write_block, index, state, sparsity, copied)
        for name, value in block.state_dict().items():
            _set_tensor(block, name, torch.empty_like(value, device="meta"))
        _trim_heap()

    @staticmethod
    def _to_host(block: nn.Module) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """The block's tensors in host memory; from a GPU, DMA copies into page-locked buffers and the
        event the writer waits for before it reads them, so the compute goes on meanwhile."""
        state = dict(block.state_dict())
        if not any(v.is_cuda for v in state.values()):
            return state, None
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True) for k, v in state.items()}
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    def _write_block(
        self, index: int, state: dict[str, torch.Tensor], sparsity: dict[str, float], copied: torch.cuda.Event | None = None
    ) -> None:
        if copied is not None:
            copied.synchronize()
        name = self._shard_name(index + 1)
        stored = self.layout.to_stored({self._block_key(index, k): v for k, v in state.items()})
        entries = [(k, v.dtype, list(v.shape), lambda v=v: v) for k, v in stored.items()]
        _write_atomic(self.partial / name, lambda p: write_tensors(p, entries))
        self.done[str(index)] = {"file": name, "sparsity": sparsity}
        state = {"fingerprint": self.fingerprint, "done": self.done}
        _write_atomic(self.partial / PROGRESS, lambda p: p.write_text(json.dumps(state)))

    def copy_unchanged(self, edit: Callable[[int, nn.Module], None] | None = None) -> None:
        """Stream every block through (layer removal): load, apply ``edit`` if given (expert removal,
        decided beforehand; a block resumed from an earlier run is already edited), and write it
        under its new index."""
        method = BlockMethod()  # the base method counts as modifying weights, so blocks are written
        try:
            for index, block in enumerate(self.spec.blocks_of(self.loaded.model)):
                resumed = self.load_block(index, block, method)
                if edit is not None and not resumed:
                    edit(index, block)
                self.release_block(index, block, method, resumed)
        finally:
            self.settle()

    # --- the end -----------------------------------------------------------------------------

    def finish(self, record: dict, extras: dict[str, bytes] | None = None) -> Path | None:
        """Write what is not a block, the index, config, tokenizer and record; rename to OUT (rank 0)."""
        self._drain()
        self._barrier()
        if not self.writes:
            return None
        n = len(self.source_index)
        missing = [i for i in range(n) if str(i) not in self.done]
        if missing:
            raise UsageError(f"blocks {missing} were never written; rerun the same command to finish them")
        prefix = f"{self.spec.blocks}."
        rest = [k for k in self.reader.keys if not k.startswith(prefix)]
        for name, value in list(self.loaded.model.state_dict().items()):  # the embeddings, no longer needed
            if not value.is_meta and name in self.reader.keys:
                _set_tensor(self.loaded.model, name, torch.empty_like(value, device="meta"))
        entries = [
            (k, self._cast_dtype(DTYPES[self.reader.dtypes[k]]), self.reader.shapes[k], lambda k=k: self._cast(self.reader.read([k])[k]))
            for k in rest
        ]
        last = self._shard_name(n + 1)
        _write_atomic(self.partial / last, lambda p: write_tensors(p, entries))
        weight_map, total = {}, 0
        for name in [self.done[str(i)]["file"] for i in range(n)] + [last]:
            for key, info in read_header(self.partial / name, self.partial)[0].items():
                weight_map[key] = name
                total += info["data_offsets"][1] - info["data_offsets"][0]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        try:
            (self.partial / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            self.loaded.model.config.save_pretrained(self.partial)
            if (self.folder / "generation_config.json").is_file():
                GenerationConfig.from_pretrained(self.folder).save_pretrained(self.partial)
            if self.loaded.tokenizer is not None:
                self.loaded.tokenizer.save_pretrained(self.partial)
            (self.partial / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
            for name, data in (extras or {}).items():
                (self.partial / name).write_bytes(data)
            (self.partial / PROGRESS).unlink()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UsageError(f"disk full while finishing {self.partial}; free space and rerun the same command") from None
            raise
        return self._rename()

    def _rename(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise UsageError(f"--out {self.out} appeared while pruning; pass --overwrite or choose another folder")
        return replace_folder(self.partial, self.out)
