"""The ``compressed-tensors`` sparse checkpoint layout: what llm-compressor writes and vLLM and
``transformers`` 4.x (with compressed-tensors ≤ 0.14) read. ``--export sparse`` writes it, and
``load_model`` puts such a checkpoint, ours or llm-compressor's, straight onto the sparse kernels.

Per compressed linear ``<name>`` the checkpoint holds, instead of ``<name>.weight`` (stored orientation):

- ``sparse-24-bitmask`` (2:4): ``<name>.compressed`` (out, in/2), the two kept values of every group of
  4 in row-major order (a kept value may be zero); ``<name>.bitmask`` (out, ceil(in/8)) uint8 with
  exactly two bits set per group; ``<name>.shape`` int64 (2, 1) = [out, in];
- ``sparse-bitmask`` (unstructured): ``<name>.compressed`` (nnz,), the non-zeros in row-major order;
  ``<name>.bitmask`` of the non-zeros; ``<name>.row_offsets`` int64 (out,), where each row starts in
  ``compressed``; ``<name>.shape`` int64 (2,).

A bitmask is numpy's ``packbits(mask, axis=-1, bitorder="little")``: bit j of byte k is column 8k + j.
``config.json`` says which format under ``quantization_config`` (``compression_config`` in older
writers): ``{"quant_method": "compressed-tensors", "version", "sparsity_config": {"format", "targets",
"ignore", "global_sparsity", "sparsity_structure", "registry_requires_subclass"}, "transform_config"}``.

Both directions are done here, without the package: the layout is a bitmask and a gather, and the
package cannot serve at run time anyway. compressed-tensors removed these sparse compressors after
0.14 (0.15 and later neither read nor write them, and transformers 5 loads only through those), while
0.14 requires transformers < 5. The tests check the layout against the package's own bit packing and
config classes; the 0.14 compressor itself was checked by hand (see ``tests/test_compressed_tensors.py``).

In memory a 2:4 bitmask becomes the kernel format whose ``checkpoint_storage`` it is (:class:`Sparse24`)
with its values as stored (only the 2-bit positions are derived); a bitmask becomes whatever
:func:`choose_format` picks for it; a layer no kernel format holds (too dense, or a width the kernels do
not take) becomes a dense weight again.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UsageError
from ..model.arch import ArchSpec
from ..model.linear import is_transposed
from ..model.formats import FolderFormat, register_folder_format
from ..record import ExportStage
from .formats import SparseFormat, pack_bits, unpack_bits
from .linear import SparseLinear
from .registry import choose_format, format_classes
from .swap import DEFAULT_MIN_SPARSITY, set_module, sparsify

FORMAT_24 = "sparse-24-bitmask"
FORMAT_BITMASK = "sparse-bitmask"
PARTS = {FORMAT_24: ("compressed", "bitmask", "shape"), FORMAT_BITMASK: ("compressed", "bitmask", "row_offsets", "shape")}
QUANT_METHOD = "compressed-tensors"
CONFIG_KEYS = ("quantization_config", "compression_config")
# The compressed-tensors release whose layout is written (the last one with these compressors), and
# the newest whose sparse layout is known: a later version may mean a layout this code has not seen.
WRITTEN_VERSION = "0.14.0"
NEWEST_KNOWN = (0, 14)
LAYOUT = "compressed-tensors"


def sparsity_entry(folder: Path) -> tuple[str, dict] | None:
    """(config key, its value) when ``folder/config.json`` declares a compressed-tensors sparse format
    (anything but ``dense``), else None; never raises, so detection is safe on any folder."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in CONFIG_KEYS:
        entry = config.get(key) if isinstance(config, dict) else None
        if not isinstance(entry, dict) or entry.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            continue
        sparsity = entry.get("sparsity_config")
        if isinstance(sparsity, dict) and sparsity.get("format", "dense") != "dense":
            return key, entry
    return None


def checked_format(folder: Path, entry: dict) -> str:
    """The entry's sparse format, or one UsageError line for what this reader cannot take."""
    storage = entry["sparsity_config"].get("format")
    if storage not in PARTS:
        raise UsageError(f"{folder}: config.json stores sparse weights as {storage!r}; secateurs reads "
                         f"{FORMAT_24} and {FORMAT_BITMASK} (decompress it with the tool that wrote it)")
    version = str(entry.get("version", WRITTEN_VERSION))
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) > NEWEST_KNOWN:
        raise UsageError(f"{folder}: config.json was written by compressed-tensors {version!r}, whose {storage} "
                         f"layout secateurs does not know (it reads versions up to {'.'.join(map(str, NEWEST_KNOWN))})")
    if entry.get("config_groups"):
        raise UsageError(f"{folder} is quantized as well as sparse; secateurs loads sparse-only compressed-tensors "
                         "checkpoints (load this one with its own tool)")
    return storage


def layer_tensors(fmt: SparseFormat, storage: str, transposed: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one compressed weight (names without the ``<layer>.`` prefix).

    ``transposed``: the layer stores its weight as (in, out) (GPT-2's Conv1D), so that is what is written."""
    if storage == FORMAT_24:
        rows, cols = fmt.shape
        return {"compressed": fmt.values, "bitmask": pack_bits(fmt.mask()),
                "shape": torch.tensor([[rows], [cols]], dtype=torch.int64)}
    dense = fmt.to_dense()
    dense = dense.t().contiguous() if transposed else dense
    mask = dense != 0
    counts = mask.sum(dim=1)
    return {"compressed": dense[mask], "bitmask": pack_bits(mask), "row_offsets": counts.cumsum(0) - counts,
            "shape": torch.tensor(list(dense.shape), dtype=torch.int64)}


def read_layer(storage: str, parts: dict[str, torch.Tensor], shape: tuple[int, int], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask, values) of one stored weight, checked against ``shape`` (the model's stored weight)
    and against each other; every disagreement is one UsageError line naming the tensor."""
    stated = parts["shape"].flatten().tolist()
    if stated != list(shape):
        raise UsageError(f"{where}.shape says {stated}, but the model's weight there is {list(shape)}; "
                         "the checkpoint does not belong to this config")
    rows, cols = shape
    bitmask, values = parts["bitmask"], parts["compressed"]
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise UsageError(f"{where}.bitmask is {bitmask.dtype} {list(bitmask.shape)}, not uint8 "
                         f"{[rows, -(-cols // 8)]}; the checkpoint is corrupt")
    if not values.is_floating_point():
        raise UsageError(f"{where}.compressed is {values.dtype}; secateurs reads float values (not a quantized checkpoint)")
    mask = unpack_bits(bitmask, cols)
    if storage == FORMAT_24:
        if cols % 4 or not bool((mask.reshape(rows, -1, 4).sum(dim=2) == 2).all()):
            raise UsageError(f"{where}.bitmask does not keep exactly 2 of every 4 inputs, but config.json says "
                             f"{FORMAT_24}; the checkpoint is corrupt")
        if tuple(values.shape) != (rows, cols // 2):
            raise UsageError(f"{where}.compressed is {list(values.shape)}, not {[rows, cols // 2]}; truncated or corrupt")
        return mask, values
    kept = int(mask.sum())
    if values.dim() != 1 or values.numel() != kept:
        raise UsageError(f"{where}.compressed holds {values.numel()} values, but its bitmask keeps {kept}; truncated or corrupt")
    counts = mask.sum(dim=1)
    if parts["row_offsets"].flatten().tolist() != (counts.cumsum(0) - counts).tolist():
        raise UsageError(f"{where}.row_offsets disagree with its bitmask; the checkpoint is corrupt")
    return mask, values


def kernel_format(storage: str, mask: torch.Tensor, values: torch.Tensor, transposed: bool,
                  min_sparsity: float = DEFAULT_MIN_SPARSITY) -> SparseFormat | torch.Tensor:
    """The kernel format of a stored weight, or its dense (out, in) matrix where none holds it: the
    format that keeps this storage's values as stored, where the layer's width suits it, else the one
    :func:`choose_format` picks for the dense weight."""
    native = next((cls for cls in format_classes() if cls.checkpoint_storage == storage), None)
    if native is not None and not transposed and native.supports(torch.zeros(1, mask.shape[1])) is None:
        return native.from_mask(values, mask)
    dense = torch.zeros(mask.shape, dtype=values.dtype).masked_scatter_(mask, values.flatten())
    dense = dense.t().contiguous() if transposed else dense
    fmt_cls, _ = choose_format(dense, min_sparsity)
    return dense if fmt_cls is None else fmt_cls.compress(dense)


def _write_hook(storage: str, transposed: bool, layer: SparseLinear, state: dict, prefix: str, _meta) -> None:
    """A SparseLinear's state dict in the checkpoint layout (so ``save_pretrained`` writes it)."""
    for part in layer.format_class.parts:
        state.pop(prefix + part, None)
    for part, tensor in layer_tensors(layer.format(), storage, transposed).items():
        state[prefix + part] = tensor


def use_layout(model: nn.Module, storage: str, transposed: set[str], ignore: list[str], sparsity: float) -> dict:
    """Make ``model`` save in ``storage``: its SparseLinears write checkpoint tensors and its config
    carries the sparsity config as compressed-tensors writes it. Returns that config."""
    entry = {
        "quant_method": QUANT_METHOD,
        "version": WRITTEN_VERSION,
        "sparsity_config": {
            "format": storage,
            "global_sparsity": sparsity,
            "ignore": ignore,
            "registry_requires_subclass": False,
            "sparsity_structure": "2:4" if storage == FORMAT_24 else "unstructured",
            "targets": ["Linear"],
        },
        "transform_config": {},
    }
    for name, layer in model.named_modules():
        if isinstance(layer, SparseLinear):
            layer.register_state_dict_post_hook(partial(_write_hook, storage, name in transposed))
    model.config.quantization_config = entry
    return entry


def export(model: nn.Module, spec: ArchSpec, min_sparsity: float = DEFAULT_MIN_SPARSITY) -> ExportStage:
    """Swap the sparse linears for SparseLinear and make the model save as a compressed-tensors
    checkpoint: ``sparse-24-bitmask`` when every swapped weight is 2:4 in its stored orientation,
    else ``sparse-bitmask`` (which holds any pattern). Returns the stage record."""
    linears = spec.named_linears(model)
    transposed = {name for name, module in linears.items() if is_transposed(module)}
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    total = sum(m.weight.numel() for m in linears.values())
    report = sparsify(model, spec, min_sparsity)
    transposed &= set(report.swapped)
    storage = storage_for(model, transposed)
    ignore = sorted(name for name, module in model.named_modules() if isinstance(module, nn.Linear) or is_transposed(module))
    use_layout(model, storage, transposed, ignore, round(zeros / max(total, 1), 6))
    return replace(report.stage_record(), layout=LAYOUT, storage=storage)


def storage_for(model: nn.Module, transposed: set[str]) -> str:
    """The storage every SparseLinear's format keeps its values in as stored (``sparse-24-bitmask`` for an
    all-2:4 model), where they share one and none is transposed; else ``sparse-bitmask``, which holds any."""
    storages = {layer.format_class.checkpoint_storage for layer in model.modules() if isinstance(layer, SparseLinear)}
    native = storages.pop() if len(storages) == 1 else None
    return native if native is not None and not transposed else FORMAT_BITMASK


def _stored_layers(folder: Path, storage: str) -> dict[str, dict[str, Path]]:
    """Each compressed layer's parts and the shard holding each (from the safetensors headers)."""
    layers: dict[str, dict[str, Path]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name, _, part = key.rpartition(".")
                if part in PARTS[storage]:
                    layers.setdefault(name, {})[part] = file
    return {name: parts for name, parts in layers.items() if "compressed" in parts}


def restore(model: nn.Module, folder: Path, dtype: torch.dtype) -> int:
    """Put a compressed-tensors sparse checkpoint's weights into the freshly built ``model`` (loaded
    without them), on the kernels where a format holds them; returns how many layers were compressed."""
    found = sparsity_entry(folder)
    if found is None:
        return 0
    _, entry = found
    storage = checked_format(folder, entry)
    transposed: set[str] = set()
    layers = _stored_layers(folder, storage)
    for name, files in layers.items():
        where = f"{folder}: {name}"
        missing = [part for part in PARTS[storage] if part not in files]
        if missing:
            raise UsageError(f"{where}.{missing[0]} is missing ({storage} stores {', '.join(PARTS[storage])}); the checkpoint is incomplete")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not hasattr(module, "weight") or module.weight.dim() != 2:
            raise UsageError(f"{where} is stored compressed, but config.json builds no linear of that name; "
                             "the checkpoint does not belong to this config")
        parts = {}
        for part, file in files.items():
            with safe_open(str(file), framework="pt") as handle:
                parts[part] = handle.get_tensor(f"{name}.{part}")
        mask, values = read_layer(storage, parts, tuple(module.weight.shape), where)
        flipped = is_transposed(module)
        fmt = kernel_format(storage, mask, values.to(dtype), flipped)
        if isinstance(fmt, torch.Tensor):
            module.weight.data = (fmt.t() if flipped else fmt).contiguous()
            continue
        bias = getattr(module, "bias", None)
        set_module(model, name, SparseLinear(fmt, bias.detach() if bias is not None else None))
        if flipped:
            transposed.add(name)
    sparsity = entry["sparsity_config"]
    use_layout(model, storage_for(model, transposed), transposed, list(sparsity.get("ignore") or []),
               sparsity.get("global_sparsity", 0.0))
    return len(layers)


register_folder_format(FolderFormat(LAYOUT, lambda folder: sparsity_entry(folder) is not None, restore, CONFIG_KEYS))
